"""``/dmm/blocks/1`` messages, their codec and the frame reader (the state machine is in
blocks.py).

Wire format: each message is one frame (``framing.py``) holding a CBOR map
``{"t": <type>, "id": <request id>, ...}`` — except ``Block``, which is two frames: a
header frame ``{"t": "block", "id": ..., "c": <chunk id>}`` and right after it a raw
frame holding exactly the block's bytes. The data is never CBOR-encoded: a sender hands
its buffer to the stream as it is (``encode_message`` returns it uncopied), and a
receiver gets it from the frame decoder without the CBOR decoder scanning 2 MiB.

Field limits apply in both directions: ``encode_message`` refuses what the decoder would
refuse, because both run the very same checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from . import _cbor
from ._cbor import Value
from ._checks import (
    Invalid,
    check_digest,
    check_keys,
    get_bytes,
    get_int,
    get_list_of,
    get_str,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FrameDecoder, encode_frame, encode_varint

__all__ = [
    "CHUNK_ID_SIZE",
    "DEFAULT_MAX_BLOCK",
    "ERROR_CODES",
    "MAX_BLOCK_LIMIT",
    "MAX_BLOCK_PREFIX",
    "MAX_CONTROL_FRAME",
    "MAX_ELSEWHERE_PEERS",
    "MAX_ERROR_MESSAGE_LENGTH",
    "MAX_IDS_PER_MESSAGE",
    "MAX_OFFSET",
    "REQUEST_ID_LIMIT",
    "REQUEST_TYPES",
    "RESPONSE_TYPES",
    "BadRequest",
    "Block",
    "BlockHeader",
    "BufferLike",
    "Cancel",
    "DontHave",
    "Elsewhere",
    "EndOfStream",
    "ErrorReply",
    "HaveReply",
    "MalformedMessage",
    "Message",
    "MessageReader",
    "Request",
    "Response",
    "WantBlock",
    "WantHave",
    "byte_view",
    "decode_messages",
    "decode_payload",
    "encode_message",
]

CHUNK_ID_SIZE = 32  # raw sha256
REQUEST_ID_LIMIT = 1 << 32
# The chunker's max size (storage/chunks.py); the most a stream may be configured for.
DEFAULT_MAX_BLOCK = 2 * 1024 * 1024
MAX_BLOCK_LIMIT = 16 * 1024 * 1024
# Chunk ids per WantHave, and have + dont_have per HaveReply.
MAX_IDS_PER_MESSAGE = 1024
# Offsets and offset + length stay below this, like blob sizes in version records.
MAX_OFFSET = 1 << 63
MAX_ERROR_MESSAGE_LENGTH = 1024
# Peers named in one Elsewhere, and the longest peer id text (base58btc, ~52 for ed25519).
MAX_ELSEWHERE_PEERS = 8
MAX_PEER_ID_LENGTH = 64
_MAX_DIGEST_FIELD = 80
ERROR_CODES = frozenset({"not-found", "bad-request", "refused", "internal"})
# Every frame but a block's data: a WantHave or HaveReply of 1024 ids is ~35 KiB, an
# ErrorReply at most ~4 KiB. Control frames are refused above this whatever the
# data-frame limit, so a peer cannot make us CBOR-decode megabytes.
MAX_CONTROL_FRAME = 40 * 1024

# What a node may put in Block.data: anything exposing a contiguous byte buffer.
# Received blocks always carry bytes.
BufferLike: TypeAlias = bytes | bytearray | memoryview


# ---------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class WantHave:
    """Which of ``chunk_ids`` (1..1024 distinct 32-byte ids) does the server hold?"""

    TYPE: ClassVar[str] = "want-have"
    request_id: int
    chunk_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WantBlock:
    """Send chunk ``chunk_id``, found in blob ``blob_digest`` (``sha256:<hex>``) at
    ``offset``, ``length`` bytes long. The location lets the server read the blob file
    without an index lookup; the reply must be exactly ``length`` bytes."""

    TYPE: ClassVar[str] = "want-block"
    request_id: int
    chunk_id: bytes
    blob_digest: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop working on request ``request_id``; the server sends no reply to it after
    reading this, but a reply already on its way may still arrive (the client drops it)."""

    TYPE: ClassVar[str] = "cancel"
    request_id: int


# --------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class HaveReply:
    """The answer to ``WantHave``: every asked id, in exactly one of the two lists.

    One reply per request (rather than separate HAVE and DONT-HAVE messages) so that
    every request is answered exactly once, like every other request here.
    """

    TYPE: ClassVar[str] = "have"
    request_id: int
    have: tuple[bytes, ...]
    dont_have: tuple[bytes, ...]


@dataclass(frozen=True, slots=True, repr=False)
class Block:
    """The answer to ``WantBlock``: ``data`` is exactly the requested length.

    The chunk's sha256 is not checked by the protocol (``blocks.verify_block`` does it;
    the node runs it off the event loop).
    """

    TYPE: ClassVar[str] = "block"
    request_id: int
    chunk_id: bytes
    data: BufferLike

    def __repr__(self) -> str:
        # Never print megabytes into a log line or a test failure, and never raise: this
        # may describe a Block that failed validation.
        try:
            size = f"{memoryview(self.data).nbytes} bytes"
        except TypeError:
            size = f"data of type {type(self.data).__name__}"
        chunk_id = self.chunk_id.hex() if isinstance(self.chunk_id, bytes) else repr(self.chunk_id)
        return f"Block(request_id={self.request_id!r}, chunk_id={chunk_id}, {size})"


@dataclass(frozen=True, slots=True)
class DontHave:
    """The answer to ``WantBlock`` when the server does not hold that chunk (any more)."""

    TYPE: ClassVar[str] = "dont-have"
    request_id: int


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """An answer to ``WantBlock``: the server holds the chunk but asks the client to get
    it from ``peers``, which it sent the chunk to lately (super-seeding: a holder that
    many pull from at once sends each chunk about once and lets the pullers trade).
    ``peers`` names at least one peer id. A client asking again gets the chunk."""

    TYPE: ClassVar[str] = "elsewhere"
    request_id: int
    peers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal. ``request_id`` ``None`` is about the stream, not one request: it is
    the server's last message, and every request still outstanding has failed."""

    TYPE: ClassVar[str] = "error"
    request_id: int | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The first frame of a ``Block``; only ever seen inside the codec and the machine."""

    TYPE: ClassVar[str] = "block"
    request_id: int
    chunk_id: bytes


# ------------------------------------------------------- receive-only pseudo-events


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Server side only: a request that must be refused rather than served.

    Either it arrived intact but failed validation (``code`` ``"bad-request"``), or it
    was valid but over this server's limits — wantlist full, block larger than this side
    serves (``code`` ``"refused"``). Answer it with ``error_reply()``. When
    ``request_id`` is ``None`` the id itself was unreadable, and the only possible
    answer is ``ErrorReply(None, ...)``, which ends the server's side of the stream.
    """

    request_id: int | None
    reason: str
    code: str = "bad-request"

    def error_reply(self) -> ErrorReply:
        return ErrorReply(self.request_id, self.code, self.reason)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed its side (from ``next_event``), or we close ours (to ``send``)."""


Request: TypeAlias = WantHave | WantBlock
Response: TypeAlias = HaveReply | Block | DontHave | Elsewhere | ErrorReply
Message: TypeAlias = (
    WantHave | WantBlock | Cancel | HaveReply | Block | DontHave | Elsewhere | ErrorReply
)

REQUEST_TYPES: tuple[type[Request], ...] = (WantHave, WantBlock)
RESPONSE_TYPES: tuple[type[Response], ...] = (HaveReply, Block, DontHave, Elsewhere, ErrorReply)
_MESSAGE_TYPES = (*REQUEST_TYPES, Cancel, *RESPONSE_TYPES)


class MalformedMessage(RemoteProtocolError):
    """A frame that is a CBOR map but not a valid message.

    ``message_type`` is its ``"t"`` when that names a known type, and ``request_id`` its
    ``"id"`` when readable, so a server can answer a bad request instead of hanging up.
    """

    def __init__(self, reason: str, request_id: int | None, message_type: str | None) -> None:
        super().__init__(reason)
        self.request_id = request_id
        self.message_type = message_type


# ------------------------------------------------------------------------- codec


def encode_message(
    message: Message, *, max_block: int = MAX_BLOCK_LIMIT
) -> list[bytes | memoryview]:
    """The framed wire bytes of ``message``, as buffers to write in order.

    One buffer for every message but ``Block``, which gives two: its header frame plus
    the data frame's length prefix, then a view of ``data`` itself (not copied).
    ``LocalProtocolError`` if the message is invalid or its data exceeds ``max_block``.
    """
    if not isinstance(message, _MESSAGE_TYPES):
        raise LocalProtocolError(f"{type(message).__name__} is not a blocks message")
    fields = _to_map(message)
    try:
        _DECODERS[message.TYPE](fields)
    except Invalid as exc:
        raise LocalProtocolError(f"cannot send {message.TYPE}: {exc}") from None
    frame = encode_frame(_cbor.dumps(fields), MAX_CONTROL_FRAME)
    if not isinstance(message, Block):
        return [frame]
    data = byte_view(message.data)
    if data.nbytes > max_block:
        raise LocalProtocolError(
            f"block of {data.nbytes} bytes exceeds the {max_block}-byte block limit"
        )
    return [frame + encode_varint(data.nbytes), data]


def byte_view(data: BufferLike) -> memoryview:
    """``data`` as a flat view of bytes, without copying; ``LocalProtocolError`` if it
    is not a contiguous buffer."""
    try:
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise LocalProtocolError(f"block data is not a contiguous byte buffer: {exc}") from None


def decode_payload(payload: bytes) -> Message | BlockHeader:
    """Decode one control frame; a ``"block"`` frame gives the ``BlockHeader`` whose data
    is the next frame. ``MalformedMessage`` for a bad map, ``RemoteProtocolError`` for
    bad CBOR."""
    # A map of arrays of byte strings: nothing here nests deeper than 2.
    obj = _cbor.loads(payload, max_depth=2)
    if not isinstance(obj, dict):
        raise RemoteProtocolError("blocks message is not a CBOR map")
    raw_type, raw_id = obj.get("t"), obj.get("id")
    request_id = raw_id if type(raw_id) is int and 0 <= raw_id < REQUEST_ID_LIMIT else None
    if not isinstance(raw_type, str) or raw_type not in _DECODERS:
        shown = repr(raw_type)[:40]
        raise MalformedMessage(f"unknown blocks message type {shown}", request_id, None)
    try:
        return _DECODERS[raw_type](obj)
    except Invalid as exc:
        raise MalformedMessage(f"bad {raw_type} message: {exc}", request_id, raw_type) from None


class MessageReader:
    """Frames to messages: pairs each block header with the raw data frame after it.

    Data frames may be up to ``max_block`` bytes, every other frame up to
    ``MAX_CONTROL_FRAME``. ``next_message`` returns a ``BlockHeader`` as soon as one is
    read — so the machine can refuse an unwanted block before its data arrives — and the
    complete ``Block`` once the data frame is in.
    """

    __slots__ = ("_frames", "_header", "max_block")

    def __init__(self, max_block: int) -> None:
        self.max_block = max_block
        self._frames = FrameDecoder(max(max_block, MAX_CONTROL_FRAME))
        self._header: BlockHeader | None = None

    @property
    def max_read(self) -> int:
        return self._frames.max_read

    def receive_data(self, data: bytes) -> None:
        self._frames.receive_data(data)

    def next_message(self) -> Message | BlockHeader | None:
        """The next message, or ``None`` if more data is needed."""
        payload = self._frames.next_frame()
        if payload is None:
            return None
        header = self._header
        if header is not None:
            self._header = None
            if len(payload) > self.max_block:
                raise RemoteProtocolError(
                    f"block of {len(payload)} bytes exceeds the {self.max_block}-byte limit"
                )
            return Block(header.request_id, header.chunk_id, payload)
        if len(payload) > MAX_CONTROL_FRAME:
            raise RemoteProtocolError(
                f"control frame of {len(payload)} bytes exceeds the {MAX_CONTROL_FRAME}-byte limit"
            )
        message = decode_payload(payload)
        if isinstance(message, BlockHeader):
            self._header = message
        return message

    def eof(self) -> None:
        """The stream ended; ``RemoteProtocolError`` if it ended inside a message."""
        self._frames.eof()
        if self._header is not None:
            raise RemoteProtocolError("stream ended between a block header and its data")


def decode_messages(data: bytes, *, max_block: int = MAX_BLOCK_LIMIT) -> list[Message]:
    """Every message in ``data``, a complete stream of framed messages.

    Codec only: no request-id bookkeeping (that is ``BlockExchange``'s job). Raises
    ``RemoteProtocolError`` on anything malformed or truncated.
    """
    reader = MessageReader(max_block)
    messages: list[Message] = []
    step = reader.max_read
    with memoryview(data) as view:
        for start in range(0, len(view), step):
            reader.receive_data(view[start : start + step].tobytes())
            while (message := reader.next_message()) is not None:
                if not isinstance(message, BlockHeader):
                    messages.append(message)
    reader.eof()
    return messages


def _to_map(message: Message) -> dict[str, Value]:
    fields: dict[str, Value] = {"t": message.TYPE, "id": message.request_id}
    match message:
        case WantHave(chunk_ids=chunk_ids):
            fields.update(c=_id_list(chunk_ids))
        case WantBlock(chunk_id=chunk_id, blob_digest=digest, offset=offset, length=length):
            fields.update(c=chunk_id, b=digest, o=offset, n=length)
        case HaveReply(have=have, dont_have=dont_have):
            fields.update(h=_id_list(have), d=_id_list(dont_have))
        case Block(chunk_id=chunk_id):
            fields.update(c=chunk_id)
        case Elsewhere(peers=peers):
            if type(peers) is not tuple:
                raise LocalProtocolError(f"peers must be a tuple, not {type(peers).__name__}")
            fields.update(p=list(peers))
        case ErrorReply(code=code, message=text):
            fields.update(c=code, m=text)
    return fields


def _id_list(ids: object) -> list[Value]:
    # Tuples only, as annotated: a list would encode the same but decode unequal, and a
    # str or bytes would be iterated character by character.
    if type(ids) is not tuple:
        raise LocalProtocolError(f"chunk ids must be a tuple, not {type(ids).__name__}")
    return list(ids)


def _request_id(obj: Mapping[str, Value]) -> int:
    return get_int(obj, "id", 0, REQUEST_ID_LIMIT)


def _chunk_ids(obj: Mapping[str, Value], key: str, min_items: int) -> list[bytes]:
    ids = get_list_of(obj, key, MAX_IDS_PER_MESSAGE, bytes)
    if len(ids) < min_items:
        raise Invalid(f"{key!r} is empty")
    for chunk_id in ids:
        if len(chunk_id) != CHUNK_ID_SIZE:
            raise Invalid(f"{key!r} holds a {len(chunk_id)}-byte chunk id (expected 32)")
    return ids


def _decode_want_have(obj: Mapping[str, Value]) -> WantHave:
    check_keys(obj, ("t", "id", "c"))
    ids = _chunk_ids(obj, "c", 1)
    if len(set(ids)) != len(ids):
        raise Invalid("'c' lists a chunk id twice")
    return WantHave(request_id=_request_id(obj), chunk_ids=tuple(ids))


def _decode_want_block(obj: Mapping[str, Value]) -> WantBlock:
    check_keys(obj, ("t", "id", "c", "b", "o", "n"))
    digest = get_str(obj, "b", _MAX_DIGEST_FIELD)
    check_digest(digest)
    offset = get_int(obj, "o", 0, MAX_OFFSET)
    length = get_int(obj, "n", 0, MAX_BLOCK_LIMIT + 1)
    if offset + length > MAX_OFFSET:
        raise Invalid(f"offset {offset} + length {length} is past the largest blob")
    return WantBlock(
        request_id=_request_id(obj),
        chunk_id=get_bytes(obj, "c", CHUNK_ID_SIZE, CHUNK_ID_SIZE),
        blob_digest=digest,
        offset=offset,
        length=length,
    )


def _decode_cancel(obj: Mapping[str, Value]) -> Cancel:
    check_keys(obj, ("t", "id"))
    return Cancel(request_id=_request_id(obj))


def _decode_have_reply(obj: Mapping[str, Value]) -> HaveReply:
    check_keys(obj, ("t", "id", "h", "d"))
    have, dont_have = _chunk_ids(obj, "h", 0), _chunk_ids(obj, "d", 0)
    total = len(have) + len(dont_have)
    if total > MAX_IDS_PER_MESSAGE:
        raise Invalid(f"{total} chunk ids in one reply (the limit is {MAX_IDS_PER_MESSAGE})")
    if len(set(have) | set(dont_have)) != total:
        raise Invalid("a chunk id is listed twice")
    return HaveReply(request_id=_request_id(obj), have=tuple(have), dont_have=tuple(dont_have))


def _decode_block_header(obj: Mapping[str, Value]) -> BlockHeader:
    check_keys(obj, ("t", "id", "c"))
    return BlockHeader(
        request_id=_request_id(obj), chunk_id=get_bytes(obj, "c", CHUNK_ID_SIZE, CHUNK_ID_SIZE)
    )


def _decode_dont_have(obj: Mapping[str, Value]) -> DontHave:
    check_keys(obj, ("t", "id"))
    return DontHave(request_id=_request_id(obj))


def _decode_elsewhere(obj: Mapping[str, Value]) -> Elsewhere:
    check_keys(obj, ("t", "id", "p"))
    peers = get_list_of(obj, "p", MAX_ELSEWHERE_PEERS, str)
    if not peers:
        raise Invalid("'p' is empty")
    if len(set(peers)) != len(peers):
        raise Invalid("'p' names a peer twice")
    for peer in peers:
        # Peer ids are base58btc: ASCII letters and digits only.
        if not 1 <= len(peer) <= MAX_PEER_ID_LENGTH or not (peer.isascii() and peer.isalnum()):
            raise Invalid(f"'p' holds something that is not a peer id: {peer[:80]!r}")
    return Elsewhere(request_id=_request_id(obj), peers=tuple(peers))


def _decode_error_reply(obj: Mapping[str, Value]) -> ErrorReply:
    check_keys(obj, ("t", "id", "c", "m"))
    code = get_str(obj, "c", 32)
    if code not in ERROR_CODES:
        raise Invalid(f"unknown error code {code!r}")
    return ErrorReply(
        request_id=None if obj["id"] is None else _request_id(obj),
        code=code,
        message=get_str(obj, "m", MAX_ERROR_MESSAGE_LENGTH),
    )


_DECODERS: dict[str, Callable[[Mapping[str, Value]], Message | BlockHeader]] = {
    WantHave.TYPE: _decode_want_have,
    WantBlock.TYPE: _decode_want_block,
    Cancel.TYPE: _decode_cancel,
    HaveReply.TYPE: _decode_have_reply,
    Block.TYPE: _decode_block_header,
    DontHave.TYPE: _decode_dont_have,
    Elsewhere.TYPE: _decode_elsewhere,
    ErrorReply.TYPE: _decode_error_reply,
}

# The longest Block prefix (header frame + data length prefix) any block can have: a
# sender that reserves this much room in front of its data can frame it in place.
MAX_BLOCK_PREFIX = len(
    encode_frame(
        _cbor.dumps({"t": Block.TYPE, "id": REQUEST_ID_LIMIT - 1, "c": bytes(CHUNK_ID_SIZE)}),
        MAX_CONTROL_FRAME,
    )
) + len(encode_varint(MAX_BLOCK_LIMIT))
