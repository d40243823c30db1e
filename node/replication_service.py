"""``/dmm/replicate/1`` over libp2p streams: the serving side and the client.

The protocol (messages, limits, the lockstep machine) is sans-IO in
``protocols/replicate.py``; this module owns the streams and timers around it.

Server::

    server = ReplicateServer(source)          # source answers Have, GetStatus, Replicate
    host.set_stream_handler(PROTOCOL_ID, server.handle)

Client::

    async with open_replicate_client(host, peer_id, timeout=5) as client:
        await client.ping()
        reply = await client.have(name, blob, chunk_id)

Errors: ``ReplicateError`` when the server answers with an error, ``trio.BrokenResourceError``
when the stream dies or the peer breaks the protocol, ``trio.TooSlowError`` on timeout,
``node.p2p.P2PError`` when the peer cannot be reached.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from node.p2p import P2PHost, Stream
from protocols.errors import RemoteProtocolError
from protocols.replicate import (
    MAX_REASON,
    NEED_DATA,
    PROTOCOL_ID,
    BadRequest,
    EndOfStream,
    ErrorReply,
    Event,
    GetStatus,
    Have,
    HaveReply,
    Ping,
    Pong,
    ReplicateConnection,
    ReplicateReply,
    ReplicateRequest,
    Request,
    Response,
    Role,
    Status,
)

__all__ = [
    "PROTOCOL_ID",
    "ReplicaSource",
    "ReplicateClient",
    "ReplicateError",
    "ReplicateServer",
    "open_replicate_client",
]

log = logging.getLogger("dmm.replicate")

# A server stream with no request for this long is ended. Health checks keep one stream
# per holder between rounds, so this is well above the default 30 s check interval; a
# prober whose stream was closed opens a new one.
IDLE_TIMEOUT = 300.0
# One answer may take this long (Replicate checks disk space; the pull runs afterwards).
ANSWER_TIMEOUT = 10.0


class ReplicateError(Exception):
    """The peer answered with an ``ErrorReply``; ``code`` is its code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


class ReplicaSource(Protocol):
    """What a ``ReplicateServer`` answers from (the ReplicationManager)."""

    async def answer_have(self, peer_id: str, request: Have) -> HaveReply: ...

    async def answer_status(self, peer_id: str) -> Status: ...

    async def answer_replicate(self, peer_id: str, request: ReplicateRequest) -> ReplicateReply: ...


class ReplicateServer:
    """Serves ``/dmm/replicate/1``; ``handle`` is the stream handler and never raises
    ``Exception``: a peer that breaks the protocol has its stream reset, logged in one line,
    and counted in ``misbehaviour``."""

    def __init__(self, source: ReplicaSource, *, max_streams_per_peer: int = 8) -> None:
        self.source = source
        self.max_streams_per_peer = max_streams_per_peer
        self.misbehaviour: dict[str, int] = {}
        self._open: dict[str, int] = {}

    async def handle(self, stream: Stream) -> None:
        peer = stream.peer_id
        if self._open.get(peer, 0) >= self.max_streams_per_peer:
            # Streams may idle for minutes; a peer cannot hold more than a few of them.
            log.info("replicate: refused a stream from %s (%d open)", peer, self._open[peer])
            await stream.reset()
            return
        self._open[peer] = self._open.get(peer, 0) + 1
        try:
            await self._serve(stream, peer)
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]

    async def _serve(self, stream: Stream, peer: str) -> None:
        conn = ReplicateConnection(Role.SERVER)
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    event = await _next_event(conn, stream)
                if idle.cancelled_caught:
                    log.info("replicate stream from %s idle for %.0fs: closed", peer, IDLE_TIMEOUT)
                    return
                if isinstance(event, EndOfStream):
                    return
                if not isinstance(event, Request | BadRequest):
                    raise RemoteProtocolError(f"unexpected {type(event).__name__}")
                reply = await self._answer(peer, event)
                await stream.send_all(conn.send(reply))
                await stream.flush()
        except RemoteProtocolError as exc:
            self.misbehaviour[peer] = self.misbehaviour.get(peer, 0) + 1
            log.info("replicate stream from %s: protocol error: %s", peer, exc)
            await stream.reset()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("replicate stream from %s broke: %s", peer, exc)
            await stream.reset()

    async def _answer(self, peer: str, event: Request | BadRequest) -> Response:
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                match event:
                    case BadRequest(reason=reason):
                        self.misbehaviour[peer] = self.misbehaviour.get(peer, 0) + 1
                        log.info("replicate: bad request from %s: %s", peer, reason)
                        return ErrorReply("bad-request", reason)
                    case Ping(nonce=nonce):
                        return Pong(nonce)
                    case Have():
                        return await self.source.answer_have(peer, event)
                    case GetStatus():
                        return await self.source.answer_status(peer)
                    case ReplicateRequest():
                        return await self.source.answer_replicate(peer, event)
        except trio.TooSlowError:
            return ErrorReply("internal", f"no answer within {ANSWER_TIMEOUT:g}s")
        except Exception as exc:  # the source failing must not take the stream with it
            log.error("replicate: answering %s for %s failed: %r", type(event).__name__, peer, exc)
            return ErrorReply("internal", str(exc)[:MAX_REASON] or type(exc).__name__)
        raise AssertionError("unreachable")


async def _next_event(conn: ReplicateConnection, stream: Stream) -> Event:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        data = await stream.receive_some(conn.max_read)
        if data:
            conn.receive_data(data)
        else:
            conn.receive_eof()


class ReplicateClient:
    """One ``/dmm/replicate/1`` stream to ``peer_id``; one request at a time."""

    def __init__(self, stream: Stream, timeout: float) -> None:
        self.stream = stream
        self.peer_id = stream.peer_id
        self.timeout = timeout
        self._conn = ReplicateConnection(Role.CLIENT)
        self._lock = trio.Lock()

    async def _call(self, request: Request) -> Response:
        async with self._lock:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(self._conn.send(request))
                await self.stream.flush()
                try:
                    event = await _next_event(self._conn, self.stream)
                except RemoteProtocolError as exc:
                    raise trio.BrokenResourceError(
                        f"{self.peer_id} broke /dmm/replicate/1: {exc}"
                    ) from exc
        if isinstance(event, ErrorReply):
            raise ReplicateError(event.code, event.message)
        assert isinstance(event, Pong | HaveReply | Status | ReplicateReply)
        return event

    async def ping(self) -> None:
        reply = await self._call(Ping(secrets.randbits(63)))
        assert isinstance(reply, Pong)

    async def have(self, name: str, blob: str, chunk: bytes) -> HaveReply:
        reply = await self._call(Have(name, blob, chunk))
        assert isinstance(reply, HaveReply)
        return reply

    async def status(self) -> Status:
        reply = await self._call(GetStatus())
        assert isinstance(reply, Status)
        return reply

    async def replicate(self, request: ReplicateRequest) -> ReplicateReply:
        reply = await self._call(request)
        assert isinstance(reply, ReplicateReply)
        return reply

    async def aclose(self) -> None:
        try:
            self._conn.send(EndOfStream())
            with trio.move_on_after(2):
                await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.stream.aclose()


@asynccontextmanager
async def open_replicate_client(
    host: P2PHost, peer_id: str, *, timeout: float = 10.0
) -> AsyncIterator[ReplicateClient]:
    """A client stream to ``peer_id``; ``timeout`` bounds the dial and each request."""
    with trio.fail_after(timeout):
        stream = await host.open_stream(peer_id, PROTOCOL_ID)
    client = ReplicateClient(stream, timeout)
    try:
        yield client
    except BaseException:
        await stream.reset()
        raise
    else:
        await client.aclose()
