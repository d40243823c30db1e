"""The node's HTTP API: Ollama's read routes served from the store, plus the node's own.

Ollama-compatible: ``GET /`` , ``GET /api/version``, ``GET /api/tags`` (same JSON shapes as
Ollama). The node's: ``/api/health``, ``/api/status``, ``/api/peers``, ``/api/find``,
``POST /api/dmm/refresh`` (the CLI's "tell the node": re-read the store, publish changes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from node.http import HTTPError, Request, Response, Router, json_response, ndjson_response
from node.pull import PullError
from node.replication_api import add_replication_routes
from storage.gguf import GGUFError, details
from storage.names import InvalidName, parse_model_name

if TYPE_CHECKING:
    from node.daemon import Node

DMM_VERSION = "0.1.0"
MAX_FIND_TIMEOUT = 60.0


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).astimezone().isoformat()


def _tags(node: Node) -> dict[str, Any]:
    models = []
    for entry in node.store.list_models():
        try:
            info = node.store.model_info(entry.name)
            model_details = details(info) if info is not None else {}
        except (GGUFError, OSError):
            model_details = {}
        models.append(
            {
                "name": entry.name.display,
                "model": entry.name.display,
                "modified_at": rfc3339(entry.modified),
                "size": entry.size,
                "digest": entry.digest[7:],
                "details": {
                    "parent_model": "",
                    "format": model_details.get("format", "gguf"),
                    "family": model_details.get("family", ""),
                    "families": model_details.get("families"),
                    "parameter_size": model_details.get("parameter_size", ""),
                    "quantization_level": model_details.get("quantization_level", ""),
                },
            }
        )
    return {"models": models}


async def _pull_stream(node: Node, name: str) -> AsyncIterator[dict[str, Any]]:
    """The pull's progress events as it runs; a failure ends the stream with an error line."""
    send, receive = trio.open_memory_channel[dict[str, Any]](64)

    async def run() -> None:
        async with send:
            try:
                await node.pull(name, send.send)
            except PullError as exc:
                await send.send({"error": str(exc)})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        async with receive:
            async for event in receive:
                yield event


def build_router(node: Node) -> Router:
    router = Router()

    @router.route("GET", "/")
    async def root(request: Request) -> Response:
        # Ollama's clients probe "/" to see whether a server is up.
        return Response(200, b"Ollama is running", "text/plain; charset=utf-8")

    @router.route("GET", "/api/version")
    async def version(request: Request) -> Response:
        return json_response({"version": DMM_VERSION})

    @router.route("GET", "/api/health")
    async def health(request: Request) -> Response:
        return json_response(
            {
                "status": "ok",
                "peer_id": node.peer_id,
                "peers": len(node.host.connected_peers()),
                "uptime": round(trio.current_time() - node.started_at, 3),
            }
        )

    @router.route("GET", "/api/tags")
    async def tags(request: Request) -> Response:
        return json_response(await trio.to_thread.run_sync(_tags, node))

    @router.route("GET", "/api/status")
    async def status(request: Request) -> Response:
        return json_response(await node.status())

    @router.route("GET", "/api/peers")
    async def peers(request: Request) -> Response:
        return json_response({"peers": node.peers()})

    @router.route("GET", "/api/find")
    async def find(request: Request) -> Response:
        glob = request.arg("glob")
        if not glob:
            raise HTTPError(400, "missing ?glob= (e.g. ?glob=llama*)")
        try:
            timeout = float(request.arg("timeout", "10") or 10)
        except ValueError:
            raise HTTPError(400, "timeout must be a number of seconds") from None
        timeout = min(max(timeout, 0.1), MAX_FIND_TIMEOUT)
        return json_response(await node.find(glob, timeout=timeout))

    @router.route("POST", "/api/pull")
    async def pull(request: Request) -> Response:
        body = await request.json()
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "model is required")
        try:
            parse_model_name(name)
        except InvalidName as exc:
            raise HTTPError(400, str(exc)) from None
        if body.get("stream", True) is False:
            events: list[dict[str, Any]] = []

            async def keep(event: dict[str, Any]) -> None:
                events.append(event)

            try:
                await node.pull(name, keep)
            except PullError as exc:
                raise HTTPError(404 if "no reachable peer" in str(exc) else 500, str(exc)) from None
            return json_response(events[-1])
        return ndjson_response(_pull_stream(node, name))

    @router.route("POST", "/api/dmm/refresh")
    async def refresh(request: Request) -> Response:
        return json_response(await node.refresh())

    add_replication_routes(router, node)

    return router
