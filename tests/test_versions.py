"""Signed version records of local changes: parents, heads, and records from peers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.identity import Identity
from node.versions import VersionBook
from protocols.errors import RemoteProtocolError
from protocols.records import VersionRecord
from storage.db import MetadataDB
from storage.names import parse_model_name
from storage.store import ModelStore
from tests.conftest import MakeModel


@pytest.fixture
def book(store: ModelStore) -> Iterator[VersionBook]:
    yield VersionBook(store.db, Identity.generate())


def test_each_change_is_a_signed_child_of_the_last(
    store: ModelStore, book: VersionBook, make_model: MakeModel
) -> None:
    first = store.add_model("demo", make_model("a.gguf", seed=1))
    v1 = book.record_local(first.name, first.digest, first.size)
    assert book.record_local(first.name, first.digest, first.size) == v1  # no change, no version
    second = store.add_model("demo", make_model("b.gguf", seed=2))
    v2 = book.record_local(second.name, second.digest, second.size)
    assert v2.parents == (v1.version_id,) and v2.hlc > v1.hlc
    assert v2.author == book.identity.peer_id_str
    assert VersionRecord.decode(v2.encode()) == v2
    assert [r.version_id for r in book.records(second.name)] == [v1.version_id, v2.version_id]
    assert book.latest(second.name) == v2


def test_records_from_peers_are_kept_and_can_diverge(book: VersionBook, tmp_path: Path) -> None:
    name = parse_model_name("shared:v1")
    ours = book.record_local(name, "sha256:" + "1" * 64, 10)
    peer = Identity.generate()
    theirs = VersionRecord.sign(
        model=ours.model,
        tag="v1",
        manifest_digest="sha256:" + "2" * 64,
        size=20,
        parents=[],
        hlc=ours.hlc + 1,
        signing_key=peer.signing_key,
    )
    assert book.accept(theirs) and not book.accept(theirs)
    assert {h.version_id for h in book.heads(name)} == {ours.version_id, theirs.version_id}
    merged = book.record_local(name, "sha256:" + "3" * 64, 30)
    assert set(merged.parents) == {ours.version_id, theirs.version_id}
    assert merged.hlc > theirs.hlc  # the clock observed the peer's time


def test_the_clock_survives_a_restart(tmp_path: Path) -> None:
    ident = Identity.generate()
    name = parse_model_name("m")
    with MetadataDB(tmp_path / "a.db") as db:
        first = VersionBook(db, ident).record_local(name, "sha256:" + "1" * 64, 1)
    with MetadataDB(tmp_path / "a.db") as db:
        second = VersionBook(db, ident).record_local(name, "sha256:" + "2" * 64, 1)
    assert second.hlc > first.hlc and second.parents == (first.version_id,)


def test_a_record_from_the_far_future_is_refused(book: VersionBook) -> None:
    peer = Identity.generate()
    future = VersionRecord.sign(
        model="registry.ollama.ai/library/m",
        tag="latest",
        manifest_digest="sha256:" + "4" * 64,
        size=1,
        parents=[],
        hlc=(time.time_ns() // 10**6 + 86_400_000) << 16,  # a day ahead
        signing_key=peer.signing_key,
    )
    with pytest.raises(RemoteProtocolError):
        book.accept(future)
    assert book.records("registry.ollama.ai/library/m:latest") == []
