"""``/dmm/replicate/1``: ask a peer to hold a model, and check cheaply that holders still do.

One stream carries any number of exchanges in lockstep: the client sends a request, the
server answers it, then the client may send the next (a health check sends ``Ping`` then
``Have`` on one stream). Every message is one CBOR map in one frame, ``{"t": <type>, ...}``.

Requests and their answers:

- ``Ping(nonce)`` -> ``Pong(nonce)``: the peer is up and its loop answers.
- ``Have(name, blob, chunk)`` -> ``HaveReply(model_held, chunk_held, pinned)``: does the peer
  still hold model ``name``, and chunk ``chunk`` (raw sha256) of blob ``blob`` with it;
  ``pinned`` says a user put the copy there (it is never released for surplus).
- ``GetStatus()`` -> ``Status(tags, free, load)``: the peer's ``[node] tags``, the bytes it
  would accept for new replicas, and its replication jobs in flight — what a healer ranks
  candidates by. Asked on demand rather than gossiped: free space changes all the time,
  gossipsub silently drops bursts, and only a healer ever needs it.
- ``Replicate(name, manifest_digest, size, policy, peers)`` -> ``ReplicateReply(code,
  reason)``: "please hold this version, because of ``policy``" (the whole policy travels, so
  every holder can heal the model later); the target decides by its own capacity and
  policies. ``code`` is ``accepted`` (it pulls the model now),
  ``holding`` (it has it already), or a refusal: ``capacity``, ``policy``, ``busy``.
- ``ErrorReply(code, message)`` answers a request the server could not read or serve.

Sans-IO in the style of h11 (see ``protocols/catalog.py``): ``ReplicateConnection`` takes
bytes with ``receive_data``/``receive_eof``, returns events from ``next_event``, and
turns events into bytes with ``send``. ``RemoteProtocolError`` means the peer broke the
protocol (end the stream, count it against the peer); ``LocalProtocolError`` a bug here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, TypeAlias

from storage.names import InvalidName, parse_model_name

from . import _cbor
from ._cbor import Value
from ._checks import (
    Invalid,
    check_digest,
    check_keys,
    check_text,
    get_bool,
    get_bytes,
    get_int,
    get_list_of,
    get_str,
)
from ._machine import NEED_DATA, NeedData, Role
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FrameDecoder, encode_frame

__all__ = [
    "ERROR_CODES",
    "MAX_FRAME",
    "MAX_TAGS",
    "NEED_DATA",
    "PROTOCOL_ID",
    "REFUSAL_CODES",
    "REPLY_CODES",
    "BadRequest",
    "EndOfStream",
    "ErrorReply",
    "Event",
    "GetStatus",
    "Have",
    "HaveReply",
    "Message",
    "NeedData",
    "Ping",
    "PolicySpec",
    "Pong",
    "ReplicateConnection",
    "ReplicateReply",
    "ReplicateRequest",
    "Request",
    "Response",
    "Role",
    "Status",
    "decode_message",
    "encode_message",
]

PROTOCOL_ID = "/dmm/replicate/1"
# The largest message, a Replicate with 32 constraints and 3 x 64 peer ids, is ~22 KiB.
MAX_FRAME = 32 * 1024
MAX_TAGS = 32
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
MAX_NAME = 255
MAX_POLICY = 256
MAX_REASON = 512
MAX_REPLICAS = 1000
MAX_PEERS = 64
MAX_PEER_ID = 64
U64 = 1 << 64
CHUNK_ID_SIZE = 32
REPLY_CODES = frozenset({"accepted", "holding", "capacity", "policy", "busy"})
REFUSAL_CODES = frozenset({"capacity", "policy", "busy"})
ERROR_CODES = frozenset({"bad-request", "internal"})


# ------------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    nonce: int


@dataclass(frozen=True, slots=True)
class Have:
    """Does the peer hold ``name`` (``host/namespace/model:tag``) and chunk ``chunk`` of
    blob ``blob`` (``sha256:<hex>``)?"""

    TYPE: ClassVar[str] = "have"
    name: str
    blob: str
    chunk: bytes


@dataclass(frozen=True, slots=True)
class GetStatus:
    TYPE: ClassVar[str] = "get-status"


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """The requester's policy, carried with the request so that every holder knows it and
    can heal the model when the requester is gone."""

    glob: str
    min_replicas: int
    max_replicas: int
    replication_factor: int
    priority: int = 0
    # Mappings are unhashable: left out of the hash, still compared by content.
    constraints: Mapping[str, str] = field(default_factory=dict, hash=False)
    preferred_peers: tuple[str, ...] = ()
    excluded_peers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicateRequest:
    """Hold version ``manifest_digest`` (``size`` bytes) of ``name`` because of ``policy``."""

    TYPE: ClassVar[str] = "replicate"
    name: str
    manifest_digest: str
    size: int
    policy: PolicySpec
    # The other holders and the peers asked along with this one: the target counts them
    # as copies from the start, so it never heals a model that is already being healed.
    peers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    nonce: int


@dataclass(frozen=True, slots=True)
class HaveReply:
    TYPE: ClassVar[str] = "have-reply"
    model_held: bool
    chunk_held: bool
    pinned: bool


@dataclass(frozen=True, slots=True)
class Status:
    """``free``: bytes the peer would accept for new replicas; ``load``: its replication
    jobs in flight."""

    TYPE: ClassVar[str] = "status"
    tags: Mapping[str, str] = field(hash=False)
    free: int = 0
    load: int = 0


@dataclass(frozen=True, slots=True)
class ReplicateReply:
    TYPE: ClassVar[str] = "replicate-reply"
    code: str
    reason: str

    @property
    def accepted(self) -> bool:
        """The peer holds the model now or is fetching it."""
        return self.code in ("accepted", "holding")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request that was a CBOR map but not a valid request; answer with ``ErrorReply``."""

    reason: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed its side (client) — or, sent by us, that we close ours."""


Request: TypeAlias = Ping | Have | GetStatus | ReplicateRequest
Response: TypeAlias = Pong | HaveReply | Status | ReplicateReply | ErrorReply
Message: TypeAlias = Request | Response
Event: TypeAlias = Message | BadRequest | EndOfStream

_REQUEST_TYPES = (Ping, Have, GetStatus, ReplicateRequest)
_RESPONSE_TYPES = (Pong, HaveReply, Status, ReplicateReply, ErrorReply)
_ANSWERS: dict[type, type] = {
    Ping: Pong,
    Have: HaveReply,
    GetStatus: Status,
    ReplicateRequest: ReplicateReply,
}


# ------------------------------------------------------------------------ codec


def _check_name(name: str) -> None:
    """A full ``host/namespace/model:tag`` name (the one spelling used on the wire)."""
    check_text(name, "name", MAX_NAME)
    try:
        parsed = parse_model_name(name)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None
    if parsed.full != name:
        raise Invalid(f"name {name!r} is not a full host/namespace/model:tag name")


def _tags(obj: Mapping[str, Value], key: str) -> Mapping[str, str]:
    value = obj[key]
    if type(value) is not dict:
        raise Invalid(f"{key!r} must be a map, not {type(value).__name__}")
    if len(value) > MAX_TAGS:
        raise Invalid(f"{key!r} has {len(value)} entries (the limit is {MAX_TAGS})")
    tags: dict[str, str] = {}
    for tag, tag_value in value.items():
        if not tag or type(tag_value) is not str:
            raise Invalid(f"{key!r} entries must be non-empty keys with text values")
        check_text(tag, f"{key}.key", MAX_TAG_KEY)
        check_text(tag_value, f"{key}.{tag}", MAX_TAG_VALUE)
        tags[tag] = tag_value
    return MappingProxyType(tags)


def _peer_list(obj: Mapping[str, Value], key: str) -> tuple[str, ...]:
    peers = get_list_of(obj, key, MAX_PEERS, str)
    for peer in peers:
        # Base58 peer ids; their full check is the node's business, the shape is ours.
        if not 1 <= len(peer) <= MAX_PEER_ID or not peer.isalnum() or not peer.isascii():
            raise Invalid(f"{key!r} holds {peer[:60]!r}, which is not a peer id")
    return tuple(peers)


def _policy(value: Value) -> PolicySpec:
    if type(value) is not dict:
        raise Invalid(f"'p' must be a map, not {type(value).__name__}")
    check_keys(value, ("g", "lo", "hi", "f", "pr", "k", "y", "x"))
    glob = get_str(value, "g", MAX_POLICY)
    if not glob:
        raise Invalid("policy glob is empty")
    low = get_int(value, "lo", 1, MAX_REPLICAS + 1)
    high = get_int(value, "hi", 1, MAX_REPLICAS + 1)
    factor = get_int(value, "f", 1, MAX_REPLICAS + 1)
    if not low <= factor <= high:
        raise Invalid(f"policy counts out of order: min {low}, factor {factor}, max {high}")
    return PolicySpec(
        glob=glob,
        min_replicas=low,
        max_replicas=high,
        replication_factor=factor,
        priority=get_int(value, "pr", -1000, 1001),
        constraints=_tags(value, "k"),
        preferred_peers=_peer_list(value, "y"),
        excluded_peers=_peer_list(value, "x"),
    )


def _to_map(message: Message) -> dict[str, Value]:
    fields: dict[str, Value] = {"t": message.TYPE}
    match message:
        case Ping(nonce=nonce) | Pong(nonce=nonce):
            fields.update(n=nonce)
        case Have(name=name, blob=blob, chunk=chunk):
            fields.update(m=name, b=blob, c=chunk)
        case GetStatus():
            pass
        case ReplicateRequest(policy=policy):
            fields.update(
                m=message.name,
                d=message.manifest_digest,
                s=message.size,
                p={
                    "g": policy.glob,
                    "lo": policy.min_replicas,
                    "hi": policy.max_replicas,
                    "f": policy.replication_factor,
                    "pr": policy.priority,
                    "k": dict(policy.constraints),
                    "y": list(policy.preferred_peers),
                    "x": list(policy.excluded_peers),
                },
                o=list(message.peers),
            )
        case HaveReply(model_held=model_held, chunk_held=chunk_held, pinned=pinned):
            fields.update(h=model_held, c=chunk_held, p=pinned)
        case Status(tags=tags, free=free, load=load):
            fields.update(g=dict(tags), f=free, l=load)
        case ReplicateReply(code=code, reason=reason) | ErrorReply(code=code, message=reason):
            fields.update(c=code, r=reason)
    return fields


def _decode_fields(kind: str, obj: Mapping[str, Value]) -> Message:
    if kind in ("ping", "pong"):
        check_keys(obj, ("t", "n"))
        nonce = get_int(obj, "n", 0, U64)
        return Ping(nonce) if kind == "ping" else Pong(nonce)
    if kind == "have":
        check_keys(obj, ("t", "m", "b", "c"))
        name = get_str(obj, "m", MAX_NAME)
        _check_name(name)
        blob = get_str(obj, "b", 80)
        check_digest(blob)
        return Have(name, blob, get_bytes(obj, "c", CHUNK_ID_SIZE, CHUNK_ID_SIZE))
    if kind == "get-status":
        check_keys(obj, ("t",))
        return GetStatus()
    if kind == "replicate":
        check_keys(obj, ("t", "m", "d", "s", "p", "o"))
        name = get_str(obj, "m", MAX_NAME)
        _check_name(name)
        digest = get_str(obj, "d", 80)
        check_digest(digest)
        size = get_int(obj, "s", 0, U64)
        return ReplicateRequest(name, digest, size, _policy(obj["p"]), _peer_list(obj, "o"))
    if kind == "have-reply":
        check_keys(obj, ("t", "h", "c", "p"))
        return HaveReply(get_bool(obj, "h"), get_bool(obj, "c"), get_bool(obj, "p"))
    if kind == "status":
        check_keys(obj, ("t", "g", "f", "l"))
        return Status(_tags(obj, "g"), get_int(obj, "f", 0, U64), get_int(obj, "l", 0, 1 << 32))
    if kind in ("replicate-reply", "error"):
        check_keys(obj, ("t", "c", "r"))
        code = get_str(obj, "c", 32)
        codes = REPLY_CODES if kind == "replicate-reply" else ERROR_CODES
        if code not in codes:
            raise Invalid(f"unknown code {code!r}")
        reason = get_str(obj, "r", MAX_REASON)
        return (
            ReplicateReply(code, reason) if kind == "replicate-reply" else ErrorReply(code, reason)
        )
    raise Invalid(f"unknown message type {kind[:40]!r}")


_RESPONSE_NAMES = frozenset(t.TYPE for t in _RESPONSE_TYPES)
_ALL_NAMES = frozenset(t.TYPE for t in (*_REQUEST_TYPES, *_RESPONSE_TYPES))


def encode_message(message: Message) -> bytes:
    """Canonical CBOR of ``message``; ``LocalProtocolError`` if the peer would refuse it."""
    if not isinstance(message, (*_REQUEST_TYPES, *_RESPONSE_TYPES)):
        raise LocalProtocolError(f"not a replicate message: {type(message).__name__}")
    fields = _to_map(message)
    try:
        _decode_fields(message.TYPE, fields)
    except Invalid as exc:
        raise LocalProtocolError(f"bad {message.TYPE} message: {exc}") from None
    return _cbor.dumps(fields)


class _Malformed(RemoteProtocolError):
    def __init__(self, message: str, kind: str | None) -> None:
        super().__init__(message)
        self.kind = kind


def decode_message(payload: bytes) -> Message:
    """One message from one frame's payload; ``RemoteProtocolError`` if it is not one."""
    obj = _cbor.loads(payload, max_depth=3)
    if not isinstance(obj, dict):
        raise _Malformed("replicate message is not a CBOR map", None)
    kind = obj.get("t")
    if not isinstance(kind, str) or kind not in _ALL_NAMES:
        raise _Malformed(f"unknown replicate message type {repr(kind)[:40]}", None)
    try:
        return _decode_fields(kind, obj)
    except Invalid as exc:
        raise _Malformed(f"bad {kind} message: {exc}", kind) from None


# ------------------------------------------------------------------------ machine


class ReplicateConnection:
    """One side of a ``/dmm/replicate/1`` stream: lockstep request, response, request...

    A client may send a request only when the previous one was answered, and
    ``EndOfStream`` only then; a server may send only the answer to the pending request
    (its own type, or ``ErrorReply``). A request the server cannot read but that was a
    CBOR map becomes a ``BadRequest`` event to answer with ``ErrorReply``; anything else
    that breaks these rules raises ``RemoteProtocolError`` (from the peer) or
    ``LocalProtocolError`` (from us), and a ``send`` that raises changes nothing.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._decoder = FrameDecoder(MAX_FRAME)
        self._eof_received = False
        self._broken = False
        self._closed = False  # the client's side has ended
        # The request awaiting its answer, on either side.
        self._pending: Request | BadRequest | None = None

    @property
    def max_read(self) -> int:
        """The most bytes to pass to one ``receive_data`` call."""
        return self._decoder.max_read

    @property
    def pending(self) -> Request | BadRequest | None:
        return self._pending

    def receive_data(self, data: bytes) -> None:
        if self._eof_received:
            raise LocalProtocolError("receive_data after receive_eof")
        self._decoder.receive_data(data)

    def receive_eof(self) -> None:
        self._eof_received = True

    def next_event(self) -> Event | NeedData:
        if self._broken:
            raise RemoteProtocolError("the peer already broke the protocol on this stream")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._broken = True
            raise

    def _next_event(self) -> Event | NeedData:
        payload = self._decoder.next_frame()
        if payload is None:
            if not self._eof_received:
                return NEED_DATA
            self._decoder.eof()
            if self._pending is not None:
                side = "client" if self.role is Role.SERVER else "server"
                raise RemoteProtocolError(f"the {side} closed the stream with a request pending")
            return EndOfStream()
        try:
            message = decode_message(payload)
        except _Malformed as exc:
            if self.role is Role.SERVER and exc.kind not in _RESPONSE_NAMES:
                if self._pending is not None:
                    raise RemoteProtocolError(
                        "a second request before the first was answered"
                    ) from None
                bad = BadRequest(str(exc)[:MAX_REASON])
                self._pending = bad
                return bad
            raise
        if self.role is Role.SERVER:
            if not isinstance(message, _REQUEST_TYPES):
                raise RemoteProtocolError(f"the client sent {message.TYPE}, a response")
            if self._pending is not None:
                raise RemoteProtocolError(
                    "a second request before the first was answered"
                ) from None
            self._pending = message
            return message
        if not isinstance(message, _RESPONSE_TYPES):
            raise RemoteProtocolError(f"the server sent {message.TYPE}, a request")
        reason = _mismatch(self._pending, message)
        if reason is not None:
            raise RemoteProtocolError(reason)
        self._pending = None
        return message

    def send(self, event: Message | EndOfStream) -> bytes:
        """The bytes to write for ``event``; ``b""`` for ``EndOfStream`` (then half-close)."""
        if isinstance(event, EndOfStream):
            if self._pending is not None:
                raise LocalProtocolError("cannot close with a request pending")
            self._closed = True
            return b""
        if self._closed:
            raise LocalProtocolError("this side has already closed")
        if self.role is Role.CLIENT:
            if not isinstance(event, _REQUEST_TYPES):
                raise LocalProtocolError(f"a client cannot send {type(event).__name__}")
            if self._pending is not None:
                raise LocalProtocolError("the previous request has not been answered")
            data = encode_frame(encode_message(event), MAX_FRAME)
            self._pending = event
            return data
        if not isinstance(event, _RESPONSE_TYPES):
            raise LocalProtocolError(f"a server cannot send {type(event).__name__}")
        reason = _mismatch(self._pending, event)
        if reason is not None:
            raise LocalProtocolError(reason)
        data = encode_frame(encode_message(event), MAX_FRAME)
        self._pending = None
        return data


def _mismatch(pending: Request | BadRequest | None, response: Response) -> str | None:
    """Why ``response`` cannot answer ``pending`` now, or ``None`` if it can."""
    if pending is None:
        return f"{response.TYPE} answers no pending request"
    if isinstance(response, ErrorReply):
        return None
    if isinstance(pending, BadRequest):
        return "a bad request can only be answered with an error"
    if _ANSWERS[type(pending)] is not type(response):
        return f"{response.TYPE} does not answer {pending.TYPE}"
    if isinstance(pending, Ping) and isinstance(response, Pong) and pending.nonce != response.nonce:
        return "pong nonce differs from the ping's"
    return None
