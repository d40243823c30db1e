"""DeltaTracker: a new model version assembled from the chunks this node already holds."""

from __future__ import annotations

import filecmp
import os
import sqlite3
from pathlib import Path

import pytest

from storage import db as dbmod
from storage.chunks import BlobIndex, ChunkRef, index_file
from storage.db import DeltaRecord, MetadataDB
from storage.delta import DeltaPlan, DeltaTracker
from storage.partial import PartialBlob
from storage.store import ModelStore
from storage.testmodels import DEFAULT_CHAT_TEMPLATE
from tests.conftest import MakeModel

MiB = 1024 * 1024
# A much longer chat template: the header grows, every tensor after it shifts.
NEW_TEMPLATE = DEFAULT_CHAT_TEMPLATE + "{# tool calls #}" * 200


def _two_versions(
    store: ModelStore, make_model: MakeModel, size: int
) -> tuple[str, Path, BlobIndex]:
    """Add v1 to the store; return (v1 blob digest, v2 file, v2's index as a peer sends it)."""
    v1 = make_model("v1.gguf", size, seed=11)
    v2 = make_model("v2.gguf", size, seed=11, chat_template=NEW_TEMPLATE)
    added = store.add_model("delta:v1", v1)
    return added.model_blob, v2, index_file(v2)


def _fetch_rest(partial: PartialBlob, plan: DeltaPlan, network: Path) -> int:
    """Stand-in for the transfer: read the chunks to fetch from the new file."""
    fetched = 0
    with open(network, "rb") as f:
        for i in plan.fetch:
            c = partial.chunks[i]
            f.seek(c.offset)
            partial.write_chunk(i, f.read(c.length))
            fetched += c.length
    return fetched


def test_metadata_only_change_fetches_almost_nothing(
    store: ModelStore, make_model: MakeModel
) -> None:
    size = 64 * MiB
    v1_blob, v2, target = _two_versions(store, make_model, size)
    assert target.digest != v1_blob
    tracker = DeltaTracker(store.db, store.cas)
    plan = tracker.create_delta("delta:v2", v1_blob, target.chunks, target.digest)
    assert plan.bytes_local + plan.bytes_fetch == target.size
    assert plan.chunks_local + plan.chunks_fetch == len(target.chunks)
    assert plan.bytes_fetch <= 0.05 * target.size
    assert plan.chunks_local > 0
    assert all(op.src_blob == v1_blob for op in plan.copy_local)

    partial = PartialBlob.open(store.cas, target.digest, target.size, target.chunks)
    copied = tracker.apply_delta(partial, plan)
    assert copied == plan.bytes_local
    assert sorted(partial.missing()) == plan.fetch
    assert not store.cas.has(target.digest)
    fetched = _fetch_rest(partial, plan, v2)
    path = partial.finish()
    assert filecmp.cmp(path, v2, shallow=False)
    assert partial.index is not None and partial.index.digest == target.digest

    record = tracker.record_delta("delta:v2", v1_blob, target.digest, plan, fetched)
    assert tracker.get_deltas("delta:v2") == [record]
    assert (record.bytes_local, record.bytes_fetched) == (copied, fetched)
    assert (record.chunks_local, record.chunks_fetched) == (plan.chunks_local, plan.chunks_fetch)
    assert record.source == v1_blob and record.target == target.digest
    assert tracker.get_deltas("other:latest") == []


def test_a_corrupt_local_chunk_is_fetched_instead(store: ModelStore, make_model: MakeModel) -> None:
    v1_blob, v2, target = _two_versions(store, make_model, 8 * MiB)
    tracker = DeltaTracker(store.db, store.cas)
    plan = tracker.create_delta("delta:v2", None, target.chunks, target.digest)
    victim = plan.copy_local[len(plan.copy_local) // 2]
    fetch_before = list(plan.fetch)
    # The stored v1 blob rots under the index: the index still claims the chunk.
    with open(store.cas.path(v1_blob), "r+b") as f:
        f.seek(victim.src_offset + 100)
        byte = f.read(1)
        f.seek(victim.src_offset + 100)
        f.write(bytes([byte[0] ^ 0x55]))
    partial = PartialBlob.open(store.cas, target.digest, target.size, target.chunks)
    copied = tracker.apply_delta(partial, plan)
    assert plan.fetch == sorted([*fetch_before, victim.index])
    assert victim not in plan.copy_local
    assert plan.bad_sources == {v1_blob}
    assert copied == plan.bytes_local
    assert partial.missing() == plan.fetch
    _fetch_rest(partial, plan, v2)
    assert filecmp.cmp(partial.finish(), v2, shallow=False)


def test_packed_sources_are_read_through_the_pack(store: ModelStore, make_model: MakeModel) -> None:
    v1_blob, v2, target = _two_versions(store, make_model, 8 * MiB)
    store.pack_blob(v1_blob)
    assert store.cas.location(v1_blob) == "pack"
    tracker = DeltaTracker(store.db, store.cas)
    plan = tracker.create_delta("delta:v2", v1_blob, target.chunks, target.digest)
    assert plan.chunks_local > 0 and plan.bytes_fetch < 0.25 * target.size
    partial = PartialBlob.open(store.cas, target.digest, target.size, target.chunks)
    assert tracker.apply_delta(partial, plan) == plan.bytes_local
    _fetch_rest(partial, plan, v2)
    assert filecmp.cmp(partial.finish(), v2, shallow=False)


def test_index_rows_for_vanished_blobs_are_not_sources(
    store: ModelStore, make_model: MakeModel
) -> None:
    v1_blob, _, target = _two_versions(store, make_model, 4 * MiB)
    os.unlink(store.cas.path(v1_blob))  # deleted behind the index's back
    tracker = DeltaTracker(store.db, store.cas)
    plan = tracker.create_delta("delta:v2", v1_blob, target.chunks, target.digest)
    assert plan.copy_local == []
    assert plan.bytes_fetch == target.size


def test_a_plan_for_another_blob_is_refused(store: ModelStore, make_model: MakeModel) -> None:
    v1_blob, _, target = _two_versions(store, make_model, 4 * MiB)
    tracker = DeltaTracker(store.db, store.cas)
    plan = tracker.create_delta("delta:v2", v1_blob, target.chunks, target.digest)
    other = store.db.blob_chunks(v1_blob)
    partial = PartialBlob.open(store.cas, v1_blob, sum(c.length for c in other), other)
    with pytest.raises(ValueError, match="does not match"):
        tracker.apply_delta(partial, plan)
    partial.discard()


def test_migration_from_the_previous_schema_keeps_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.db"
    blob = "sha256:" + "b" * 64
    previous = dbmod.MIGRATIONS[:-1]
    with monkeypatch.context() as m:
        m.setattr(dbmod, "MIGRATIONS", previous)
        m.setattr(dbmod, "SCHEMA_VERSION", len(previous))
        with MetadataDB(path) as db:
            db.put_blob_index(BlobIndex(blob, 5, (ChunkRef(0, 5, b"c" * 32),)), 7)
            db.upsert_model("registry.ollama.ai/library/x:latest", blob, 5)
            db.set_setting("k", "v")
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "deltas" not in tables
    with MetadataDB(path) as db:
        assert db.schema_version == len(dbmod.MIGRATIONS)
        assert db.blob_chunks(blob) == [ChunkRef(0, 5, b"c" * 32)]
        assert db.find_chunks([b"c" * 32, b"z" * 32]) == {b"c" * 32: db.find_chunk(b"c" * 32)}
        model = db.get_model("registry.ollama.ai/library/x:latest")
        assert model is not None and model.manifest_digest == blob
        assert db.get_setting("k") == "v"
        record = DeltaRecord("x:latest", None, blob, 1, 4, 1, 1, 123.0)
        db.add_delta(record)
    with MetadataDB(path) as db:
        assert db.deltas("x:latest") == [record]
