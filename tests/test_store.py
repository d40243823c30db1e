"""The local store: add, import, list, remove, verify and gc on a real Ollama layout."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from storage.gguf import read_gguf_info
from storage.manifest import MODEL_MEDIA_TYPE, TEMPLATE_MEDIA_TYPE, parse_manifest
from storage.names import InvalidName
from storage.store import ModelNotFound, ModelStore, StoreError
from tests.conftest import MakeModel

MiB = 1024 * 1024


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and inode: 'nothing changed' means equal snapshots."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_ino)
    return out


def test_add_writes_an_ollama_manifest(store: ModelStore, make_model: MakeModel) -> None:
    gguf = make_model(size=3 * MiB)
    result = store.add_model("demo:v1", gguf, template="{{ .Prompt }}", params={"temperature": 0.5})
    path = store.models_dir / "manifests/registry.ollama.ai/library/demo/v1"
    raw = path.read_bytes()
    # Exactly the bytes Ollama would write: compact JSON, its field order.
    obj = json.loads(raw)
    assert list(obj) == ["schemaVersion", "mediaType", "config", "layers"]
    assert obj["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert raw == json.dumps(obj, separators=(",", ":")).encode()
    manifest = parse_manifest(raw)
    assert manifest.layers[0].media_type == MODEL_MEDIA_TYPE
    assert manifest.layers[1].media_type == TEMPLATE_MEDIA_TYPE
    model_blob = store.models_dir / "blobs" / ("sha256-" + result.model_blob[7:])
    assert model_blob.read_bytes() == gguf.read_bytes()
    config = json.loads(
        (store.models_dir / "blobs" / ("sha256-" + manifest.config.digest[7:])).read_bytes()
    )
    assert config["model_format"] == "gguf" and config["model_family"] == "llama"
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in manifest.layers]
    assert result.copied_bytes == gguf.stat().st_size
    # Chunks of the model blob are in the index and tile it.
    chunks = store.db.blob_chunks(result.model_blob)
    assert sum(c.length for c in chunks) == gguf.stat().st_size
    assert [m.name.display for m in store.list_models()] == ["demo:v1"]


def test_adding_again_copies_nothing(store: ModelStore, make_model: MakeModel) -> None:
    gguf = make_model()
    store.add_model("demo", gguf)
    before = _snapshot(store.models_dir)
    again = store.add_model("demo", gguf)
    assert again.copied_bytes == 0 and not again.changed
    assert _snapshot(store.models_dir) == before
    other = store.add_model("demo:copy", gguf)
    assert other.copied_bytes == 0 and other.model_blob == again.model_blob


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc",
        "a/../b",
        "/abs",
        "a\x00b",
        "x" * 256,
        "a/b/c/d",
        "model:",
        ":tag",
        "a b",
        "",
        "ns/../../x",
        "m:ta/g",
        "host/ns/",
        "-leading",
    ],
)
def test_bad_names_are_refused_and_change_nothing(
    store: ModelStore, make_model: MakeModel, bad: str
) -> None:
    gguf = make_model()
    before = _snapshot(store.models_dir)
    with pytest.raises(InvalidName):
        store.add_model(bad, gguf)
    assert _snapshot(store.models_dir) == before


def test_a_non_gguf_file_is_refused(store: ModelStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(StoreError, match="not a GGUF model"):
        store.add_model("junk", junk)
    assert store.cas.list_digests() == []


def _ollama_store(
    root: Path, store_like: ModelStore, make_model: MakeModel, names: list[str]
) -> ModelStore:
    """Build another Ollama models dir by adding models through a throwaway store."""
    other = ModelStore(root, root.parent / f"{root.name}.db", root.parent / f"{root.name}-cas")
    for i, name in enumerate(names):
        other.add_model(name, make_model(f"{root.name}-{i}.gguf", seed=i), template=f"T{i}")
    return other


def test_import_hard_links_and_is_idempotent(
    store: ModelStore, make_model: MakeModel, tmp_path: Path
) -> None:
    src = _ollama_store(tmp_path / "other", store, make_model, ["alpha", "beta:q4"])
    report = store.import_models(src.models_dir)
    assert sorted(report.models_new) == ["alpha:latest", "beta:q4"]
    assert report.blobs_linked > 0 and report.blobs_copied == 0 and not report.errors
    for entry in store.list_models():
        for layer in entry.manifest.all_layers():
            ours = store.cas.path(layer.digest)
            theirs = src.cas.path(layer.digest)
            assert ours.stat().st_ino == theirs.stat().st_ino  # linked, not copied
            assert ours.read_bytes() == theirs.read_bytes()
    # Manifests keep their exact bytes, so the digests Ollama shows stay the same.
    for entry in src.list_models():
        assert store.get(entry.name).raw == src.get(entry.name).raw
    before = _snapshot(store.models_dir)
    again = store.import_models(src.models_dir)
    assert not again.changed and sorted(again.models_unchanged) == ["alpha:latest", "beta:q4"]
    assert _snapshot(store.models_dir) == before


def test_import_of_own_store_indexes_blobs_ollama_wrote(
    store: ModelStore, make_model: MakeModel, tmp_path: Path
) -> None:
    # Ollama wrote these: same layout, but our database has never seen them.
    other = _ollama_store(store.models_dir, store, make_model, ["gamma"])
    other.close()
    fresh = ModelStore(store.models_dir, tmp_path / "fresh.db", tmp_path / "fresh-cas")
    report = fresh.import_models()
    assert report.models_new == ["gamma:latest"] and report.blobs_indexed >= 2
    assert not fresh.import_models().changed


def test_import_reports_a_corrupt_blob_and_imports_the_rest(
    store: ModelStore, make_model: MakeModel, tmp_path: Path
) -> None:
    src = _ollama_store(tmp_path / "other", store, make_model, ["good", "bad"])
    bad_blob = src.cas.path(src.get("bad").manifest.layers[0].digest)
    data = bytearray(bad_blob.read_bytes())
    data[len(data) // 2] ^= 1
    bad_blob.unlink()  # a new inode, so the good store's blob is not touched
    bad_blob.write_bytes(bytes(data))
    report = store.import_models(src.models_dir)
    assert report.models_new == ["good:latest"]
    assert len(report.errors) == 1 and "bad:latest" in report.errors[0]
    assert "hash" in report.errors[0]
    with pytest.raises(ModelNotFound):
        store.get("bad")
    # Nothing with a wrong name was left in our blobs.
    assert all(store.cas.verify(d).status == "ok" for d in store.cas.list_digests())


def test_import_reports_a_manifest_with_an_invalid_digest(
    store: ModelStore, tmp_path: Path
) -> None:
    src = tmp_path / "other"
    path = src / "manifests/registry.ollama.ai/library/broken/latest"
    path.parent.mkdir(parents=True)
    path.write_text(
        '{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}'
    )
    (src / "blobs").mkdir()
    report = store.import_models(src)
    assert len(report.errors) == 1 and "digest" in report.errors[0]
    assert store.list_models() == []


def test_remove_then_gc_frees_only_unreferenced_blobs(
    store: ModelStore, make_model: MakeModel
) -> None:
    shared = make_model("shared.gguf", seed=5)
    store.add_model("one", shared, template="A")
    store.add_model("two", shared, template="B")
    store.remove("one")
    assert [m.name.display for m in store.list_models()] == ["two:latest"]
    young = store.gc(older_than=3600)
    assert young.removed == [] and young.kept_young >= 1
    dry = store.gc(older_than=0, dry_run=True)
    assert dry.removed and all(store.cas.has(d) for d, _ in dry.removed)
    report = store.gc(older_than=0)
    assert {d for d, _ in report.removed} == {d for d, _ in dry.removed}
    # The model blob is shared with "two" and stays; "one"'s template and config go.
    two = store.get("two").manifest
    assert all(store.cas.has(d) for d in two.blob_digests())
    assert store.verify("two").ok
    with pytest.raises(ModelNotFound):
        store.remove("one")


def test_gc_never_deletes_a_blob_while_a_manifest_commit_holds_the_lock(
    store: ModelStore, make_model: MakeModel
) -> None:
    from storage.cas import StoreBusyError

    digest = store.cas.put_bytes(b"orphan")
    os.utime(store.cas.path(digest), (time.time() - 10**6,) * 2)
    with store.cas.commit_lock(), pytest.raises(StoreBusyError):
        store.cas.gc_lock(wait=0.2).__enter__()
    assert store.cas.has(digest)


def test_gc_refuses_while_a_manifest_is_broken(store: ModelStore, make_model: MakeModel) -> None:
    store.add_model("demo", make_model())
    broken = store.models_dir / "manifests/registry.ollama.ai/library/demo/broken"
    broken.write_text("{not json")
    with pytest.raises(StoreError, match="not a valid manifest"):
        store.gc(older_than=0)


def test_gc_removes_stale_temp_files(store: ModelStore) -> None:
    leftover = store.cas.blobs_dir / ".sha256-abc.123.tmp"
    leftover.write_bytes(b"half")
    os.utime(leftover, (time.time() - 10**6,) * 2)
    report = store.gc(older_than=60)
    assert report.temp_files == [leftover] and not leftover.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_corrupt_blobs_and_the_models_they_break(
    store: ModelStore, make_model: MakeModel, damage: str
) -> None:
    gguf = make_model(size=3 * MiB)
    result = store.add_model("one", gguf)
    store.add_model("two", gguf, template="x")
    path = store.cas.path(result.model_blob)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[12345] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    report = store.verify()
    assert not report.ok
    assert len(report.bad) == 1
    bad = report.bad[0]
    assert bad.result.digest == result.model_blob
    assert (
        bad.result.status
        == {"flip": "corrupt", "truncate": "truncated", "delete": "missing"}[damage]
    )
    assert sorted(bad.models) == ["one:latest", "two:latest"]


def test_show_reads_gguf_details(store: ModelStore, make_model: MakeModel) -> None:
    gguf = make_model(size=2 * MiB, chat_template="{{ .Messages }}")
    store.add_model("demo", gguf)
    info = store.model_info("demo")
    assert info is not None
    assert info.metadata == read_gguf_info(gguf).metadata


def test_packs_round_trip_through_the_store(store: ModelStore, make_model: MakeModel) -> None:
    result = store.add_model("demo", make_model(size=4 * MiB))
    original = store.cas.path(result.model_blob).read_bytes()
    store.pack_blob(result.model_blob)
    assert store.db.get_blob(result.model_blob).location == "pack"  # type: ignore[union-attr]
    assert store.cas.read_range(result.model_blob, 1000, 5000) == original[1000:6000]
    assert store.verify().ok
    store.unpack_blob(result.model_blob)
    assert store.cas.path(result.model_blob).read_bytes() == original


def test_metadata_only_edit_keeps_most_chunks_shared(
    store: ModelStore, make_model: MakeModel
) -> None:
    """A longer chat template shifts every tensor; content-defined chunks still line up."""
    a = make_model("a.gguf", size=64 * MiB, chat_template="{{ .Prompt }}", seed=3)
    b = make_model(
        "b.gguf", size=64 * MiB, chat_template="{{ .System }}\n" * 40 + "{{ .Prompt }}", seed=3
    )
    info_a, info_b = read_gguf_info(a), read_gguf_info(b)
    assert info_b.data_offset != info_a.data_offset  # the tensors did move
    ra = store.add_model("m:a", a)
    rb = store.add_model("m:b", b)
    ids_a = {c.digest for c in store.db.blob_chunks(ra.model_blob)}
    chunks_b = store.db.blob_chunks(rb.model_blob)
    shared = sum(c.length for c in chunks_b if c.digest in ids_a)
    assert shared / sum(c.length for c in chunks_b) >= 0.95


def test_import_copies_when_hard_links_are_impossible(
    store: ModelStore, make_model: MakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    src = _ollama_store(tmp_path / "other", store, make_model, ["alpha"])

    def cross_device(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    report = store.import_models(src.models_dir)
    assert report.models_new == ["alpha:latest"] and report.blobs_copied >= 2
    assert report.blobs_linked == 0
    for layer in store.get("alpha").manifest.all_layers():
        assert (
            store.cas.path(layer.digest).stat().st_ino != src.cas.path(layer.digest).stat().st_ino
        )
    assert store.verify().ok


def test_killed_add_leaves_no_model_and_no_named_blob(
    make_model: MakeModel, tmp_path: Path
) -> None:
    """SIGKILL in the middle of copying: nothing visible, and gc sweeps the temp file."""
    import signal
    import subprocess
    import sys

    gguf = make_model(size=192 * MiB)
    config = tmp_path / "node.toml"
    config.write_text('[node]\ndata_dir = "data"\n[storage]\nmodels_dir = "models"\n')
    blobs = tmp_path / "models" / "blobs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "add", "big", str(gguf), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        while not (blobs.is_dir() and any(p.name.endswith(".tmp") for p in blobs.iterdir())):
            assert proc.poll() is None, "add finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "models" / "manifests").exists()
    assert not any(p.name.startswith("sha256-") for p in blobs.iterdir())
    with ModelStore(tmp_path / "models", tmp_path / "data" / "dmm.db", tmp_path / "cas") as store:
        assert store.list_models() == []
        report = store.gc(older_than=0)
        assert len(report.temp_files) == 1
        assert list(blobs.iterdir()) == []


def test_gc_sweeps_abandoned_partials_but_not_one_being_fetched(store: ModelStore) -> None:
    from storage.chunks import chunk_bytes
    from storage.partial import PartialBlob

    data = b"z" * (3 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    chunks = chunk_bytes(data)
    busy = PartialBlob.open(store.cas, digest, len(data), chunks)
    busy.write_chunk(0, data[: chunks[0].length])
    busy.flush()
    abandoned_data = b"y" * MiB
    abandoned_digest = "sha256:" + hashlib.sha256(abandoned_data).hexdigest()
    abandoned = PartialBlob.open(
        store.cas, abandoned_digest, len(abandoned_data), chunk_bytes(abandoned_data)
    )
    abandoned.close()
    report = store.gc(older_than=0)
    names = {p.name for p in report.temp_files}
    assert any(abandoned_digest[7:] in n for n in names)
    assert not any(digest[7:] in n for n in names)
    busy.write_chunk(1, data[chunks[1].offset : chunks[1].offset + chunks[1].length])
    busy.discard()
