"""``/dmm/catalog/1``: ask a peer what it holds — one stream, pipelined requests.

Sans-IO, in the style of h11: ``CatalogConnection.receive_data`` takes bytes read from
the stream, ``next_event`` returns decoded events (or ``NEED_DATA``), ``send`` returns
the bytes to write. The caller owns the stream; on ``RemoteProtocolError`` it resets the
stream and counts the failure against the peer.

Server loop::

    conn = CatalogConnection(Role.SERVER)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:            # read at most conn.max_read bytes
            data = await read()
            conn.receive_eof() if data is EOF else conn.receive_data(data)
        elif isinstance(event, EndOfStream):
            break                         # then answer what is outstanding, send(EndOfStream())
        elif isinstance(event, BadRequest):
            await write(conn.send(ErrorReply(event.request_id, "bad-request", event.reason)))
        else:
            await write(conn.send(answer(event)))

Also here: glob matching for ``ListModels`` and the DHT index keys (DESIGN.md,
"Discovery keys"), because the two must agree on what a name is.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import re
from collections.abc import Callable
from typing import TypeAlias

from storage.names import DEFAULT_HOST, DEFAULT_NAMESPACE, InvalidName, parse_model_name

from ._catalog_events import (
    ERROR_CODES,
    MAX_CHUNKS_PER_REPLY,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_GLOB_LENGTH,
    MAX_LIMIT,
    MAX_MANIFEST_SIZE,
    MAX_RECORDS_PER_REPLY,
    REQUEST_ID_LIMIT,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    BadRequest,
    ChunkEntry,
    ChunkList,
    EndOfStream,
    ErrorReply,
    GetChunks,
    GetManifest,
    GetVersions,
    ListModels,
    MalformedMessage,
    ManifestData,
    Message,
    ModelList,
    ModelSummary,
    Request,
    Response,
    Versions,
    decode_message,
    encode_message,
)
from ._machine import NEED_DATA, NeedData, Role, State, StreamMachine
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FrameDecoder, encode_frame

__all__ = [
    "ERROR_CODES",
    "INDEX_KEY_PREFIX",
    "MAX_CHUNKS_PER_REPLY",
    "MAX_ERROR_MESSAGE_LENGTH",
    "MAX_GLOB_LENGTH",
    "MAX_LIMIT",
    "MAX_MANIFEST_SIZE",
    "MAX_PIPELINE",
    "MAX_RECORDS_PER_REPLY",
    "MAX_REPLY_FRAME",
    "MAX_REQUEST_FRAME",
    "NEED_DATA",
    "PROTOCOL_ID",
    "REQUEST_ID_LIMIT",
    "BadRequest",
    "CatalogConnection",
    "ChunkEntry",
    "ChunkList",
    "EndOfStream",
    "ErrorReply",
    "Event",
    "GetChunks",
    "GetManifest",
    "GetVersions",
    "ListModels",
    "MalformedMessage",
    "ManifestData",
    "Message",
    "ModelList",
    "ModelSummary",
    "NeedData",
    "Request",
    "Response",
    "Role",
    "State",
    "Versions",
    "decode_message",
    "display_name",
    "encode_message",
    "glob_matches",
    "index_key_for_glob",
    "index_keys_for_name",
    "literal_prefix",
]

PROTOCOL_ID = "/dmm/catalog/1"
# Requests are small (a glob or a name); a server never buffers more than this per frame.
MAX_REQUEST_FRAME = 4 * 1024
# Room for the largest reply: a 1 MiB manifest, or 64 records of up to 16 KiB, plus CBOR.
MAX_REPLY_FRAME = 1024 * 1024 + 64 * 1024
# Requests a client may have unanswered on one stream; bounds the server's queue.
MAX_PIPELINE = 32


Event: TypeAlias = Message | BadRequest | EndOfStream


class _Kind(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"
    FINAL = "final"  # ErrorReply(None): a server's last word
    EOF = "eof"


# Everything that moves a side from one state to another is in this table, keyed by
# (the side's role, its current state, what it sends). A missing entry is illegal:
# LocalProtocolError when we send it, RemoteProtocolError when the peer does. The
# request-id bookkeeping (see CatalogConnection) is checked on top of it.
_TRANSITIONS: dict[tuple[Role, State, _Kind], State] = {
    (Role.CLIENT, State.OPEN, _Kind.REQUEST): State.OPEN,
    (Role.CLIENT, State.OPEN, _Kind.EOF): State.CLOSED,
    (Role.SERVER, State.OPEN, _Kind.RESPONSE): State.OPEN,
    (Role.SERVER, State.OPEN, _Kind.FINAL): State.DONE,
    (Role.SERVER, State.OPEN, _Kind.EOF): State.CLOSED,
    (Role.SERVER, State.DONE, _Kind.EOF): State.CLOSED,
}


def _kind(role: Role, event: object) -> _Kind | None:
    """What ``event`` is when sent by ``role``; ``None`` if that role may not send it."""
    if isinstance(event, EndOfStream):
        return _Kind.EOF
    if role is Role.CLIENT:
        return _Kind.REQUEST if isinstance(event, REQUEST_TYPES) else None
    if isinstance(event, ErrorReply) and event.request_id is None:
        return _Kind.FINAL
    return _Kind.RESPONSE if isinstance(event, RESPONSE_TYPES) else None


def _reply_mismatch(request: Request | BadRequest, response: Response) -> str | None:
    """Why ``response`` cannot answer ``request``, or ``None`` if it can."""
    if isinstance(response, ErrorReply):
        return None
    match request:
        case ListModels(limit=limit):
            if not isinstance(response, ModelList):
                return f"{response.TYPE} does not answer list"
            if len(response.models) > limit:
                return f"{len(response.models)} models listed for a limit of {limit}"
        case GetVersions():
            if not isinstance(response, Versions):
                return f"{response.TYPE} does not answer get-versions"
        case GetManifest():
            if not isinstance(response, ManifestData):
                return f"{response.TYPE} does not answer get-manifest"
            if request.digest is not None and response.digest != request.digest:
                return "manifest digest differs from the one requested"
        case GetChunks(digest=digest, start=start, limit=limit):
            if not isinstance(response, ChunkList):
                return f"{response.TYPE} does not answer get-chunks"
            if response.digest != digest or response.start != start:
                return "chunk list is not the page that was requested"
            if len(response.chunks) > limit:
                return f"{len(response.chunks)} chunks listed for a limit of {limit}"
        case BadRequest():
            return "a bad request can only be answered with an error"
    return None


class CatalogConnection(StreamMachine[Event]):
    """One side of a ``/dmm/catalog/1`` stream.

    Clients may pipeline up to ``MAX_PIPELINE`` requests with distinct ids; the server may
    answer in any order. ``max_frame`` bounds the frames we accept (default: requests for
    a server, replies for a client); what we send is held to the protocol's limits.
    A ``send`` that raises ``LocalProtocolError`` changes nothing.
    """

    def __init__(self, role: Role, *, max_frame: int | None = None) -> None:
        if max_frame is None:
            max_frame = MAX_REQUEST_FRAME if role is Role.SERVER else MAX_REPLY_FRAME
        self._send_limit = MAX_REQUEST_FRAME if role is Role.CLIENT else MAX_REPLY_FRAME
        self._decoder = FrameDecoder(max_frame)
        super().__init__(role, self._decoder)
        # Requests sent and not yet answered (client), or received and not yet answered
        # (server). Insertion order is request order.
        self._outstanding: dict[int, Request | BadRequest] = {}

    # ------------------------------------------------------------------ state

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Ids of the requests awaiting a response, oldest first."""
        return tuple(self._outstanding)

    # ---------------------------------------------------------------- receive

    def _end_of_stream(self) -> Event:
        return EndOfStream()

    def _next_event(self) -> Event | NeedData:
        payload = self._decoder.next_frame()
        if payload is None:
            if not self._eof_received:
                return NEED_DATA
            self._decoder.eof()  # raises if the stream ended inside a frame
            self._peer_sent(_Kind.EOF, EndOfStream())
            return EndOfStream()
        try:
            message = decode_message(payload)
        except MalformedMessage as exc:
            if self.role is Role.SERVER and exc.message_type not in _RESPONSE_TYPE_NAMES:
                # Truncated so it always fits the ErrorReply that answers it.
                bad = BadRequest(exc.request_id, str(exc)[:MAX_ERROR_MESSAGE_LENGTH])
                self._peer_sent(_Kind.REQUEST, bad)
                return bad
            raise
        kind = _kind(self._peer_role, message)
        if kind is None:
            raise RemoteProtocolError(
                f"{self._peer_role.value} sent {message.TYPE}, which only a "
                f"{self.role.value} may send"
            )
        self._peer_sent(kind, message)
        return message

    def _peer_sent(self, kind: _Kind, event: Event) -> None:
        reason = self._check(self._peer_role, kind, event)
        if reason is not None:
            raise RemoteProtocolError(reason)
        self._apply(self._peer_role, kind, event)

    # ------------------------------------------------------------------- send

    def send(self, event: Message | EndOfStream) -> bytes:
        """The bytes to write for ``event``; ``b""`` for ``EndOfStream`` (then close the
        stream for writing)."""
        kind = _kind(self.role, event)
        if kind is None:
            raise LocalProtocolError(f"a {self.role.value} cannot send {type(event).__name__}")
        reason = self._check(self.role, kind, event)
        if reason is not None:
            raise LocalProtocolError(reason)
        if isinstance(event, EndOfStream):
            data = b""
        else:
            data = encode_frame(encode_message(event), self._send_limit)
        self._apply(self.role, kind, event)
        return data

    # ---------------------------------------------------- shared bookkeeping

    def _check(self, sender: Role, kind: _Kind, event: Event) -> str | None:
        """Why ``sender`` may not send ``event`` now, or ``None``."""
        state = self._states[sender]
        if (sender, state, kind) not in _TRANSITIONS:
            return f"{sender.value} in state {state.value} cannot send {kind.value}"
        if isinstance(event, (ListModels, GetVersions, GetManifest, GetChunks, BadRequest)):
            if sender is self.role and self.their_state is not State.OPEN:
                # Only checked for our own requests: the peer's may cross our close.
                return "the server has ended its side; no request can be answered"
            if event.request_id is None:
                return None
            if event.request_id in self._outstanding:
                return f"request id {event.request_id} is already outstanding"
            if len(self._outstanding) >= MAX_PIPELINE:
                return f"more than {MAX_PIPELINE} requests outstanding"
        elif isinstance(event, RESPONSE_TYPES) and event.request_id is not None:
            request = self._outstanding.get(event.request_id)
            if request is None:
                return f"response to request id {event.request_id}, which is not outstanding"
            return _reply_mismatch(request, event)
        elif (
            isinstance(event, EndOfStream)
            and sender is Role.SERVER
            and state is State.OPEN
            and self._outstanding
        ):
            return f"server closed with {len(self._outstanding)} requests unanswered"
        return None

    def _apply(self, sender: Role, kind: _Kind, event: Event) -> None:
        self._states[sender] = _TRANSITIONS[(sender, self._states[sender], kind)]
        if kind is _Kind.FINAL:
            self._outstanding.clear()
        elif isinstance(event, (ListModels, GetVersions, GetManifest, GetChunks, BadRequest)):
            if event.request_id is not None:
                self._outstanding[event.request_id] = event
        elif isinstance(event, RESPONSE_TYPES) and event.request_id is not None:
            del self._outstanding[event.request_id]


_RESPONSE_TYPE_NAMES = frozenset(t.TYPE for t in RESPONSE_TYPES)


# ------------------------------------------------------ names, globs, index keys

INDEX_KEY_PREFIX = "/dmm/index/"
# DESIGN.md: names are indexed under their first 1, 2 and 3 characters.
INDEX_PREFIX_LENGTHS = (1, 2, 3)


def display_name(name: str) -> str:
    """The name people type, without tag: ``llama3``, ``ns/model`` or ``host/ns/model``.

    This is the "name" of globs and index keys: ``ModelName.display`` without ``:tag``.
    Raises ``LocalProtocolError`` for an invalid name.
    """
    try:
        parsed = parse_model_name(name)
    except InvalidName as exc:
        raise LocalProtocolError(str(exc)) from None
    if parsed.host == DEFAULT_HOST and parsed.namespace == DEFAULT_NAMESPACE:
        return parsed.model
    if parsed.host == DEFAULT_HOST:
        return f"{parsed.namespace}/{parsed.model}"
    return f"{parsed.host}/{parsed.namespace}/{parsed.model}"


def glob_matches(pattern: str, name_tag: str) -> bool:
    """Case-sensitive ``fnmatch`` of ``pattern`` against ``display_name:tag``.

    A pattern without a tag (no ``:`` after its last ``/``) matches every tag, so
    ``llama3`` finds ``llama3:latest`` and ``llama3:8b``.
    """
    if ":" not in pattern[pattern.rfind("/") + 1 :]:
        pattern += ":*"
    return _compile_glob(pattern)(name_tag) is not None


# fnmatch.fnmatchcase, with its own small cache: fnmatch caches up to 32768 compiled
# patterns, and globs come from peers, so a peer cycling through distinct globs could
# pin a lot of memory in a long-running node.
@functools.lru_cache(maxsize=256)
def _compile_glob(pattern: str) -> Callable[[str], re.Match[str] | None]:
    return re.compile(fnmatch.translate(pattern)).match


def literal_prefix(glob: str) -> str:
    """The characters of ``glob`` before its first ``*``, ``?`` or ``[``."""
    for index, char in enumerate(glob):
        if char in "*?[":
            return glob[:index]
    return glob


def index_keys_for_name(name: str) -> list[str]:
    """The ``/dmm/index/`` keys a holder of ``name`` (any form, tag ignored) provides.

    ``llama3`` -> ``/dmm/index/``, ``/dmm/index/l``, ``/dmm/index/ll``, ``/dmm/index/lla``.
    """
    display = display_name(name)
    shards = dict.fromkeys(display[:n] for n in (0, *INDEX_PREFIX_LENGTHS))
    return [INDEX_KEY_PREFIX + shard for shard in shards]


def index_key_for_glob(glob: str) -> str:
    """The one index key whose providers hold every model ``glob`` can match."""
    # The literal prefix may run into the tag ("ab:x" for model "ab"); up to the first
    # ":" it is always a prefix of the display name (a host port's ":" only shortens it).
    prefix = literal_prefix(glob).split(":", 1)[0]
    return INDEX_KEY_PREFIX + prefix[: max(INDEX_PREFIX_LENGTHS)]
