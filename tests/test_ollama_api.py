"""Ollama's own Python client against real nodes: list, show, copy, delete, create from
uploaded blobs, pull through another node, push; bad input answered as Ollama answers it,
with nothing stored; a pulled model listed by Ollama's own listing logic."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
import trio

from node.daemon import Node, open_node
from node.testing import node_config, open_swarm
from storage.names import parse_model_name
from tests.conftest import MakeModel, dmm

MiB = 1024 * 1024


async def _add(node: Node, make_model: MakeModel, name: str, size: int = MiB, **kw: Any) -> Path:
    path = make_model(f"{name.replace(':', '_').replace('/', '_')}.gguf", size=size)
    await trio.to_thread.run_sync(lambda: node.store.add_model(name, path, **kw))
    await node.refresh()
    return path


async def _connected(node: Node, peer: Node) -> None:
    """Wait until ``node`` has dialled its bootstrap ``peer`` (it does so in the background)."""
    with trio.fail_after(20):
        await node.host.wait_connected(peer.peer_id)


def _store_files(models_dir: Path) -> set[str]:
    """Every file under the store's manifests/ and blobs/, to prove nothing was written."""
    found = set()
    for sub in ("manifests", "blobs"):
        for root, _, files in os.walk(models_dir / sub):
            found.update(str(Path(root, f).relative_to(models_dir)) for f in files)
    return found


def ollama_list(models_dir: Path) -> dict[str, dict[str, Any]]:
    """What `ollama list` shows, found the way Ollama finds it (server/images.go Manifests):
    every file at manifests/<host>/<namespace>/<model>/<tag> that parses as a manifest whose
    config and layers are blobs/sha256-<hex> files of their stated sizes. Written here from
    Ollama's rules, independent of dmm's storage code."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((models_dir / "manifests").glob("*/*/*/*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        host, namespace, model = path.parts[-4:-1]
        manifest = json.loads(path.read_bytes())
        for layer in [manifest["config"], *manifest["layers"]]:
            blob = models_dir / "blobs" / layer["digest"].replace(":", "-")
            assert blob.stat().st_size == layer["size"], blob
        config_blob = models_dir / "blobs" / manifest["config"]["digest"].replace(":", "-")
        config = json.loads(config_blob.read_bytes())
        short = f"{model}:{path.name}"
        if (host, namespace) != ("registry.ollama.ai", "library"):
            short = f"{namespace}/{short}" if host == "registry.ollama.ai" else f"{host}/{short}"
        out[short] = {
            "digest": hashlib.sha256(path.read_bytes()).hexdigest(),
            "family": config.get("model_family"),
        }
    return out


async def test_list_show_copy_delete_with_the_official_client(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_node(node_config(tmp_path, "solo")) as node:
        await _add(
            node,
            make_model,
            "demo:v1",
            template="{{ .System }} {{ .Prompt }}",
            system="be brief",
            params={"temperature": 0.5, "stop": ["<|end|>", "User:"]},
            license_text="MIT",
        )
        client = ollama.AsyncClient(host=node.api_urls[0])
        with trio.fail_after(30):
            listed = await client.list()
            assert [m.model for m in listed.models] == ["demo:v1"]
            assert listed.models[0].details is not None
            assert listed.models[0].details.family == "llama"
            shown = await client.show("demo:v1")
            assert shown.modelinfo is not None
            assert shown.modelinfo["general.architecture"] == "llama"
            assert shown.modelinfo["general.parameter_count"] > 0
            assert shown.template == "{{ .System }} {{ .Prompt }}"
            assert shown.license == "MIT"
            assert shown.parameters is not None
            assert shown.parameters.splitlines() == [
                f'{"stop":<30} "<|end|>"',
                f'{"stop":<30} "User:"',
                f"{'temperature':<30} 0.5",
            ]
            assert shown.modelfile is not None and 'TEMPLATE """{{ .System }}' in shown.modelfile
            assert shown.details is not None and shown.details.format == "gguf"
            assert shown.modified_at is not None

            assert (await client.copy("demo:v1", "team/demo:copy")).status == "success"
            names = {m.model for m in (await client.list()).models}
            assert names == {"demo:v1", "team/demo:copy"}
            original, copied = node.store.get("demo:v1"), node.store.get("team/demo:copy")
            assert copied.raw == original.raw  # same manifest, so the same blobs

            assert (await client.delete("team/demo:copy")).status == "success"
            assert [m.model for m in (await client.list()).models] == ["demo:v1"]
            with pytest.raises(ollama.ResponseError) as missing:
                await client.delete("team/demo:copy")
            assert missing.value.status_code == 404
            assert missing.value.error == "model 'team/demo:copy' not found"
            with pytest.raises(ollama.ResponseError) as unknown:
                await client.show("nope:latest")
            assert unknown.value.status_code == 404
            assert unknown.value.error == "model 'nope:latest' not found"
            with pytest.raises(ollama.ResponseError) as no_source:
                await client.copy("nope", "other")
            assert no_source.value.status_code == 404
            # The original's blobs were never touched by deleting its copy.
            assert node.store.verify("demo:v1").ok


async def test_create_from_uploaded_blobs(tmp_path: Path, make_model: MakeModel) -> None:
    weights = make_model("weights.gguf", size=2 * MiB)
    async with open_node(node_config(tmp_path, "maker")) as node:
        client = ollama.AsyncClient(host=node.api_urls[0])
        with trio.fail_after(30):
            digest = await client.create_blob(weights)
            assert digest == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
            assert node.store.cas.path(digest).read_bytes() == weights.read_bytes()
            # The upload is indexed like any blob, so peers can fetch it in chunks.
            assert node.store.db.blob_chunks(digest)
            # Uploading a blob the store has answers at once, and the connection stays usable
            # for the next request (the unread body must not poison keep-alive).
            assert await client.create_blob(weights) == digest
            statuses = [
                p.status
                async for p in await client.create(
                    "made:v1",
                    files={"weights.gguf": digest},
                    template="{{ .Prompt }}",
                    system="you are terse",
                    parameters={"num_ctx": 2048},
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                )
            ]
            assert statuses[0] == "parsing GGUF"
            assert f"using existing layer {digest}" in statuses
            assert statuses[-2:] == ["writing manifest", "success"]
            shown = await client.show("made:v1")
            assert shown.template == "{{ .Prompt }}"
            assert shown.parameters == f"{'num_ctx':<30} 2048"
            assert shown.modelinfo is not None and shown.modelinfo["general.architecture"]
            manifest = node.store.get("made:v1").manifest
            assert [layer.media_type.rsplit(".", 1)[-1] for layer in manifest.layers] == [
                "model",
                "template",
                "system",
                "params",
                "messages",
            ]
            # From a base model: its layers, with the system prompt replaced.
            done = await client.create("made:v2", from_="made:v1", system="you are chatty")
            assert done.status == "success"
            v2 = node.store.get("made:v2").manifest
            assert v2.layer_of_type("model") == manifest.layer_of_type("model")
            assert node.store.text_layer(v2, "system") == "you are chatty"
            assert node.store.text_layer(v2, "template") == "{{ .Prompt }}"
            assert {m.model for m in (await client.list()).models} == {"made:v1", "made:v2"}

            before = _store_files(node.store.models_dir)
            absent = "sha256:" + "0" * 64
            for request, status in (
                ({"model": "bad:v1", "files": {"w.gguf": absent}}, 400),  # never uploaded
                ({"model": "bad:v1", "files": {"../w.gguf": digest}}, 400),
                ({"model": "bad:v1", "files": {"w.gguf": "sha256:../../etc"}}, 400),
                ({"model": "bad:v1"}, 400),
                ({"model": "../../etc", "files": {"w.gguf": digest}}, 400),
                ({"model": "bad:v1", "from": "nope:v1"}, 404),
            ):
                with pytest.raises(ollama.ResponseError) as refused:
                    await client.create(**_client_args(request))
                assert refused.value.status_code == status, request
            assert _store_files(node.store.models_dir) == before


def _client_args(request: dict[str, Any]) -> dict[str, Any]:
    args = dict(request)
    if "from" in args:
        args["from_"] = args.pop("from")
    return args


async def test_bad_input_gets_ollama_errors_and_stores_nothing(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_node(node_config(tmp_path, "strict")) as node:
        await _add(node, make_model, "keep:v1")
        before = _store_files(node.store.models_dir)
        good = b"the real bytes"
        wrong = b"other bytes"
        digest = "sha256:" + hashlib.sha256(good).hexdigest()
        async with httpx.AsyncClient(base_url=node.api_urls[0], timeout=30) as http:
            with trio.fail_after(30):
                r = await http.post(f"/api/blobs/{digest}", content=wrong)
                assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
                assert (await http.head(f"/api/blobs/{digest}")).status_code == 404
                r = await http.post("/api/blobs/sha256:..%2F..%2Fetc", content=good)
                assert r.status_code in (400, 404)
                r = await http.post("/api/blobs/not-a-digest", content=good)
                assert r.status_code == 400 and "invalid digest" in r.json()["error"]
                assert _store_files(node.store.models_dir) == before
                # Malformed JSON and missing fields.
                r = await http.post("/api/show", content=b"{not json")
                assert r.status_code == 400 and r.json()["error"].startswith("invalid JSON")
                r = await http.post("/api/show", json={})
                assert r.status_code == 400 and r.json() == {"error": "model is required"}
                r = await http.post("/api/copy", json={"source": "keep:v1"})
                assert r.status_code == 400
                # Names that would escape the models directory.
                for method, path, body in (
                    ("POST", "/api/show", {"model": "../../etc"}),
                    ("POST", "/api/pull", {"model": "../../etc/passwd"}),
                    ("POST", "/api/push", {"model": "a/../../b"}),
                    ("DELETE", "/api/delete", {"model": "../keep:v1"}),
                    ("POST", "/api/copy", {"source": "keep:v1", "destination": "../../x"}),
                ):
                    r = await http.request(method, path, json=body)
                    assert r.status_code == 400, (path, r.text)
                    assert set(r.json()) == {"error"}
                # The right bytes are accepted, then HEAD sees them.
                r = await http.post(f"/api/blobs/{digest}", content=good)
                assert r.status_code == 201
                assert (await http.head(f"/api/blobs/{digest}")).status_code == 200
                assert (await http.post(f"/api/blobs/{digest}", content=good)).status_code == 200
            # Answered before its body was read (blob already here, bad digest), a request
            # still leaves its connection usable: the next request on it is answered too.
            host, port = node.api_urls[0].removeprefix("http://").rsplit(":", 1)
            for target in (digest, "not-a-digest"):
                with trio.fail_after(20):
                    answers = await _two_requests_on_one_connection(
                        host, int(port), target, bytes(4 * MiB)
                    )
                assert answers.count(b"HTTP/1.1 ") == 2, answers
                assert b'{"version":' in answers
        after = _store_files(node.store.models_dir)
        assert after - before == {f"blobs/sha256-{digest[7:]}"}
        assert node.store.verify().ok  # the node stayed up and the store is whole


async def _two_requests_on_one_connection(host: str, port: int, digest: str, body: bytes) -> bytes:
    """A blob upload and a GET pipelined on one connection; everything the server sent."""
    upload = (
        f"POST /api/blobs/{digest} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    version = f"GET /api/version HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(upload + version)
        received = b""
        with trio.move_on_after(5):
            while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
                data = await stream.receive_some()
                if not data:
                    break
                received += data
    return received


@pytest.mark.slow
async def test_pull_through_a_node_and_push_with_the_official_client(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, "shared:q4", size=4 * MiB, template="{{ .Prompt }}")
        client_b = ollama.AsyncClient(host=b.api_urls[0])
        await _connected(b, a)
        with trio.fail_after(60):
            progress = [p async for p in await client_b.pull("shared:q4", stream=True)]
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        layers = [p for p in progress if p.digest]
        assert layers and all(p.total and p.completed is not None for p in layers)
        assert any(p.completed == p.total for p in layers)
        assert [m.model for m in (await client_b.list()).models] == ["shared:q4"]
        assert b.store.get("shared:q4").raw == a.store.get("shared:q4").raw
        # Living beside Ollama: the pulled model is what Ollama's own listing finds, and
        # no temp file is left where Ollama looks.
        listed = ollama_list(b.store.models_dir)
        assert listed["shared:q4"]["digest"] == b.store.get("shared:q4").digest[7:]
        assert listed["shared:q4"]["family"] == "llama"
        leftovers = [p for p in (b.store.models_dir / "blobs").iterdir() if p.name[0] == "."]
        assert leftovers == []

        # Push: a model only B has is published to the swarm, and A can then pull it.
        # Added to the store behind the node's back: not published until pushed.
        weights = make_model("fromb.gguf", size=MiB)
        await trio.to_thread.run_sync(lambda: b.store.add_model("fromb:v1", weights))
        assert b.book.records(parse_model_name("fromb:v1")) == []
        with trio.fail_after(30):
            pushed = [p.status async for p in await client_b.push("fromb:v1", stream=True)]
        assert pushed[0] == "retrieving manifest" and pushed[-2:] == ["pushing manifest", "success"]
        assert len(b.book.records(parse_model_name("fromb:v1"))) == 1
        with trio.fail_after(60):
            done = await ollama.AsyncClient(host=a.api_urls[0]).pull("fromb:v1")
        assert done.status == "success"
        assert a.store.get("fromb:v1").raw == b.store.get("fromb:v1").raw
        with pytest.raises(ollama.ResponseError) as missing:
            await client_b.push("nope:v1")
        assert missing.value.status_code == 404

        # `dmm push` talks to the running node the same way.
        cli = cli_config(tmp_path, b)
        proc = await trio.to_thread.run_sync(lambda: dmm(cli, "push", "shared:q4"))
        assert "pushed shared:q4" in proc.stdout
        proc = await trio.to_thread.run_sync(lambda: dmm(cli, "push", "nope:v1", check=1))
        assert "model 'nope:v1' not found" in proc.stderr
        proc = await trio.to_thread.run_sync(lambda: dmm(cli, "push", "../../etc", check=2))
        assert ".." in proc.stderr


def cli_config(root: Path, node: Node) -> Path:
    """A config for `dmm` commands that talk to ``node``'s API (its port was chosen by the OS)."""
    path = root / f"cli-{node.config.node.name}.toml"
    listen = node.api_urls[0].removeprefix("http://")
    path.write_text(f'[api]\nlisten = "{listen}"\n')
    return path


async def test_delete_removes_only_the_name(tmp_path: Path, make_model: MakeModel) -> None:
    async with open_node(node_config(tmp_path, "del")) as node:
        await _add(node, make_model, "gone:v1")
        blobs = node.store.get("gone:v1").manifest.blob_digests()
        client = ollama.AsyncClient(host=node.api_urls[0])
        with trio.fail_after(30):
            await client.delete("gone:v1")
        assert node.store.layout.read(parse_model_name("gone:v1")) is None
        # Blobs stay until gc (another model may share them), as Ollama's store allows.
        assert all(node.store.cas.location(d) == "file" for d in blobs)
        assert (await node.status())["models"] == 0
