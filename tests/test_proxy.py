"""The inference proxy: a stand-in upstream Ollama (a small ASGI app on hypercorn, in the
test's trio loop) behind a real node; bodies relayed as they arrive, status and content
type kept, 502 when no upstream is set or it is down."""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import ollama
import pytest
import trio

from node.config import Config
from node.daemon import open_node
from node.http import (
    HTTPError,
    Request,
    Response,
    Router,
    json_response,
    ndjson_response,
    serve_http,
)
from node.testing import node_config


class StandIn:
    """An upstream that streams a chat in three lines, holding the last two until told."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.first_sent = trio.Event()
        self.bodies: list[bytes] = []

    def router(self) -> Router:
        router = Router()

        @router.route("POST", "/api/chat")
        async def chat(request: Request) -> Response:
            self.bodies.append(await request.body())

            async def lines() -> AsyncIterator[dict[str, object]]:
                yield {"message": {"role": "assistant", "content": "Hel"}, "done": False}
                self.first_sent.set()
                await self.release.wait()
                yield {"message": {"role": "assistant", "content": "lo"}, "done": False}
                yield {"message": {"role": "assistant", "content": ""}, "done": True}

            return ndjson_response(lines())

        @router.route("POST", "/api/generate")
        async def generate(request: Request) -> Response:
            body = await request.json()
            raise HTTPError(404, f"model '{body.get('model')}' not found")

        @router.route("POST", "/api/embed")
        async def embed(request: Request) -> Response:
            body = await request.json()
            return json_response({"model": body["model"], "embeddings": [[0.5, 0.25]]})

        @router.route("GET", "/api/ps")
        async def ps(request: Request) -> Response:
            return json_response({"models": []})

        @router.route("GET", "/v1/models")
        async def models(request: Request) -> Response:
            return Response(
                200,
                json.dumps({"object": "list", "query": request.query_string}).encode(),
                "application/json",
                headers=[("x-upstream", "stand-in")],
            )

        return router


def _with_upstream(config: Config, upstream: str | None) -> Config:
    return dataclasses.replace(config, api=dataclasses.replace(config.api, upstream=upstream))


async def test_proxy_relays_the_stream_as_it_arrives(tmp_path: Path) -> None:
    stand_in = StandIn()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve_http, stand_in.router(), "127.0.0.1", 0, shutdown=stop)
        )
        config = _with_upstream(node_config(tmp_path, "proxy"), urls[0])
        async with open_node(config) as node:
            async with httpx.AsyncClient(base_url=node.api_urls[0], timeout=30) as http:
                request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                with trio.fail_after(20):
                    async with http.stream("POST", "/api/chat", json=request) as r:
                        assert r.status_code == 200
                        assert r.headers["content-type"] == "application/x-ndjson"
                        lines = r.aiter_lines()
                        first = json.loads(await lines.__anext__())
                        # The first line got through while the upstream still holds the rest.
                        assert first["message"]["content"] == "Hel"
                        assert not stand_in.release.is_set()
                        stand_in.release.set()
                        rest = [json.loads(line) async for line in lines if line]
                assert [p["done"] for p in rest] == [False, True]
                assert json.loads(stand_in.bodies[0]) == request
                with trio.fail_after(20):
                    # Status and content type are the upstream's.
                    r = await http.post("/api/generate", json={"model": "absent"})
                    assert r.status_code == 404
                    assert r.json() == {"error": "model 'absent' not found"}
                    r = await http.get("/v1/models", params={"a": "1"})
                    assert r.status_code == 200 and r.headers["x-upstream"] == "stand-in"
                    assert r.json() == {"object": "list", "query": "a=1"}
            # The official client sees an Ollama.
            client = ollama.AsyncClient(host=node.api_urls[0])
            with trio.fail_after(20):
                embedded = await client.embed(model="m", input="text")
                assert embedded.embeddings == [[0.5, 0.25]]
                assert (await client.ps()).models == []
        stop.set()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("upstream", [None, "down"])
async def test_proxy_answers_502_without_an_upstream(tmp_path: Path, upstream: str | None) -> None:
    url = f"http://127.0.0.1:{_closed_port()}" if upstream == "down" else None
    config = _with_upstream(node_config(tmp_path, "lonely"), url)
    async with (
        open_node(config) as node,
        httpx.AsyncClient(base_url=node.api_urls[0], timeout=30) as http,
    ):
        with trio.fail_after(20):
            for method, path in (
                ("POST", "/api/generate"),
                ("POST", "/api/chat"),
                ("POST", "/api/embeddings"),
                ("GET", "/api/ps"),
                ("POST", "/v1/chat/completions"),
            ):
                r = await http.request(method, path, json={"model": "m"})
                assert r.status_code == 502, path
                error = r.json()["error"]
                assert "\n" not in error
                if url is None:
                    assert "set [api] upstream" in error
                else:
                    assert f"upstream Ollama at {url} is not reachable" in error
            # The node's own routes are unaffected.
            assert (await http.get("/api/tags")).status_code == 200
