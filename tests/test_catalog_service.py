"""node/catalog_service.py: /dmm/catalog/1 between two real libp2p hosts on 127.0.0.1.

The server is backed by a real ModelStore (real GGUF models) and a VersionBook; sources that
hold or forge answers are wrappers around it, so every test exercises the real wire path.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import cbor2
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

import node.catalog_service as catalog_service
from node.catalog_service import (
    CATALOG_PROTOCOL,
    CatalogError,
    CatalogServer,
    ModelListResult,
    StoreCatalogSource,
    open_catalog_client,
)
from node.identity import Identity
from node.p2p import P2PHost, Stream, open_host
from node.versions import VersionBook
from protocols.catalog import (
    MAX_REQUEST_FRAME,
    ErrorReply,
    ModelSummary,
    decode_message,
)
from protocols.framing import FrameDecoder, encode_frame
from protocols.records import VersionRecord
from storage.names import parse_model_name
from storage.store import ModelStore
from tests.conftest import MakeModel

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
KiB = 1024

# display name -> seed of its GGUF. llama3:latest gets a version record up front; the
# others get theirs when the catalog first serves them.
MODELS = {
    "llama3:latest": 1,
    "llama3:q4": 2,
    "llama2:7b": 3,
    "mistral:q4": 4,
    "team/coder:q4": 5,
}


@pytest.fixture
def book(store: ModelStore) -> Iterator[VersionBook]:
    yield VersionBook(store.db, Identity.generate())


@pytest.fixture
def source(store: ModelStore, book: VersionBook, make_model: MakeModel) -> StoreCatalogSource:
    for name, seed in MODELS.items():
        added = store.add_model(name, make_model(f"{seed}.gguf", 64 * KiB, seed=seed))
        if name == "llama3:latest":
            book.record_local(added.name, added.digest, added.size)
    return StoreCatalogSource(store, book)


@asynccontextmanager
async def two_hosts(server: CatalogServer) -> AsyncIterator[tuple[P2PHost, P2PHost]]:
    """(server host serving `server`, client host connected to it)."""
    async with (
        open_host(create_new_key_pair(), [LOOPBACK]) as server_host,
        open_host(create_new_key_pair(), [LOOPBACK]) as client_host,
    ):
        server_host.set_stream_handler(CATALOG_PROTOCOL, server.handle)
        await client_host.connect(server_host.listen_addrs[0])
        yield server_host, client_host


def names(result: ModelListResult) -> set[str]:
    return {parse_model_name(f"{m.name}:{m.tag}").display for m in result.models}


def full(name: str) -> str:
    return parse_model_name(name).full


# --------------------------------------------------------------------- listing


async def test_list_models_matches_globs_and_names_real_versions(
    source: StoreCatalogSource, store: ModelStore, book: VersionBook
) -> None:
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(source)) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            llamas = await catalog.list_models("llama*")
            assert names(llamas) == {"llama3:latest", "llama3:q4", "llama2:7b"}
            assert not llamas.truncated
            q4 = await catalog.list_models("*:q4")
            assert names(q4) == {"llama3:q4", "mistral:q4", "team/coder:q4"}
            nothing = await catalog.list_models("gemma*")
            assert nothing == ModelListResult((), False)
            everything = await catalog.list_models("*")
            assert names(everything) == set(MODELS)

    for summary in everything.models:
        stored = store.get(f"{summary.name}:{summary.tag}")
        latest = book.latest(stored.name)  # created on demand for all but llama3:latest
        assert latest is not None
        assert summary == ModelSummary(
            name=f"{stored.name.host}/{stored.name.namespace}/{stored.name.model}",
            tag=stored.name.tag,
            version_id=latest.version_id,
            manifest_digest=stored.digest,
            size=stored.manifest.total_size,
            hlc=latest.hlc,
        )


async def test_list_is_truncated_at_the_limit(source: StoreCatalogSource) -> None:
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(source)) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            two = await catalog.list_models("llama*", limit=2)
            assert len(two.models) == 2 and two.truncated
            assert names(two) < {"llama3:latest", "llama3:q4", "llama2:7b"}
            three = await catalog.list_models("llama*", limit=3)
            assert len(three.models) == 3 and not three.truncated


# -------------------------------------------------------- versions and manifests


async def test_get_versions_returns_verified_records(
    source: StoreCatalogSource, store: ModelStore, book: VersionBook, make_model: MakeModel
) -> None:
    # A second version of llama3:latest, child of the first.
    changed = store.add_model("llama3", make_model("v2.gguf", 64 * KiB, seed=99))
    v2 = book.record_local(changed.name, changed.digest, changed.size)
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(source)) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            records = await catalog.get_versions("llama3")
            # Never recorded before: the server signs the record on first request.
            mistral = await catalog.get_versions("registry.ollama.ai/library/mistral:q4")
            assert catalog.dropped_records == 0

    assert records == book.records(changed.name)
    assert [r.manifest_digest for r in records][-1] == changed.digest
    assert records[-1] == v2 and v2.parents == (records[0].version_id,)
    assert all(r.author == book.identity.peer_id_str for r in records)
    (only,) = mistral
    assert only.name == full("mistral:q4")
    assert only.manifest_digest == store.get("mistral:q4").digest


async def test_get_manifest_by_name_and_by_digest_gives_the_exact_bytes(
    source: StoreCatalogSource, store: ModelStore
) -> None:
    stored = store.get("team/coder:q4")
    on_disk = (store.models_dir / stored.name.manifest_relpath()).read_bytes()
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(source)) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            by_name = await catalog.get_manifest("team/coder:q4")
            by_digest = await catalog.get_manifest(stored.digest)
    assert by_name == by_digest == (stored.digest, on_disk)


async def test_unknown_names_are_not_found_and_the_stream_goes_on(
    source: StoreCatalogSource,
) -> None:
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(source)) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            with pytest.raises(CatalogError) as versions:
                await catalog.get_versions("nosuchmodel:1b")
            with pytest.raises(CatalogError) as by_name:
                await catalog.get_manifest("nosuchmodel")
            with pytest.raises(CatalogError) as by_digest:
                await catalog.get_manifest("sha256:" + "ab" * 32)
            assert {versions.value.code, by_name.value.code, by_digest.value.code} == {"not-found"}
            assert names(await catalog.list_models("mistral")) == {"mistral:q4"}

            # An error leaving the client's block arrives as itself, not in a group.
            with pytest.raises(CatalogError, match="not-found"):
                async with open_catalog_client(client_host, server_host.peer_id) as again:
                    await again.get_manifest("nosuchmodel")


# ----------------------------------------------------------------- pipelining


class GatedSource:
    """The store, except that listing ``slow*`` waits for ``release``."""

    def __init__(self, inner: StoreCatalogSource) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = trio.Event()  # set (from the worker thread) once a gated call waits

    def list_models(self, glob: str, limit: int) -> tuple[list[ModelSummary], bool]:
        if glob.startswith("slow"):
            trio.from_thread.run_sync(self.entered.set)
            self.release.wait(20)
        return self.inner.list_models(glob, limit)

    def version_records(self, name: str) -> list[bytes]:
        return self.inner.version_records(name)

    def manifest(self, name_or_digest: str) -> tuple[str, bytes] | None:
        if name_or_digest.startswith("slow"):
            trio.from_thread.run_sync(self.entered.set)
            self.release.wait(20)
        return self.inner.manifest(name_or_digest)


async def test_pipelined_requests_from_many_tasks_are_answered_out_of_order(
    source: StoreCatalogSource, store: ModelStore
) -> None:
    gated = GatedSource(source)
    manifests: dict[str, tuple[str, bytes]] = {}
    versions: dict[str, list[VersionRecord]] = {}
    listings: dict[str, ModelListResult] = {}
    slow_done = trio.Event()
    try:
        with trio.fail_after(25):
            async with (
                two_hosts(CatalogServer(gated)) as (server_host, client_host),
                open_catalog_client(client_host, server_host.peer_id) as catalog,
            ):

                async def slow() -> None:
                    listings["slow*"] = await catalog.list_models("slow*")
                    slow_done.set()

                async def ask(name: str) -> None:
                    manifests[name] = await catalog.get_manifest(name)
                    versions[name] = await catalog.get_versions(name)

                async def ask_list(name: str) -> None:
                    listings[name] = await catalog.list_models(name)

                async with trio.open_nursery() as outer:
                    outer.start_soon(slow)
                    await gated.entered.wait()
                    # Everything below overtakes the request the server is still holding.
                    async with trio.open_nursery() as nursery:
                        for name in MODELS:
                            nursery.start_soon(ask, name)
                            nursery.start_soon(ask_list, name)
                    assert not slow_done.is_set()
                    gated.release.set()
    finally:
        gated.release.set()

    assert listings["slow*"] == ModelListResult((), False)
    for name in MODELS:
        stored = store.get(name)
        assert manifests[name] == (stored.digest, stored.raw)
        (record,) = versions[name]
        assert record.manifest_digest == stored.digest
        assert names(listings[name]) == {name}


# ------------------------------------------------------------- hostile peers


async def read_frames(stream: Stream, decoder: FrameDecoder, count: int | None) -> list[bytes]:
    """``count`` frames, or (``None``) every frame until end of stream."""
    frames: list[bytes] = []
    while count is None or len(frames) < count:
        while (payload := decoder.next_frame()) is not None:
            frames.append(payload)
        if count is not None and len(frames) >= count:
            break
        data = await stream.receive_some(decoder.max_read)
        if not data:
            decoder.eof()
            frames += iter(decoder.next_frame, None)
            break
        decoder.receive_data(data)
    return frames


async def test_garbage_gets_an_error_and_the_server_keeps_serving(
    source: StoreCatalogSource,
) -> None:
    server = CatalogServer(source)
    with trio.fail_after(20):
        async with two_hosts(server) as (server_host, client_host):
            raw = await client_host.open_stream(server_host.peer_id, CATALOG_PROTOCOL)
            decoder = FrameDecoder(2 * 1024 * 1024)

            # A well-framed request of no known type: answered, the stream goes on.
            bad = cbor2.dumps({"t": "delete-everything", "id": 7}, canonical=True)
            await raw.send_all(encode_frame(bad, MAX_REQUEST_FRAME))
            await raw.flush()
            (reply,) = await read_frames(raw, decoder, 1)
            assert decode_message(reply) == ErrorReply(
                7, "bad-request", "unknown catalog message type 'delete-everything'"
            )

            # Bytes that are not even a frame: a final error, then the server hangs up.
            await raw.send_all(b"\xff" * 16)
            await raw.flush()
            (final,) = await read_frames(raw, decoder, None)
            message = decode_message(final)
            assert isinstance(message, ErrorReply)
            assert (message.request_id, message.code) == (None, "bad-request")
            assert "exceeds" in message.message
            await raw.aclose()
            assert server.misbehaviour[client_host.peer_id] == 2

            # The same peer, well-behaved now, is served as before.
            async with open_catalog_client(client_host, server_host.peer_id) as catalog:
                assert names(await catalog.list_models("llama3:q4")) == {"llama3:q4"}


class ForgingSource:
    """Serves one good record of ``model`` among a tampered one and one of another model."""

    def __init__(self, good: VersionRecord, other: VersionRecord) -> None:
        self.good, self.other = good, other

    def list_models(self, glob: str, limit: int) -> tuple[list[ModelSummary], bool]:
        return [], False

    def version_records(self, name: str) -> list[bytes]:
        forged = dataclasses.replace(self.good, size=self.good.size + 1)  # signature now wrong
        return [forged.encode(), self.good.encode(), self.other.encode()]

    def manifest(self, name_or_digest: str) -> tuple[str, bytes] | None:
        return None


async def test_client_drops_forged_and_foreign_records() -> None:
    author = Identity.generate()

    def sign(model: str) -> VersionRecord:
        return VersionRecord.sign(
            model=model,
            tag="latest",
            manifest_digest="sha256:" + "1" * 64,
            size=123,
            parents=[],
            hlc=1 << 40,
            signing_key=author.signing_key,
        )

    good = sign("registry.ollama.ai/library/llama3")
    other = sign("registry.ollama.ai/library/mistral")
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(ForgingSource(good, other))) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            assert await catalog.get_versions("llama3") == [good]
            assert catalog.dropped_records == 2


# ---------------------------------------------------------- limits and failures


async def test_a_peer_over_its_stream_limit_is_refused(source: StoreCatalogSource) -> None:
    server = CatalogServer(source, max_concurrent_streams=1)
    with trio.fail_after(20):
        async with two_hosts(server) as (server_host, client_host):
            async with open_catalog_client(client_host, server_host.peer_id) as first:
                await first.list_models("*")  # its handler is running now
                async with open_catalog_client(client_host, server_host.peer_id) as second:
                    with pytest.raises(CatalogError) as refused:
                        await second.list_models("*")
                    assert refused.value.code == "refused"
                    # Every later request on a refused stream fails the same way.
                    with pytest.raises(CatalogError, match="refused"):
                        await second.get_versions("llama3")
                assert names(await first.list_models("mistral")) == {"mistral:q4"}
            assert server.misbehaviour[client_host.peer_id] == 0


async def test_timeouts_on_both_sides(source: StoreCatalogSource) -> None:
    gated = GatedSource(source)
    try:
        with trio.fail_after(20):
            async with (
                two_hosts(CatalogServer(gated, request_timeout=0.5)) as (server_host, client_host),
                open_catalog_client(client_host, server_host.peer_id) as catalog,
            ):
                # The client gives up first; the server's late reply is dropped.
                with pytest.raises(trio.TooSlowError):
                    await catalog.get_manifest("slow1", timeout=0.1)
                # The server gives up on a request its source does not answer.
                with pytest.raises(CatalogError) as slow:
                    await catalog.get_manifest("slow2")
                assert slow.value.code == "internal"
                gated.release.set()
                assert names(await catalog.list_models("llama2")) == {"llama2:7b"}
    finally:
        gated.release.set()


async def test_a_broken_stream_fails_pending_requests(source: StoreCatalogSource) -> None:
    async def reset_after_first_bytes(stream: Stream) -> None:
        await stream.receive_some()
        await stream.reset()

    with trio.fail_after(20):
        async with two_hosts(CatalogServer(source)) as (server_host, client_host):
            server_host.set_stream_handler(CATALOG_PROTOCOL, reset_after_first_bytes)
            async with open_catalog_client(client_host, server_host.peer_id) as catalog:
                with pytest.raises(trio.BrokenResourceError):
                    await catalog.list_models("*")
                with pytest.raises(trio.BrokenResourceError):
                    await catalog.get_versions("llama3")


async def test_the_callers_error_comes_back_plain_while_an_outer_scope_is_cancelled(
    source: StoreCatalogSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync task failed this way at node shutdown: the caller's error left
    open_catalog_client in a group with the reply reader's Cancelled, so `except
    BrokenResourceError` missed it and the node crashed."""
    monkeypatch.setattr(catalog_service, "_CLOSE_GRACE", 0.2)
    released = trio.Event()

    async def never_answers(stream: Stream) -> None:
        await released.wait()

    with trio.fail_after(20):
        async with two_hosts(CatalogServer(source)) as (server_host, client_host):
            # The reader is still waiting when the client closes, so the nursery's cancel
            # reaches it while the outer scope is cancelled too.
            server_host.set_stream_handler(CATALOG_PROTOCOL, never_answers)
            with trio.CancelScope() as outer, pytest.raises(ValueError, match="own failure"):
                async with open_catalog_client(client_host, server_host.peer_id):
                    outer.cancel()
                    raise ValueError("the caller's own failure")
            released.set()


async def test_an_idle_stream_is_ended_by_the_server(source: StoreCatalogSource) -> None:
    with trio.fail_after(20):
        async with two_hosts(CatalogServer(source, idle_timeout=0.2)) as (server_host, client):
            raw = await client.open_stream(server_host.peer_id, CATALOG_PROTOCOL)
            assert await raw.receive_some() == b""  # nothing owed, so a clean end
            await raw.aclose()


async def test_get_chunks_returns_the_whole_chunk_list_in_pages(
    store: ModelStore, book: VersionBook, make_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.catalog_service as service

    # Small pages, so a 12 MiB blob's list takes several round trips.
    monkeypatch.setattr(service, "MAX_CHUNKS_PER_REPLY", 3)
    added = store.add_model("paged:v1", make_model("paged.gguf", 12 * 1024 * KiB))
    expected = store.db.blob_chunks(added.model_blob)
    assert len(expected) > 6
    with trio.fail_after(20):
        async with (
            two_hosts(CatalogServer(StoreCatalogSource(store, book))) as (server_host, client_host),
            open_catalog_client(client_host, server_host.peer_id) as catalog,
        ):
            size, chunks = await catalog.get_chunks(added.model_blob)
            assert size == store.cas.path(added.model_blob).stat().st_size
            assert chunks == expected
            with pytest.raises(CatalogError) as excinfo:
                await catalog.get_chunks("sha256:" + "0" * 64)
            assert excinfo.value.code == "not-found"
