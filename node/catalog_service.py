"""``/dmm/catalog/1`` over libp2p streams: the serving side, its store-backed source, the client.

The protocol itself (messages, limits, the state machine) is sans-IO in
``protocols/catalog.py``; this module owns the trio tasks, streams and timers around it.

Server::

    server = CatalogServer(StoreCatalogSource(store, book))
    host.set_stream_handler(PROTOCOL_ID, server.handle)

``handle`` answers pipelined requests concurrently (so possibly out of order), runs every
store or database call in a worker thread, and never raises: a broken stream is reset and
logged in one line, a peer that breaks the protocol gets a final ``ErrorReply(None, ...)``
and is counted in ``misbehaviour``.

Client::

    async with open_catalog_client(host, peer_id) as catalog:
        listing = await catalog.list_models("llama*")
        records = await catalog.get_versions("llama3:8b")   # verified VersionRecords
        digest, raw = await catalog.get_manifest("llama3:8b")

One stream carries every request of a client; several tasks may call it at once. Errors:
``CatalogError(code, message)`` when the server refuses, ``trio.BrokenResourceError`` when
the stream dies or the server breaks the protocol, ``trio.TooSlowError`` on timeout,
``trio.ClosedResourceError`` after the client was closed, ``ValueError`` for a request the
protocol cannot carry (a glob over 256 characters, an invalid name).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import NoReturn, Protocol, TypeVar

import trio

from node.acl import StoreAccess
from node.exc_groups import first_leaf, only, sole_error
from node.limits import LimitExceeded, Limits
from node.p2p import P2PHost, Stream
from node.versions import VersionBook
from protocols.catalog import (
    MAX_CHUNKS_PER_REPLY,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_LIMIT,
    MAX_PIPELINE,
    MAX_RECORDS_PER_REPLY,
    NEED_DATA,
    PROTOCOL_ID,
    REQUEST_ID_LIMIT,
    BadRequest,
    CatalogConnection,
    ChunkEntry,
    ChunkList,
    EndOfStream,
    ErrorReply,
    GetChunks,
    GetManifest,
    GetVersions,
    ListModels,
    ManifestData,
    Message,
    ModelList,
    ModelSummary,
    Request,
    Response,
    Role,
    State,
    Versions,
    glob_matches,
)
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.records import VersionRecord
from storage.chunks import ChunkRef
from storage.manifest import ManifestError
from storage.names import InvalidName, ModelName, parse_digest, parse_model_name
from storage.ollama_store import StoredManifest
from storage.store import ModelNotFound, ModelStore

__all__ = [
    "CATALOG_PROTOCOL",
    "PROTOCOL_ID",
    "CatalogClient",
    "CatalogError",
    "CatalogServer",
    "CatalogSource",
    "ModelListResult",
    "StoreCatalogSource",
    "open_catalog_client",
]

log = logging.getLogger("dmm.catalog")

# The protocol id under the name the node registers it by.
CATALOG_PROTOCOL = PROTOCOL_ID

_T = TypeVar("_T")

DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_CLIENT_TIMEOUT = 30.0
# A reply that cannot be written in this long means the peer stopped reading.
DEFAULT_WRITE_TIMEOUT = 30.0
# A server stream with nothing outstanding and no new request for this long is ended.
DEFAULT_IDLE_TIMEOUT = 120.0
# Peers whose misbehaviour is counted in `CatalogServer.misbehaviour`.
MAX_MISBEHAVING_TRACKED = 4096
# How long a closing client waits for the server to finish its side.
_CLOSE_GRACE = 2.0

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


# --------------------------------------------------------------------------- source


class CatalogSource(Protocol):
    """What a ``CatalogServer`` serves. Blocking; every call runs in a worker thread."""

    def list_models(self, glob: str, limit: int) -> tuple[list[ModelSummary], bool]:
        """At most ``limit`` models matching ``glob`` (``glob_matches``), and whether more
        matched."""
        ...

    def version_records(self, name: str) -> list[bytes]:
        """Encoded version records of ``host/namespace/model:tag``, oldest first; ``[]``
        for an unknown model."""
        ...

    def manifest(self, name_or_digest: str) -> tuple[str, bytes] | None:
        """``(digest, raw bytes)`` of a manifest by model name (any form) or by
        ``sha256:<hex>`` digest; ``None`` when not held."""
        ...

    def chunks(self, digest: str) -> tuple[int, list[ChunkRef]] | None:
        """``(blob size, chunk list)`` of a blob this node holds and has indexed."""
        ...


class StoreCatalogSource:
    """A ``CatalogSource`` over the local store and version book.

    A model in the store that has no version record for its current manifest (added
    before the book existed, or changed by Ollama behind our back) gets one signed on
    first request (``VersionBook.record_local``), so every summary names a real version.
    """

    def __init__(self, store: ModelStore, book: VersionBook) -> None:
        self.store = store
        self.book = book

    def list_models(self, glob: str, limit: int) -> tuple[list[ModelSummary], bool]:
        summaries: list[ModelSummary] = []
        for entry in self.store.list_models():
            # ModelName.display is exactly display_name(name) + ":" + tag, the string
            # protocols.catalog.glob_matches is defined on.
            if not glob_matches(glob, entry.name.display):
                continue
            if len(summaries) == limit:
                return summaries, True
            record = self._current_record(entry.name, entry.digest, entry.size)
            summaries.append(
                ModelSummary(
                    name=record.model,
                    tag=record.tag,
                    version_id=record.version_id,
                    manifest_digest=entry.digest,
                    size=entry.size,
                    hlc=record.hlc,
                )
            )
        return summaries, False

    def version_records(self, name: str) -> list[bytes]:
        model = parse_model_name(name)
        records = self.book.records(model)
        held = self._stored(model)
        if held is not None and not any(r.manifest_digest == held.digest for r in records):
            self._current_record(held.name, held.digest, held.manifest.total_size)
            records = self.book.records(model)
        return [r.encode() for r in records]

    def manifest(self, name_or_digest: str) -> tuple[str, bytes] | None:
        # The protocol's rule (GetManifest.digest): digest-shaped text is always a digest.
        if name_or_digest.startswith(("sha256:", "sha256-")):
            return self._manifest_by_digest(parse_digest(name_or_digest))
        try:
            stored = self._stored(parse_model_name(name_or_digest))
        except InvalidName:
            return None
        return None if stored is None else (stored.digest, stored.raw)

    def _manifest_by_digest(self, digest: str) -> tuple[str, bytes] | None:
        # The database knows which name had which manifest; the bytes on disk decide.
        for row in self.store.db.all_models():
            if row.manifest_digest != digest:
                continue
            try:
                stored = self._stored(parse_model_name(row.name))
            except InvalidName:
                continue
            if stored is not None and stored.digest == digest:
                return digest, stored.raw
        # Manifests written by Ollama itself are not in the database: look at them all.
        for item in self.store.layout.walk():
            if isinstance(item, StoredManifest) and item.digest == digest:
                return digest, item.raw
        return None

    def _stored(self, model: ModelName) -> StoredManifest | None:
        try:
            return self.store.get(model)
        except (ModelNotFound, ManifestError):
            return None

    def _current_record(self, name: ModelName, digest: str, size: int) -> VersionRecord:
        """The newest record of ``name`` whose manifest is ``digest``; signs one if none."""
        latest = self.book.latest(name)
        if latest is not None and latest.manifest_digest == digest:
            return latest
        matching = [r for r in self.book.records(name) if r.manifest_digest == digest]
        if matching:
            return max(matching, key=lambda r: (r.hlc, r.version_id))
        return self.book.record_local(name, digest, size)

    # --------------------------------------------------------------------------- server

    def chunks(self, digest: str) -> tuple[int, list[ChunkRef]] | None:
        row = self.store.db.get_blob(digest)
        if row is None or not self.store.cas.has(digest):
            return None
        return row.size, self.store.db.blob_chunks(digest)


class CatalogServer:
    """Serves ``/dmm/catalog/1`` from a ``CatalogSource``; ``handle`` is the stream handler.

    ``max_concurrent_streams`` streams per peer are served at once; further streams get a
    final ``ErrorReply(None, "refused", ...)``. Each request gets ``request_timeout``
    seconds (then ``internal``); worker threads are shared by all streams, at most
    ``max_threads``. ``on_misbehaviour(peer_id, reason)`` is called, after the count in
    ``misbehaviour`` is raised, each time a peer breaks the protocol or sends a bad request.
    """

    def __init__(
        self,
        source: CatalogSource,
        *,
        max_concurrent_streams: int = 4,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_threads: int = 4,
        on_misbehaviour: Callable[[str, str], None] | None = None,
        limits: Limits | None = None,
        access: StoreAccess | None = None,
    ) -> None:
        if max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        self.source = source
        self.max_concurrent_streams = max_concurrent_streams
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self.misbehaviour: collections.Counter[str] = collections.Counter()
        self._on_misbehaviour = on_misbehaviour
        # Requests are paced and misbehaviour counted by `limits`; `access` refuses what the
        # peer may not read (``[[access]]`` reader role). None = neither.
        self.limits = limits
        self.access = access
        self._limiter = trio.CapacityLimiter(max_threads)
        self._open_streams: collections.Counter[str] = collections.Counter()

    def streams_open(self, peer_id: str) -> int:
        return self._open_streams[peer_id]

    async def handle(self, stream: Stream) -> None:
        """Serve one inbound stream until either side ends it. Never raises ``Exception``."""
        peer = stream.peer_id
        if self._open_streams[peer] >= self.max_concurrent_streams:
            await self._refuse(stream)
            return
        self._open_streams[peer] += 1
        try:
            await _ServedStream(self, stream).run()
        except Exception as exc:
            if only(exc, _BROKEN):
                log.info("catalog stream from %s broke: %s", peer, first_leaf(exc))
            else:
                log.error("catalog stream from %s failed: %r", peer, first_leaf(exc))
            await stream.reset()
        finally:
            self._open_streams[peer] -= 1
            if not self._open_streams[peer]:
                del self._open_streams[peer]

    async def _refuse(self, stream: Stream) -> None:
        log.info(
            "refused a catalog stream from %s: %d streams already open",
            stream.peer_id,
            self._open_streams[stream.peer_id],
        )
        conn = CatalogConnection(Role.SERVER)
        final = ErrorReply(None, "refused", "too many catalog streams from this peer")
        try:
            with trio.fail_after(self.write_timeout):
                await stream.send_all(conn.send(final))
                await stream.send_eof()
        except (*_BROKEN, trio.TooSlowError) as exc:
            log.debug("refusing a catalog stream from %s: %r", stream.peer_id, exc)
            await stream.reset()

    def _misbehaved(self, peer: str, reason: str) -> None:
        if peer not in self.misbehaviour and len(self.misbehaviour) >= MAX_MISBEHAVING_TRACKED:
            # Peer ids are free to make: forget the oldest rather than grow without bound.
            del self.misbehaviour[next(iter(self.misbehaviour))]
        self.misbehaviour[peer] += 1
        log.info("catalog peer %s misbehaved (%d): %s", peer, self.misbehaviour[peer], reason)
        if self.limits is not None:
            self.limits.violation(peer, f"catalog: {reason}")
        if self._on_misbehaviour is not None:
            try:
                self._on_misbehaviour(peer, reason)
            except Exception as exc:  # the node's callback must not end our stream
                log.error("catalog misbehaviour callback failed for %s: %r", peer, exc)

    async def answer(self, request: Request, peer: str) -> Response:
        """The reply to ``request``; errors, unknown names and timeouts become ``ErrorReply``."""
        rid = request.request_id
        with trio.move_on_after(self.request_timeout):
            try:
                return await self._compute(request, peer)
            except Exception as exc:
                log.warning(
                    "catalog %s %s for %s failed: %r", request.TYPE, _subject(request), peer, exc
                )
                return ErrorReply(rid, "internal", "the server failed to answer")
        log.warning(
            "catalog %s %s for %s: no answer within %g s",
            request.TYPE,
            _subject(request),
            peer,
            self.request_timeout,
        )
        return ErrorReply(rid, "internal", f"no answer within {self.request_timeout:g} s")

    async def _in_thread(self, fn: Callable[[], _T]) -> _T:
        # Abandoned on timeout; the thread still holds its limiter slot until it returns,
        # so a stuck source cannot start more than max_threads threads.
        return await trio.to_thread.run_sync(  # type: ignore[call-arg]  # mypy loses its kwargs
            fn, abandon_on_cancel=True, limiter=self._limiter
        )

    async def _compute(self, request: Request, peer: str) -> Response:
        rid = request.request_id
        if self.access is not None:
            refusal = await self._in_thread(partial(self._refusal, request, peer))
            if refusal is not None:
                return ErrorReply(rid, "refused", refusal[:MAX_ERROR_MESSAGE_LENGTH])
        match request:
            case ListModels(glob=glob, limit=limit):
                summaries, truncated = await self._in_thread(
                    partial(self.source.list_models, glob, limit)
                )
                if self.access is not None:
                    # Models the peer may not read are not there, as far as it can tell.
                    acl = self.access.acl
                    summaries = [
                        s for s in summaries if acl.allowed(peer, "reader", f"{s.name}:{s.tag}")
                    ]
                more = " (truncated)" if truncated else ""
                log.debug("catalog list %r for %s: %d models%s", glob, peer, len(summaries), more)
                return ModelList(rid, tuple(summaries), truncated)
            case GetVersions(name=name):
                full = parse_model_name(name).full
                records = await self._in_thread(partial(self.source.version_records, full))
                if not records:
                    log.debug("catalog get-versions %s for %s: not found", full, peer)
                    return ErrorReply(rid, "not-found", f"no versions of {name}")
                log.debug("catalog get-versions %s for %s: %d records", full, peer, len(records))
                # When there are more than one reply holds, the newest matter most.
                return Versions(rid, tuple(records[-MAX_RECORDS_PER_REPLY:]))
            case GetChunks(digest=digest, start=start, limit=limit):
                held = await self._in_thread(partial(self.source.chunks, digest))
                if held is None:
                    return ErrorReply(rid, "not-found", f"blob {digest} is not held here")
                size, refs = held
                page = tuple(
                    ChunkEntry(c.offset, c.length, c.digest) for c in refs[start : start + limit]
                )
                log.debug(
                    "catalog get-chunks %s for %s: %d from %d", digest[:19], peer, len(page), start
                )
                return ChunkList(rid, digest, size, len(refs), start, page)
            case GetManifest(name_or_digest=wanted):
                found = await self._in_thread(partial(self.source.manifest, wanted))
                if found is None:
                    log.debug("catalog get-manifest %s for %s: not found", wanted, peer)
                    return ErrorReply(rid, "not-found", f"no manifest {wanted}")
                digest, raw = found
                log.debug("catalog get-manifest %s for %s: %s", wanted, peer, digest)
                return ManifestData(rid, digest, raw)
        raise AssertionError(f"unhandled request {request!r}")

    def _refusal(self, request: Request, peer: str) -> str | None:
        """Why ``peer`` may not have what ``request`` asks for (blocking), or None."""
        access = self.access
        assert access is not None
        match request:
            case GetVersions(name=name):
                return access.model_refusal(peer, name)
            case GetChunks(digest=digest):
                return access.blob_refusal(peer, digest, "catalog")
            case GetManifest(name_or_digest=wanted):
                if wanted.startswith(("sha256:", "sha256-")):
                    return access.manifest_refusal(peer, "sha256:" + wanted[7:])
                return access.model_refusal(peer, wanted)
        return None

    async def admit(self, peer: str) -> ErrorReply | None:
        """Pace one request of ``peer``; the final reply when it is over its limits."""
        if self.limits is None:
            return None
        try:
            await self.limits.request(peer)
        except LimitExceeded as exc:
            return ErrorReply(None, "refused", str(exc)[:MAX_ERROR_MESSAGE_LENGTH])
        return None


class _ServedStream:
    """One inbound stream: the reader runs in ``run``, each request in its own task."""

    def __init__(self, server: CatalogServer, stream: Stream) -> None:
        self.server = server
        self.stream = stream
        self.peer = stream.peer_id
        self.conn = CatalogConnection(Role.SERVER)
        self._write_lock = trio.Lock()
        self._idle_scope: trio.CancelScope | None = None

    async def run(self) -> None:
        final: ErrorReply | None = None
        async with trio.open_nursery() as requests:
            final = await self._read(requests)
            if final is not None:
                # The final reply fails every outstanding request: stop working on them.
                requests.cancel_scope.cancel()
        if final is not None and self.conn.our_state is State.OPEN:
            await self._send(final)
        if self.conn.our_state is not State.CLOSED:
            await self._send(EndOfStream())

    async def _read(self, requests: trio.Nursery) -> ErrorReply | None:
        """Read and dispatch until the client is done; the final error reply, if any."""
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                reason = str(exc)
                self.server._misbehaved(self.peer, reason)
                return ErrorReply(None, "bad-request", reason[:MAX_ERROR_MESSAGE_LENGTH])
            if event is NEED_DATA:
                with trio.CancelScope() as scope:
                    self._idle_scope = scope
                    self._update_idle_deadline()
                    data = await self.stream.receive_some(self.conn.max_read)
                self._idle_scope = None
                if scope.cancelled_caught:
                    log.debug("catalog stream from %s idle: ending it", self.peer)
                    return None
                if data:
                    self.conn.receive_data(data)
                else:
                    self.conn.receive_eof()
            elif isinstance(event, EndOfStream):
                return None
            elif isinstance(event, BadRequest):
                self.server._misbehaved(self.peer, f"bad request: {event.reason}")
                if event.request_id is None:
                    return ErrorReply(None, "bad-request", event.reason)
                reply = ErrorReply(event.request_id, "bad-request", event.reason)
                requests.start_soon(self._send, reply)
            elif isinstance(event, (ListModels, GetVersions, GetManifest, GetChunks)):
                # Waits while the peer is over its request rate: we stop reading meanwhile.
                refused = await self.server.admit(self.peer)
                if refused is not None:
                    return refused
                requests.start_soon(self._serve, event)
            else:  # the machine only lets a client send requests
                raise AssertionError(f"unexpected catalog event {event!r}")

    def _update_idle_deadline(self) -> None:
        # Never cancel a read while replies are owed: a cancelled libp2p read can lose
        # bytes. An idle stream is ended instead, so a lost byte does not matter.
        if self._idle_scope is not None:
            idle = not self.conn.outstanding
            self._idle_scope.deadline = (
                trio.current_time() + self.server.idle_timeout if idle else math.inf
            )

    async def _serve(self, request: Request) -> None:
        await self._send(await self.server.answer(request, self.peer))

    async def _send(self, event: Message | EndOfStream) -> None:
        async with self._write_lock:
            try:
                data = self.conn.send(event)
            except LocalProtocolError as exc:
                # A reply our own source made unsendable (a manifest over 1 MiB, too many
                # models): say so instead of breaking the stream.
                if isinstance(event, EndOfStream) or event.request_id is None:
                    raise
                log.warning("catalog reply to %s not sendable: %s", self.peer, exc)
                data = self.conn.send(
                    ErrorReply(event.request_id, "internal", "the reply could not be encoded")
                )
            # A write cut off halfway would corrupt the framing: finish it or give up on
            # the stream, whatever cancels the task that started it.
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(self.server.write_timeout):
                        if data:
                            await self.stream.send_all(data)
                            await self.stream.flush()
                        if isinstance(event, EndOfStream):
                            await self.stream.send_eof()
                except trio.TooSlowError:
                    raise trio.BrokenResourceError(
                        f"{self.peer} read nothing for {self.server.write_timeout:g} s"
                    ) from None
        self._update_idle_deadline()


# --------------------------------------------------------------------------- client


class CatalogError(Exception):
    """The server answered with an ``ErrorReply``: ``code`` is one of ``ERROR_CODES``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ModelListResult:
    models: tuple[ModelSummary, ...]
    truncated: bool  # more models matched than the limit allowed


class _Waiter:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: Response | None = None


class CatalogClient:
    """A client on one ``/dmm/catalog/1`` stream; get one from ``open_catalog_client``.

    Safe to call from several tasks at once: requests are pipelined (up to
    ``MAX_PIPELINE`` in flight; more wait for a slot) and replies matched by id.
    ``dropped_records`` counts records the server sent that failed verification.
    """

    def __init__(self, stream: Stream, *, timeout: float = DEFAULT_CLIENT_TIMEOUT) -> None:
        self.peer_id = stream.peer_id
        self.timeout = timeout
        self.dropped_records = 0
        self._stream = stream
        self._conn = CatalogConnection(Role.CLIENT)
        self._waiters: dict[int, _Waiter] = {}
        self._next_id = 1
        self._write_lock = trio.Lock()
        self._slot_freed = trio.Event()
        self._reader_done = trio.Event()
        self._closed = False
        # Why no request can succeed any more: ("error", code, message) after the server's
        # final ErrorReply, ("broken", reason, cause) when the stream failed.
        self._failure: tuple[str, str, object] | None = None

    # ---------------------------------------------------------------- requests

    async def list_models(
        self, glob: str, limit: int = MAX_LIMIT, *, timeout: float | None = None
    ) -> ModelListResult:
        """Models matching ``glob`` (``protocols.catalog.glob_matches``), at most ``limit``."""
        reply = await self._request(lambda rid: ListModels(rid, glob, limit), timeout)
        assert isinstance(reply, ModelList)  # the machine checked the reply's type
        return ModelListResult(reply.models, reply.truncated)

    async def get_versions(self, name: str, *, timeout: float | None = None) -> list[VersionRecord]:
        """The server's version records of ``name``, each decoded and signature-checked.

        Records that fail verification, or are of another model, are dropped, logged and
        counted in ``dropped_records``.
        """
        try:
            full = parse_model_name(name).full
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
        reply = await self._request(lambda rid: GetVersions(rid, name), timeout)
        assert isinstance(reply, Versions)
        records: list[VersionRecord] = []
        for raw in reply.records:
            try:
                record = VersionRecord.decode(raw)
            except RemoteProtocolError as exc:
                self._drop_record(full, str(exc))
                continue
            if record.name != full:
                self._drop_record(full, f"record is of {record.name}")
                continue
            records.append(record)
        return records

    async def get_manifest(
        self, name_or_digest: str, *, timeout: float | None = None
    ) -> tuple[str, bytes]:
        """``(digest, raw)`` of a manifest by name or ``sha256:<hex>``; raw hashes to digest."""
        reply = await self._request(lambda rid: GetManifest(rid, name_or_digest), timeout)
        assert isinstance(reply, ManifestData)
        # The codec already refuses data that does not hash to its digest; this check
        # stays next to the only place manifests enter the node.
        if "sha256:" + hashlib.sha256(reply.data).hexdigest() != reply.digest:
            raise trio.BrokenResourceError(f"{self.peer_id} sent a manifest with a wrong digest")
        return reply.digest, reply.data

    async def get_chunks(
        self, digest: str, *, timeout: float | None = None
    ) -> tuple[int, list[ChunkRef]]:
        """``(size, chunk list)`` of a blob the peer holds, all pages; checked to tile the blob.

        A lying peer can still name wrong chunk ids: every chunk is verified as it lands
        and the whole blob at the end, so a wrong list costs time, never a wrong byte.
        """
        chunks: list[ChunkRef] = []
        size = total = -1
        while total < 0 or len(chunks) < total:
            start = len(chunks)
            page_request = partial(
                GetChunks, digest=digest, start=start, limit=MAX_CHUNKS_PER_REPLY
            )
            reply = await self._request(page_request, timeout)
            assert isinstance(reply, ChunkList)
            if (size >= 0 and reply.size != size) or (total >= 0 and reply.total != total):
                raise trio.BrokenResourceError(f"{self.peer_id} changed {digest}'s chunk list")
            size, total = reply.size, reply.total
            if not reply.chunks and len(chunks) < total:
                raise trio.BrokenResourceError(f"{self.peer_id} sent an empty chunk page")
            if (
                chunks
                and reply.chunks
                and reply.chunks[0].offset != chunks[-1].offset + chunks[-1].length
            ):
                raise trio.BrokenResourceError(f"{self.peer_id} sent chunk pages with a gap")
            chunks.extend(ChunkRef(c.offset, c.length, c.chunk_id) for c in reply.chunks)
        covered = chunks[-1].offset + chunks[-1].length if chunks else 0
        if covered != size:
            raise trio.BrokenResourceError(
                f"{self.peer_id}'s chunk list of {digest} covers {covered} of {size} bytes"
            )
        return size, chunks

    def _drop_record(self, name: str, reason: str) -> None:
        self.dropped_records += 1
        log.info("dropped a version record of %s from %s: %s", name, self.peer_id, reason)

    async def _request(self, make: Callable[[int], Request], timeout: float | None) -> Response:
        with trio.fail_after(self.timeout if timeout is None else timeout):
            waiter = _Waiter()
            rid = await self._send_request(make, waiter)
            try:
                await waiter.done.wait()
            finally:
                # A late reply to an abandoned request is read and dropped by the reader.
                self._waiters.pop(rid, None)
        response = waiter.response
        if response is None:
            self._raise_failure()
        if isinstance(response, ErrorReply):
            raise CatalogError(response.code, response.message)
        return response

    async def _send_request(self, make: Callable[[int], Request], waiter: _Waiter) -> int:
        async with self._write_lock:
            self._check_usable()
            while len(self._conn.outstanding) >= MAX_PIPELINE:
                await self._slot_freed.wait()
                self._check_usable()
            rid = self._allocate_id()
            try:
                data = self._conn.send(make(rid))
            except LocalProtocolError as exc:
                raise ValueError(str(exc)) from None
            self._waiters[rid] = waiter
            # Half a frame on the wire would corrupt every later request: finish the write
            # or give up on the stream, whatever cancels this task.
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(self.timeout):
                        await self._stream.send_all(data)
                        await self._stream.flush()
                except (*_BROKEN, trio.TooSlowError) as exc:
                    self._fail("broken", f"sending to {self.peer_id} failed: {exc!r}", exc)
                    await self._stream.reset()
                    self._raise_failure()
            return rid

    def _allocate_id(self) -> int:
        in_use = set(self._conn.outstanding)
        while True:
            rid = self._next_id
            self._next_id = (self._next_id + 1) % REQUEST_ID_LIMIT
            if rid not in in_use:
                return rid

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the catalog client was closed")
        if self._failure is not None:
            self._raise_failure()

    def _raise_failure(self) -> NoReturn:
        if self._closed and self._failure is None:
            raise trio.ClosedResourceError("the catalog client was closed")
        assert self._failure is not None
        kind, text, detail = self._failure
        if kind == "error":
            raise CatalogError(text, str(detail))
        raise trio.BrokenResourceError(text) from (
            detail if isinstance(detail, BaseException) else None
        )

    def _fail(self, kind: str, text: str, detail: object) -> None:
        """No request can succeed from now on: wake every waiter with the reason."""
        if self._failure is None:
            self._failure = (kind, text, detail)
        for waiter in self._waiters.values():
            waiter.done.set()
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        self._slot_freed.set()
        self._slot_freed = trio.Event()

    # ----------------------------------------------------------------- reader

    async def _read_replies(self) -> None:
        """Dispatch replies by request id until the stream ends; never raises for I/O."""
        try:
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    data = await self._stream.receive_some(self._conn.max_read)
                    if data:
                        self._conn.receive_data(data)
                    else:
                        self._conn.receive_eof()
                elif isinstance(event, EndOfStream):
                    self._fail("broken", f"{self.peer_id} ended the catalog stream", None)
                    return
                elif isinstance(event, ErrorReply) and event.request_id is None:
                    # The server's last word: every request, outstanding or future, fails.
                    log.info(
                        "catalog server %s ended the stream: %s: %s",
                        self.peer_id,
                        event.code,
                        event.message,
                    )
                    self._fail("error", event.code, event.message)
                elif isinstance(event, (ModelList, Versions, ManifestData, ChunkList, ErrorReply)):
                    rid = event.request_id
                    assert rid is not None  # ErrorReply(None) is handled above
                    waiter = self._waiters.pop(rid, None)
                    if waiter is not None:
                        waiter.response = event
                        waiter.done.set()
                    self._wake_slot_waiters()
                else:  # the machine only lets a server send responses
                    raise AssertionError(f"unexpected catalog event {event!r}")
        except RemoteProtocolError as exc:
            log.info("catalog server %s broke the protocol: %s", self.peer_id, exc)
            self._fail("broken", f"{self.peer_id} broke the catalog protocol: {exc}", exc)
            await self._stream.reset()
        except _BROKEN as exc:
            if not self._closed:
                log.info("catalog stream to %s broke: %s", self.peer_id, exc)
            self._fail("broken", f"catalog stream to {self.peer_id} failed: {exc}", exc)
        finally:
            self._reader_done.set()

    # ------------------------------------------------------------------ close

    async def aclose(self) -> None:
        """End our side, give the server ``_CLOSE_GRACE`` s to finish, close the stream."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_GRACE) as grace:
                try:
                    async with self._write_lock:
                        if self._failure is None and self._conn.our_state is State.OPEN:
                            self._conn.send(EndOfStream())
                            await self._stream.send_eof()
                    await self._reader_done.wait()
                except _BROKEN as exc:
                    log.debug("closing catalog stream to %s: %r", self.peer_id, exc)
            if grace.cancelled_caught:
                await self._stream.reset()
                return
            try:
                await self._stream.aclose()
            except _BROKEN as exc:
                log.debug("closing catalog stream to %s: %r", self.peer_id, exc)


@asynccontextmanager
async def open_catalog_client(
    host: P2PHost, peer_id: str, *, timeout: float = DEFAULT_CLIENT_TIMEOUT
) -> AsyncIterator[CatalogClient]:
    """Open a catalog stream to ``peer_id``; ``timeout`` bounds the open and each request.

    Raises ``node.p2p.DialError`` / ``StreamRefused`` when the peer cannot be reached or
    does not serve the protocol, ``trio.TooSlowError`` when opening takes too long.
    """
    with trio.fail_after(timeout):
        stream = await host.open_stream(peer_id, PROTOCOL_ID)
    client = CatalogClient(stream, timeout=timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_replies)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader never raises for I/O, so the group wraps the caller's one exception
        # (and, under an outer cancellation, the reader's Cancelled): hand it back as the
        # caller raised it.
        exc = sole_error(group)
        if exc is None:
            raise
        raise exc from exc.__cause__


# --------------------------------------------------------------------------- helpers


def _subject(request: Request) -> str:
    match request:
        case ListModels(glob=glob):
            return repr(glob)
        case GetVersions(name=name):
            return name
        case GetManifest(name_or_digest=name):
            return name
        case GetChunks(digest=digest):
            return digest
    return "?"
