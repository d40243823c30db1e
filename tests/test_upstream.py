"""Upstream registry fallback against a real OCI registry (docker-registry, run locally):
a model no peer has is pulled from the registry, published to the swarm, resumed after
an interruption without fetching its bytes twice, and refused when the bytes are wrong."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.daemon import Node, open_node
from node.pull import PullError
from node.testing import node_config
from node.testregistry import OciRegistry
from node.upstream import MIN_PART, PARTS, pull_upstream
from storage.download import download_paths
from storage.manifest import MODEL_MEDIA_TYPE, Manifest
from storage.names import parse_model_name
from tests.conftest import MakeModel, dmm
from tests.test_node_cli import RunningNode
from tests.test_node_cli import _config as cli_config
from tests.test_registry_api import ollama_download

MiB = 1024 * 1024
STALL_AFTER = 3 * MiB  # a whole number of the pull's 1 MiB pieces


def _model_layer(manifest: Manifest) -> Any:
    layer = manifest.layer_of_type(MODEL_MEDIA_TYPE)
    assert layer is not None
    return layer


async def _collect(node: Node, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    async def keep(event: dict[str, Any]) -> None:
        events.append(event)

    with trio.fail_after(60):
        result = await node.pull(name, keep)
    return result, events


@pytest.mark.slow  # a second node joins, finds and pulls
async def test_a_model_no_peer_has_comes_from_the_registry_and_joins_the_swarm(
    tmp_path: Path, make_model: MakeModel, oci_registry: OciRegistry
) -> None:
    manifest = oci_registry.push_model(
        make_model("fallback.gguf", size=12 * MiB, seed=21), "library/fallback", "v1"
    )
    config = node_config(tmp_path, "a", upstream_registry=oci_registry.url)
    async with open_node(config) as a:
        result, events = await _collect(a, "fallback:v1")
        assert result["registry"] == oci_registry.url
        assert result["bytes_fetched"] == manifest.total_size
        statuses = [e["status"] for e in events]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        for layer in manifest.all_layers():
            mine = [e for e in events if e.get("digest") == layer.digest]
            assert mine and mine[-1]["completed"] == mine[-1]["total"] == layer.size
        assert a.store.verify("fallback:v1").ok
        async with httpx.AsyncClient(base_url=a.api_urls[0], timeout=30) as client:
            tags = (await client.get("/api/tags")).json()
        assert [m["name"] for m in tags["models"]] == ["fallback:v1"]
        # Published: a second node finds it on A, and pulls it from A, not the registry.
        b_config = node_config(tmp_path, "b", [a.host.listen_addrs[0]])
        async with open_node(b_config) as b:
            with trio.fail_after(30):
                while not (found := await b.find("fallback*", timeout=5))["models"]:
                    await trio.sleep(0.2)
            assert found["models"][0]["peers"] == [a.peer_id]
            from_swarm, _ = await _collect(b, "fallback:v1")
            assert from_swarm["peers"] == [a.peer_id] and "registry" not in from_swarm


async def test_unknown_model_and_no_registry_say_what_happened(
    tmp_path: Path, oci_registry: OciRegistry
) -> None:
    with_registry = node_config(tmp_path, "a", upstream_registry=oci_registry.url)
    async with open_node(with_registry) as a:
        with pytest.raises(PullError, match="no reachable peer has nowhere:v1, and http://"):
            await _collect(a, "nowhere:v1")
    async with open_node(node_config(tmp_path, "b")) as b:
        with pytest.raises(PullError, match=r"no \[api\] upstream_registry is set"):
            await _collect(b, "nowhere:v1")
    unreachable = node_config(tmp_path, "c", upstream_registry="http://127.0.0.1:9")
    async with open_node(unreachable) as c:
        with pytest.raises(PullError, match="could not be reached"):
            await _collect(c, "nowhere:v1")


class _Network(httpx.AsyncBaseTransport):
    """The network between the node and the registry: real, but it can stall blob
    responses after ``stall_after`` bytes, and it records what was asked and sent."""

    def __init__(
        self,
        stall_after: int | None = None,
        stalls_expected: int = 0,
        drop_starts: frozenset[int] = frozenset(),
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.stall_after = stall_after
        # Responses to ranges starting here are cut (a reset) at stall_after instead.
        self.drop_starts = drop_starts
        self.stalls_expected = stalls_expected
        self.stalled = 0
        self.all_stalled = trio.Event()
        self.ranges: dict[str, list[str]] = {}  # blob digest -> Range headers asked
        self.blob_bytes: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if "/blobs/" not in request.url.path:
            return response
        digest = request.url.path.rsplit("/", 1)[-1]
        self.ranges.setdefault(digest, []).append(request.headers.get("Range", ""))
        start = int(request.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0])
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Body(self, digest, response, drop=start in self.drop_starts),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Body(httpx.AsyncByteStream):
    def __init__(
        self, network: _Network, digest: str, response: httpx.Response, *, drop: bool
    ) -> None:
        self.network = network
        self.digest = digest
        self.response = response
        self.drop = drop

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        cuts = self.drop or self.network.stalls_expected
        limit = self.network.stall_after if cuts else None
        async for piece in self.response.aiter_raw():
            if limit is not None and sent + len(piece) >= limit:
                piece = piece[: limit - sent]
            sent += len(piece)
            bytes_of = self.network.blob_bytes
            bytes_of[self.digest] = bytes_of.get(self.digest, 0) + len(piece)
            yield piece
            if limit is not None and sent >= limit and self.drop:
                raise httpx.ReadError("connection reset by the test's network")
            if limit is not None and sent >= limit:
                self.network.stalled += 1
                if self.network.stalled == self.network.stalls_expected:
                    self.network.all_stalled.set()
                await trio.sleep_forever()

    async def aclose(self) -> None:
        await self.response.aclose()


async def test_an_interrupted_pull_resumes_without_fetching_bytes_twice(
    tmp_path: Path, make_model: MakeModel, oci_registry: OciRegistry
) -> None:
    manifest = oci_registry.push_model(
        make_model("resume.gguf", size=40 * MiB, seed=22), "library/resume", "v1"
    )
    layer = _model_layer(manifest)
    part_size = max(MIN_PART, math.ceil(layer.size / PARTS))
    parts = math.ceil(layer.size / part_size)
    assert parts == PARTS
    name = parse_model_name("resume:v1")
    config = node_config(tmp_path, "a", upstream_registry=oci_registry.url)

    async def quiet(event: dict[str, Any]) -> None:
        pass

    stalling = _Network(stall_after=STALL_AFTER, stalls_expected=parts)
    async with open_node(config) as a:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: pull_upstream(a, name, quiet, no_peer="", transport=stalling)
                )
                await stalling.all_stalled.wait()
                nursery.cancel_scope.cancel()
        data, progress = download_paths(a.store.cas, layer.digest)
        assert data.exists() and progress.exists()
        assert not a.store.cas.has(layer.digest)
        assert a.store.layout.read(name) is None
    # The node restarts; the pull asks only for what is not on disk yet.
    counting = _Network()
    async with open_node(config) as a:
        with trio.fail_after(60):
            result = await pull_upstream(a, name, quiet, no_peer="", transport=counting)
        assert result["bytes_resumed"] == parts * STALL_AFTER
        asked = counting.ranges[layer.digest]
        starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in asked)
        assert starts == [i * part_size + STALL_AFTER for i in range(parts)]
        assert counting.blob_bytes[layer.digest] == layer.size - parts * STALL_AFTER
        assert manifest.config.digest not in counting.ranges  # fetched before the stall
        assert a.store.verify("resume:v1").ok
        assert not data.exists() and not progress.exists()


async def test_wrong_bytes_from_the_registry_are_refused_and_nothing_is_placed(
    tmp_path: Path, make_model: MakeModel, oci_registry: OciRegistry
) -> None:
    manifest = oci_registry.push_model(
        make_model("corrupt.gguf", size=3 * MiB, seed=23), "library/corrupt", "v1"
    )
    layer = _model_layer(manifest)
    stored = oci_registry.blob_file(layer.digest)
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte off: only the sha256 can tell
    stored.write_bytes(bytes(raw))
    async with open_node(node_config(tmp_path, "a", upstream_registry=oci_registry.url)) as a:
        with pytest.raises(PullError, match=f"blob {layer.digest}: the registry sent bytes"):
            await _collect(a, "corrupt:v1")
        assert not a.store.cas.has(layer.digest)
        assert a.store.layout.read(parse_model_name("corrupt:v1")) is None
        assert [p.name for p in a.store.cas.blobs_dir.iterdir() if ".download" in p.name] == []


async def test_ollama_pulling_through_the_node_gets_what_no_peer_has_from_the_registry(
    tmp_path: Path, make_model: MakeModel, oci_registry: OciRegistry
) -> None:
    manifest = oci_registry.push_model(
        make_model("proxied.gguf", size=10 * MiB, seed=24), "library/proxied", "v1"
    )
    async with open_node(node_config(tmp_path, "a", upstream_registry=oci_registry.url)) as a:
        async with httpx.AsyncClient(base_url=a.api_urls[0], timeout=60) as client:
            with trio.fail_after(60):
                r = await client.get("/v2/library/proxied/manifests/v1")
                assert r.status_code == 200, r.text
                assert r.json() == json.loads(manifest.to_bytes())
                async with trio.open_nursery() as nursery:
                    for layer in r.json()["layers"] + [r.json()["config"]]:
                        nursery.start_soon(ollama_download, client, "library/proxied", layer)
                name = parse_model_name("proxied:v1")
                # Written after the last blob.
                await a.wait_until(lambda: a.store.layout.read(name) is not None)
                missing = await client.get("/v2/library/nowhere/manifests/v1")
                assert missing.status_code == 404
                [error] = missing.json()["errors"]
                assert error["code"] == "MANIFEST_UNKNOWN" and oci_registry.url in error["message"]
        assert a.store.verify("proxied:v1").ok


@pytest.mark.slow  # a node process and three dmm processes
def test_dmm_pull_says_the_model_came_from_the_registry(
    tmp_path: Path, make_model: MakeModel, oci_registry: OciRegistry
) -> None:
    oci_registry.push_model(make_model("cli.gguf", size=2 * MiB, seed=25), "library/from-cli", "v1")
    config = cli_config(tmp_path, "solo")
    # [api] is the file's last table: the registry goes into it.
    config.write_text(config.read_text() + f'upstream_registry = "{oci_registry.url}"\n')
    node = RunningNode(config)
    try:
        pulled = dmm(config, "pull", "from-cli:v1").stdout
        assert f"fetched from {oci_registry.url} (no peer had it)" in pulled
        assert "from-cli:v1" in dmm(config, "ls").stdout
        missing = dmm(config, "pull", "nowhere:v1", check=1)
        assert f"no reachable peer has nowhere:v1, and {oci_registry.url}" in missing.stderr
    finally:
        node.stop()


async def test_a_dropped_connection_resumes_the_part_where_it_broke(
    tmp_path: Path, make_model: MakeModel, oci_registry: OciRegistry
) -> None:
    manifest = oci_registry.push_model(
        make_model("dropped.gguf", size=40 * MiB, seed=26), "library/dropped", "v1"
    )
    layer = _model_layer(manifest)
    part_size = max(MIN_PART, math.ceil(layer.size / PARTS))
    first = [i * part_size for i in range(PARTS)]
    flaky = _Network(stall_after=STALL_AFTER, drop_starts=frozenset(first))

    async def quiet(event: dict[str, Any]) -> None:
        pass

    config = node_config(tmp_path, "a", upstream_registry=oci_registry.url)
    async with open_node(config) as a:
        with trio.fail_after(60):
            await pull_upstream(
                a, parse_model_name("dropped:v1"), quiet, no_peer="", transport=flaky
            )
        assert a.store.verify("dropped:v1").ok
    asked = flaky.ranges[layer.digest]
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in asked)
    assert starts == sorted(first + [s + STALL_AFTER for s in first]), (starts, part_size)
    assert flaky.blob_bytes[layer.digest] == layer.size  # no byte fetched twice
