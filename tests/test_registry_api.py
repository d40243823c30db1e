"""The node's OCI ``/v2/`` API, driven with httpx exactly as ``ollama pull --insecure`` drives
it: manifest, HEAD, GET with redirect/Location, ranged GETs in parallel reassembled and
sha256-checked; through a second node that fetches from the swarm; and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.daemon import Node, open_node
from node.pull import PullError
from node.registry_api import BadRange, parse_range
from node.testing import node_config, open_swarm
from storage.manifest import MANIFEST_MEDIA_TYPE
from storage.names import parse_model_name
from storage.partial import PartialBlob
from tests.conftest import MakeModel

MiB = 1024 * 1024
PARTS = 4


async def _add(node: Node, make_model: MakeModel, name: str, size: int, seed: int = 0) -> None:
    path = make_model(f"{name.replace(':', '_')}.gguf", size=size, seed=seed)
    await trio.to_thread.run_sync(
        lambda: node.store.add_model(name, path, template="{{ .Prompt }}")
    )
    await node.refresh()


async def ollama_download(client: httpx.AsyncClient, repo: str, layer: dict[str, Any]) -> bytes:
    """One blob as the Ollama client downloads it (server/download.go)."""
    url = f"/v2/{repo}/blobs/{layer['digest']}"
    head = await client.head(url)
    assert head.status_code == 200, head.text
    size = int(head.headers["Content-Length"])
    assert size == layer["size"]
    # The GET that finds where to download from: a redirect whose Location is used.
    where = await client.get(url)
    assert where.status_code == 307
    direct = str(where.headers["Location"])
    assert direct.startswith(url)
    # Parts in parallel, each a ranged GET against that location.
    part = max(1, math.ceil(size / PARTS))
    pieces: dict[int, bytes] = {}

    async def fetch(start: int) -> None:
        end = min(size, start + part) - 1
        r = await client.get(direct, headers={"Range": f"bytes={start}-{end}"})
        assert r.status_code == 206, r.text
        assert r.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        pieces[start] = r.content

    async with trio.open_nursery() as nursery:
        for start in range(0, size, part):
            nursery.start_soon(fetch, start)
    data = b"".join(pieces[k] for k in sorted(pieces))
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    return data


async def test_the_oci_flow_as_the_ollama_client_performs_it(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_node(node_config(tmp_path, "solo")) as node:
        await _add(node, make_model, "served:q4", 6 * MiB)
        stored = node.store.get("served:q4")
        async with httpx.AsyncClient(base_url=node.api_urls[0], timeout=30) as client:
            with trio.fail_after(60):
                base = await client.get("/v2/")
                assert base.status_code == 200
                assert base.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                r = await client.get(
                    "/v2/library/served/manifests/q4", headers={"Accept": MANIFEST_MEDIA_TYPE}
                )
                assert r.status_code == 200
                assert r.content == stored.raw
                assert r.headers["Content-Type"] == MANIFEST_MEDIA_TYPE
                assert r.headers["Docker-Content-Digest"] == stored.digest
                assert int(r.headers["Content-Length"]) == len(stored.raw)
                head = await client.head("/v2/library/served/manifests/q4")
                assert head.status_code == 200 and head.content == b""
                assert head.headers["Docker-Content-Digest"] == stored.digest
                by_digest = await client.get(f"/v2/library/served/manifests/{stored.digest}")
                assert by_digest.content == stored.raw
                manifest = r.json()
                for layer in [manifest["config"], *manifest["layers"]]:
                    data = await ollama_download(client, "library/served", layer)
                    assert data == node.store.cas.path(layer["digest"]).read_bytes()
                # An older client follows the redirect and wants a Location there.
                model = manifest["layers"][0]
                url = f"/v2/library/served/blobs/{model['digest']}"
                followed = await client.get(url, follow_redirects=True)
                assert followed.status_code == 200 and "Location" in followed.headers
                assert hashlib.sha256(followed.content).hexdigest() == model["digest"][7:]
                # A suffix range, and ranges the blob cannot satisfy.
                tail = await client.get(url, headers={"Range": "bytes=-10"})
                assert tail.status_code == 206 and len(tail.content) == 10
                for bad in (f"bytes={model['size']}-", "bytes=5-2", "bytes=0-1,4-5", "lines=1-2"):
                    r = await client.get(url, headers={"Range": bad})
                    assert r.status_code == 416, bad
                    assert r.headers["Content-Range"] == f"bytes */{model['size']}"
                    assert r.json()["errors"][0]["code"] == "SIZE_INVALID"


async def test_bad_names_digests_and_writes_get_oci_errors_and_store_nothing(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_node(node_config(tmp_path, "solo")) as node:
        await _add(node, make_model, "kept:v1", 1 * MiB)
        before = sorted(p.name for p in node.store.models_dir.rglob("*"))
        missing = "sha256:" + "0" * 64
        cases = [
            ("GET", "/v2/library/nobody/manifests/latest", 404, "MANIFEST_UNKNOWN"),
            ("GET", f"/v2/library/kept/manifests/{missing}", 404, "MANIFEST_UNKNOWN"),
            ("GET", "/v2/library/bad$name/manifests/latest", 400, "NAME_INVALID"),
            ("GET", "/v2/library/..%2F..%2Fetc/manifests/passwd", 400, "NAME_INVALID"),
            ("GET", "/v2/a/b/c/d/manifests/latest", 400, "NAME_INVALID"),
            ("GET", "/v2/library/kept/manifests/sha256:zz", 400, "DIGEST_INVALID"),
            ("GET", "/v2/library/kept/blobs/sha256:../../x", 400, "DIGEST_INVALID"),
            ("HEAD", f"/v2/library/kept/blobs/{missing}", 404, None),
            ("GET", f"/v2/library/kept/blobs/{missing}", 404, "BLOB_UNKNOWN"),
            ("GET", "/v2/_catalog", 404, "NAME_UNKNOWN"),
            ("PUT", "/v2/library/kept/manifests/v2", 405, "UNSUPPORTED"),
            ("POST", "/v2/library/kept/blobs/uploads/", 405, "UNSUPPORTED"),
            ("DELETE", "/v2/library/kept/manifests/v1", 405, "UNSUPPORTED"),
        ]
        async with httpx.AsyncClient(base_url=node.api_urls[0], timeout=30) as client:
            with trio.fail_after(60):
                for method, path, status, code in cases:
                    r = await client.request(method, path, content=b"{}")
                    assert r.status_code == status, (method, path, r.text)
                    if code is not None:
                        [error] = r.json()["errors"]
                        assert error["code"] == code and error["message"], (path, error)
                assert (await client.get("/api/health")).status_code == 200  # still up
        assert sorted(p.name for p in node.store.models_dir.rglob("*")) == before


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 100)),
        ("bytes=90-500", 100, (90, 100)),
        ("bytes=-30", 100, (70, 100)),
        ("bytes=-300", 100, (0, 100)),
        ("bytes=99-99", 100, (99, 100)),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", ["bytes=100-", "bytes=-0", "bytes=-", "bytes=5-4", "bytes=0-1,3-4", "items=0-1", ""]
)
def test_parse_range_refuses(header: str) -> None:
    with pytest.raises(BadRange):
        parse_range(header, 100)


@pytest.mark.slow  # two nodes and a swarm fetch
async def test_a_model_only_on_a_is_pulled_through_b_from_the_swarm(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, "remote:v1", 12 * MiB, seed=3)
        source = a.store.get("remote:v1")
        name = parse_model_name("remote:v1")
        assert b.store.layout.read(name) is None
        async with httpx.AsyncClient(base_url=b.api_urls[0], timeout=60) as client:
            with trio.fail_after(90):
                r = await client.get("/v2/library/remote/manifests/v1")
                assert r.status_code == 200, r.text
                assert r.content == source.raw
                assert r.headers["Docker-Content-Digest"] == source.digest
                manifest = json.loads(r.content)
                model = manifest["layers"][0]
                # The blob is not on B yet: HEAD knows its size from the manifest.
                assert not b.store.cas.has(model["digest"])
                head = await client.head(f"/v2/library/remote/blobs/{model['digest']}")
                assert int(head.headers["Content-Length"]) == model["size"]
                # Parallel ranged GETs (and a whole-blob GET) share one swarm fetch.
                url = f"/v2/library/remote/blobs/{model['digest']}?direct=1"
                whole: list[bytes] = []

                async def get_whole() -> None:
                    r = await client.get(url)
                    assert r.status_code == 200 and r.headers["Location"].endswith("?direct=1")
                    whole.append(r.content)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(get_whole)
                    for layer in [manifest["config"], *manifest["layers"]]:
                        nursery.start_soon(ollama_download, client, "library/remote", layer)
                assert hashlib.sha256(whole[0]).hexdigest() == model["digest"][7:]
                # Every blob is on B now: B wrote the manifest and holds the model.
                await b.wait_until(lambda: b.store.layout.read(name) is not None)
        assert b.store.get("remote:v1").raw == source.raw
        assert b.store.verify("remote:v1").ok


async def test_a_client_that_hangs_up_stops_the_blob_being_read(
    tmp_path: Path, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    """The Ollama client closes the whole-blob GET as soon as it has the headers; the node
    must not go on reading the blob from disk for nobody."""
    caplog.set_level(logging.INFO, logger="dmm.registry")
    async with open_node(node_config(tmp_path, "solo")) as node:
        await _add(node, make_model, "big:v1", 32 * MiB)
        layer = node.store.get("big:v1").manifest.layers[0]
        host, port = node.api_urls[0].removeprefix("http://").rsplit(":", 1)
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream(host, int(port))
            request = (
                f"GET /v2/library/big/blobs/{layer.digest}?direct=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            await stream.send_all(request.encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200")
            await stream.aclose()
            while not (left := [r for r in caplog.records if "client left" in r.message]):
                await trio.sleep(0.05)  # no event to wait on: the node only logs it
        sent = int(left[0].message.split(" after ")[1].split()[0])
        assert sent < layer.size


@pytest.mark.slow  # the failed fetch asks the DHT for other holders first
async def test_a_blob_another_pull_holds_is_waited_for_and_a_failed_fetch_is_an_oci_error(
    tmp_path: Path, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dmm.registry")
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, "held:v1", 3 * MiB, seed=5)
        await _add(a, make_model, "lost:v1", 2 * MiB, seed=6)
        held = a.store.get("held:v1").manifest.layers[0]
        lost = a.store.get("lost:v1").manifest.layers[0]
        async with httpx.AsyncClient(base_url=b.api_urls[0], timeout=60) as client:
            with trio.fail_after(90):
                for repo in ("held", "lost"):
                    r = await client.get(f"/v2/library/{repo}/manifests/v1")
                    assert r.status_code == 200, r.text
                # Another fetch (as /api/pull would) holds the blob's partial on B.
                chunks = a.store.db.blob_chunks(held.digest)
                other = PartialBlob.open(b.store.cas, held.digest, held.size, chunks)
                got: list[httpx.Response] = []

                async def get_held() -> None:
                    url = f"/v2/library/held/blobs/{held.digest}"
                    got.append(await client.get(url, headers={"Range": "bytes=0-99"}))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(get_held)
                    while not any("another pull" in r.message for r in caplog.records):
                        await trio.sleep(0.05)  # no event to wait on: the node only logs it
                    assert not got  # the GET waits for that fetch
                    other.close()  # that fetch gives up; ours takes over
                assert got[0].status_code == 206 and len(got[0].content) == 100
                # A blob its only holder lost: the fetch fails, the client is told.
                a.store.cas.delete(lost.digest)
                url = f"/v2/library/lost/blobs/{lost.digest}"
                r = await client.get(url, headers={"Range": "bytes=0-9"})
                assert r.status_code == 502
                [error] = r.json()["errors"]
                assert error["code"] == "BLOB_UNKNOWN" and lost.digest in error["message"]
                assert not b.store.cas.has(lost.digest)
                # The whole-blob GET has sent its headers already: its body is cut short.
                with pytest.raises(httpx.RemoteProtocolError):
                    await client.get(f"{url}?direct=1")
                assert (await client.get("/v2/")).status_code == 200  # the node is fine


async def test_a_swarm_fetch_that_fails_midway_is_a_pull_error_not_a_group(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """fetch_layer's failure inside its nursery reaches callers (/api/pull, /v2/) as a
    PullError; trio used to hand them an ExceptionGroup they did not catch."""
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, "gone:v1", 2 * MiB, seed=7)
        model = a.store.get("gone:v1").manifest.layers[0]
        # A still lists the chunks, but the bytes it holds are no longer them.
        path = a.store.cas.path(model.digest)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))

        async def quiet(event: dict[str, Any]) -> None:
            pass

        with trio.fail_after(90), pytest.raises(PullError, match="could not be fetched"):
            await b.pull("gone:v1", quiet)
