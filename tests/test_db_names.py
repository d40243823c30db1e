"""Metadata database migrations, and name validation under random input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import db as dbmod
from storage.chunks import BlobIndex, ChunkRef
from storage.db import SCHEMA_VERSION, DatabaseError, MetadataDB
from storage.manifest import ManifestError, parse_manifest
from storage.names import InvalidName, parse_digest, parse_model_name


def test_new_database_is_at_the_current_schema(tmp_path: Path) -> None:
    with MetadataDB(tmp_path / "m.db") as db:
        assert db.schema_version == SCHEMA_VERSION
        mode = db._query("PRAGMA journal_mode")[0][0]
        assert mode == "wal"


def test_migrations_run_in_order_and_keep_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.db"
    with MetadataDB(path) as db:
        db.put_blob_index(BlobIndex("sha256:" + "a" * 64, 3, (ChunkRef(0, 3, b"x" * 32),)), 1)
    # A later release adds a column: the old database is upgraded in place.
    monkeypatch.setattr(
        dbmod, "MIGRATIONS", (*dbmod.MIGRATIONS, "ALTER TABLE blobs ADD COLUMN note TEXT")
    )
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", len(dbmod.MIGRATIONS))
    with MetadataDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION + 1
        assert db.blob_chunks("sha256:" + "a" * 64) == [ChunkRef(0, 3, b"x" * 32)]
        assert db._query("SELECT note FROM blobs")[0][0] is None


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    MetadataDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(DatabaseError, match="newer than this dmm supports"):
        MetadataDB(path)


def test_a_corrupt_database_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError, match=r"m\.db"):
        MetadataDB(path)


def test_chunk_lookup_finds_every_blob_holding_a_chunk(tmp_path: Path) -> None:
    with MetadataDB(tmp_path / "m.db") as db:
        shared = b"s" * 32
        db.put_blob_index(BlobIndex("sha256:" + "1" * 64, 10, (ChunkRef(0, 10, shared),)), 1)
        db.put_blob_index(
            BlobIndex(
                "sha256:" + "2" * 64, 20, (ChunkRef(0, 10, b"o" * 32), ChunkRef(10, 10, shared))
            ),
            1,
        )
        found = sorted((loc.blob[7:8], loc.offset) for loc in db.find_chunk(shared))
        assert found == [("1", 0), ("2", 10)]
        refs, distinct, _, distinct_bytes = db.chunk_stats()
        assert (refs, distinct, distinct_bytes) == (3, 2, 20)


@pytest.mark.parametrize(
    "text,full",
    [
        ("llama3", "registry.ollama.ai/library/llama3:latest"),
        ("llama3:8b", "registry.ollama.ai/library/llama3:8b"),
        ("me/tiny:q4_0", "registry.ollama.ai/me/tiny:q4_0"),
        ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t"),
        ("hf.co/org/model.v2:Q4_K_M", "hf.co/org/model.v2:Q4_K_M"),
    ],
)
def test_valid_names(text: str, full: str) -> None:
    assert parse_model_name(text).full == full


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_random_names_never_escape_the_store(text: str) -> None:
    try:
        name = parse_model_name(text)
    except InvalidName as exc:
        assert "\n" not in str(exc)
        return
    root = Path("/store")
    path = (root / name.manifest_relpath()).resolve()
    assert root in path.parents
    assert len(name.manifest_relpath().parts) == 5


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_random_digests_are_rejected_or_canonical(text: str) -> None:
    try:
        digest = parse_digest(text)
    except InvalidName:
        return
    assert digest.startswith("sha256:") and len(digest) == 71


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_not_a_manifest(data: bytes) -> None:
    try:
        parse_manifest(data)
    except ManifestError as exc:
        assert "\n" not in str(exc)
