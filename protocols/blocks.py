"""``/dmm/blocks/1``: bitswap-style exchange of model chunks — one stream, pipelined wants.

Sans-IO, in the style of h11, like ``catalog.py``: ``BlockExchange.receive_data`` takes
bytes read from the stream, ``next_event`` returns decoded events (or ``NEED_DATA``),
``send`` returns the bytes to write. The caller owns the stream, the timers and the
peer's score; on ``RemoteProtocolError`` it resets the stream and counts it against the
peer. Messages and their wire format are in ``_blocks_events.py``.

The client (fetching side) asks, the server (serving side) answers each request once::

    WantHave(id, chunk_ids)                      -> HaveReply(id, have, dont_have)
    WantBlock(id, chunk_id, blob, offset, length) -> Block(id, chunk_id, data) | DontHave(id)
                                                    | Elsewhere(id, peers)
    either request                               -> ErrorReply(id, code, message)
    Cancel(id)                                   -> no reply

Rules enforced on both sides (``LocalProtocolError`` when we break them,
``RemoteProtocolError`` when the peer does):

- Request ids strictly increase on a stream (gaps allowed). That is what lets the server
  forget cancelled requests at once: a reply to an id it has seen but no longer holds is
  stale, whatever the reason.
- A reply answers an outstanding request with the right kind: a ``HaveReply`` lists every
  asked id exactly once; a ``Block`` carries the requested chunk id and exactly the
  requested length. The chunk's sha256 is *not* checked here, so hashing stays off the
  event loop: call ``verify_block`` in a worker thread.
- The client keeps at most ``max_in_flight`` requests outstanding. The server holds up to
  ``max_wantlist``; a request past that comes out as ``BadRequest(code="refused")`` for
  the node to answer, and a peer that keeps asking up to twice the limit breaks the stream.

Cancel. On the server, ``next_event`` reports a ``Cancel`` of an outstanding request (stop
the work) and the request is dropped: a later ``send`` of its reply returns ``b""`` and
changes nothing, so a worker finishing late needs no special case. A reply sent before
the server read the Cancel still reaches the client, which checks it and drops it
unreported. The client remembers such an id until a reply to a request sent after the
Cancel proves the server has read it (the server reads in order), and holds at most
``max_in_flight`` of them: cancelling more on a peer that answers nothing raises
``LocalProtocolError`` — close that stream instead.

Writing a block (the data is up to 2 MiB; the stream wants few, large writes):

- ``send(block)`` joins the header and the data: one copy of the data.
- ``send_with_data_passthrough(block)`` returns ``[prefix, data]`` with ``data`` uncopied.
- ``send_block_in_place`` copies no data at all: read the chunk from the blob file
  straight into a buffer that leaves ``MAX_BLOCK_PREFIX`` bytes in front of it, and it
  writes the prefix into that room and returns the one view to write (empty if the
  request was cancelled meanwhile)::

      buf = bytearray(MAX_BLOCK_PREFIX + want.length)
      os.preadv(fd, [memoryview(buf)[MAX_BLOCK_PREFIX:]], want.offset)  # worker thread
      await stream.write(conn.send_block_in_place(want.request_id, want.chunk_id, buf))

Server loop::

    conn = BlockExchange(Role.SERVER)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:                # read at most conn.max_read bytes
            data = await read()
            conn.receive_eof() if not data else conn.receive_data(data)
        elif isinstance(event, EndOfStream):
            break                             # finish outstanding work, send(EndOfStream())
        elif isinstance(event, BadRequest):
            await write(conn.send(event.error_reply()))
        elif isinstance(event, Cancel):
            stop_work(event.request_id)
        else:
            start_work(event)                 # replies through send / send_block_in_place
"""

from __future__ import annotations

import enum
import hashlib
from typing import TypeAlias

from ._blocks_events import (
    CHUNK_ID_SIZE,
    DEFAULT_MAX_BLOCK,
    ERROR_CODES,
    MAX_BLOCK_LIMIT,
    MAX_BLOCK_PREFIX,
    MAX_CONTROL_FRAME,
    MAX_ELSEWHERE_PEERS,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_IDS_PER_MESSAGE,
    MAX_OFFSET,
    REQUEST_ID_LIMIT,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    BadRequest,
    Block,
    BlockHeader,
    BufferLike,
    Cancel,
    DontHave,
    Elsewhere,
    EndOfStream,
    ErrorReply,
    HaveReply,
    MalformedMessage,
    Message,
    MessageReader,
    Request,
    Response,
    WantBlock,
    WantHave,
    byte_view,
    decode_messages,
    encode_message,
)
from ._machine import NEED_DATA, NeedData, Role, State, StreamMachine
from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CHUNK_ID_SIZE",
    "DEFAULT_MAX_BLOCK",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_WANTLIST",
    "ERROR_CODES",
    "MAX_BLOCK_LIMIT",
    "MAX_BLOCK_PREFIX",
    "MAX_CONTROL_FRAME",
    "MAX_ELSEWHERE_PEERS",
    "MAX_ERROR_MESSAGE_LENGTH",
    "MAX_IDS_PER_MESSAGE",
    "MAX_OFFSET",
    "NEED_DATA",
    "PROTOCOL_ID",
    "REQUEST_ID_LIMIT",
    "BadRequest",
    "Block",
    "BlockExchange",
    "BufferLike",
    "Cancel",
    "DontHave",
    "Elsewhere",
    "EndOfStream",
    "ErrorReply",
    "Event",
    "HaveReply",
    "MalformedMessage",
    "Message",
    "NeedData",
    "Request",
    "Response",
    "Role",
    "State",
    "WantBlock",
    "WantHave",
    "decode_messages",
    "encode_message",
    "verify_block",
]

PROTOCOL_ID = "/dmm/blocks/1"
# 16 blocks of 2 MiB in flight is ~32 MiB per peer: enough to keep a LAN link at
# 200 MB/s busy through ~150 ms of round trip and disk latency.
DEFAULT_MAX_IN_FLIGHT = 16
# A server holds a few default clients' worth of wants before refusing.
DEFAULT_MAX_WANTLIST = 64


Event: TypeAlias = Message | BadRequest | EndOfStream


class _Kind(enum.Enum):
    REQUEST = "request"
    CANCEL = "cancel"
    RESPONSE = "response"
    FINAL = "final"  # ErrorReply(None): a server's last word
    EOF = "eof"


# Everything that moves a side from one state to another is in this table, keyed by
# (the side's role, its current state, what it sends). A missing entry is illegal:
# LocalProtocolError when we send it, RemoteProtocolError when the peer does. The
# request-id bookkeeping (see BlockExchange) is checked on top of it.
_TRANSITIONS: dict[tuple[Role, State, _Kind], State] = {
    (Role.CLIENT, State.OPEN, _Kind.REQUEST): State.OPEN,
    (Role.CLIENT, State.OPEN, _Kind.CANCEL): State.OPEN,
    (Role.CLIENT, State.OPEN, _Kind.EOF): State.CLOSED,
    (Role.SERVER, State.OPEN, _Kind.RESPONSE): State.OPEN,
    (Role.SERVER, State.OPEN, _Kind.FINAL): State.DONE,
    (Role.SERVER, State.OPEN, _Kind.EOF): State.CLOSED,
    (Role.SERVER, State.DONE, _Kind.EOF): State.CLOSED,
}

# Message types a server answers with BadRequest when malformed; the rest (responses,
# and cancels, which have no reply) break the stream.
_NOT_ANSWERABLE = frozenset({Cancel.TYPE, *(t.TYPE for t in RESPONSE_TYPES)})


def verify_block(chunk_id: bytes, data: BufferLike) -> bool:
    """Whether ``data`` hashes to ``chunk_id``. Hashes megabytes: call it in a worker
    thread (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(data).digest() == chunk_id


def _kind(role: Role, event: object) -> _Kind | None:
    """What ``event`` is when sent by ``role``; ``None`` if that role may not send it."""
    if isinstance(event, EndOfStream):
        return _Kind.EOF
    if role is Role.CLIENT:
        if isinstance(event, REQUEST_TYPES):
            return _Kind.REQUEST
        return _Kind.CANCEL if isinstance(event, Cancel) else None
    if isinstance(event, ErrorReply) and event.request_id is None:
        return _Kind.FINAL
    return _Kind.RESPONSE if isinstance(event, (*RESPONSE_TYPES, BlockHeader)) else None


def _reply_mismatch(request: Request | BadRequest, response: Response | BlockHeader) -> str | None:
    """Why ``response`` cannot answer ``request``, or ``None`` if it can."""
    if isinstance(response, ErrorReply):
        return None
    match request:
        case WantHave(chunk_ids=asked):
            if not isinstance(response, HaveReply):
                return f"{response.TYPE} does not answer want-have"
            answered = response.have + response.dont_have
            if len(answered) != len(asked) or set(answered) != set(asked):
                return "have reply does not list exactly the chunk ids asked for"
        case WantBlock():
            if isinstance(response, DontHave | Elsewhere):
                return None
            if not isinstance(response, (Block, BlockHeader)):
                return f"{response.TYPE} does not answer want-block"
            if response.chunk_id != request.chunk_id:
                return "block chunk id differs from the one requested"
            if isinstance(response, Block):
                size = byte_view(response.data).nbytes
                if size != request.length:
                    return f"block of {size} bytes answers a request for {request.length}"
        case BadRequest():
            return "a bad request can only be answered with an error"
    return None


class BlockExchange(StreamMachine[Event]):
    """One side of a ``/dmm/blocks/1`` stream.

    ``max_frame`` is the largest block this side asks for, serves or accepts (the
    chunker's max size, at most ``MAX_BLOCK_LIMIT``); both ends should agree on it. A
    server refuses wants for larger blocks with ``BadRequest(code="refused")``. Other
    frames are capped at ``MAX_CONTROL_FRAME`` whatever ``max_frame`` is.
    A ``send`` that raises ``LocalProtocolError`` changes nothing.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_BLOCK,
        max_wantlist: int = DEFAULT_MAX_WANTLIST,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if not 0 < max_frame <= MAX_BLOCK_LIMIT:
            raise LocalProtocolError(f"max_frame must be in 1..{MAX_BLOCK_LIMIT}, not {max_frame}")
        if max_wantlist < 1 or max_in_flight < 1:
            raise LocalProtocolError("max_wantlist and max_in_flight must be at least 1")
        # A server only ever receives control frames: no peer can make it buffer a block.
        self._reader = MessageReader(max_frame if role is Role.CLIENT else 0)
        super().__init__(role, self._reader)
        self.max_frame = max_frame
        self.max_wantlist = max_wantlist
        self.max_in_flight = max_in_flight
        # The highest request id sent (client) or received (server); ids must increase.
        self._highest_id = -1
        # Requests sent and not yet answered (client), or received and not yet answered
        # (server). Insertion order is request order.
        self._outstanding: dict[int, Request | BadRequest] = {}
        # Client only: cancelled requests whose reply may still cross the Cancel, with
        # the highest id sent when each was cancelled. Cancel order, so the watermarks
        # never decrease.
        self._cancelled: dict[int, tuple[Request | BadRequest, int]] = {}

    # ------------------------------------------------------------------ state

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Ids of the requests awaiting a reply, oldest first."""
        return tuple(self._outstanding)

    @property
    def cancelled(self) -> tuple[int, ...]:
        """Client: ids cancelled whose reply may still arrive (and will be dropped)."""
        return tuple(self._cancelled)

    @property
    def next_request_id(self) -> int:
        """The smallest id the client may use for its next request."""
        return self._highest_id + 1

    # ---------------------------------------------------------------- receive

    def _end_of_stream(self) -> Event:
        return EndOfStream()

    def _next_event(self) -> Event | NeedData:
        # Loops past what the caller never needs to see: block headers (checked, then
        # completed by their data), replies to cancelled requests, cancels of requests
        # already answered, and requests that crossed the server's close.
        while True:
            try:
                message = self._reader.next_message()
            except MalformedMessage as exc:
                if self.role is Role.CLIENT or exc.message_type in _NOT_ANSWERABLE:
                    raise
                # Truncated so it always fits the ErrorReply that answers it.
                bad = BadRequest(exc.request_id, str(exc)[:MAX_ERROR_MESSAGE_LENGTH])
                self._peer_sent(_Kind.REQUEST, bad)
                if self.our_state is State.OPEN:
                    return bad
                continue
            if message is None:
                if not self._eof_received:
                    return NEED_DATA
                self._reader.eof()  # raises if the stream ended inside a message
                self._peer_sent(_Kind.EOF, EndOfStream())
                return EndOfStream()
            kind = _kind(self._peer_role, message)
            if kind is None:
                raise RemoteProtocolError(
                    f"{self._peer_role.value} sent {message.TYPE}, which only a "
                    f"{self.role.value} may send"
                )
            if isinstance(message, BlockHeader):
                # Refuse an unwanted block before its data arrives.
                reason = self._check(self._peer_role, kind, message)
                if reason is not None:
                    raise RemoteProtocolError(reason)
                continue
            if isinstance(message, REQUEST_TYPES):
                event = self._admit(message)
                self._peer_sent(kind, event)
                if self.our_state is State.OPEN:
                    return event
                continue
            if isinstance(message, Cancel):
                surfaced = message.request_id in self._outstanding
                self._peer_sent(kind, message)
                if surfaced:
                    return message
                continue
            crossed_cancel = message.request_id in self._cancelled
            self._peer_sent(kind, message)
            if not crossed_cancel:
                return message

    def _admit(self, request: Request) -> Request | BadRequest:
        """Server: ``request``, or a refusal of it when it is over this side's limits."""
        if len(self._outstanding) >= self.max_wantlist:
            return BadRequest(
                request.request_id,
                f"wantlist full: {len(self._outstanding)} requests outstanding "
                f"(the limit is {self.max_wantlist})",
                "refused",
            )
        if isinstance(request, WantBlock) and request.length > self.max_frame:
            return BadRequest(
                request.request_id,
                f"block of {request.length} bytes asked for; this server sends at most "
                f"{self.max_frame}",
                "refused",
            )
        return request

    def _peer_sent(self, kind: _Kind, event: Event) -> None:
        reason = self._check(self._peer_role, kind, event)
        if reason is not None:
            raise RemoteProtocolError(reason)
        self._apply(self._peer_role, kind, event)

    # ------------------------------------------------------------------- send

    def send(self, event: Message | EndOfStream) -> bytes:
        """The bytes to write for ``event``.

        ``b""`` for ``EndOfStream`` (then close the stream for writing), for a reply to
        a request that is no longer outstanding (cancelled, or answered after a final
        ``ErrorReply(None)``), and for a ``Cancel`` of a request already answered.
        A ``Block``'s data is copied once here; see ``send_block_in_place``.
        """
        return b"".join(self.send_with_data_passthrough(event))

    def send_with_data_passthrough(self, event: Message | EndOfStream) -> list[bytes | memoryview]:
        """Like ``send``, as buffers to write in order: a ``Block`` gives its prefix and
        then a view of its data, uncopied; an empty list means write nothing."""
        kind = _kind(self.role, event)
        if kind is None:
            raise LocalProtocolError(f"a {self.role.value} cannot send {type(event).__name__}")
        # Encoding first validates every field, so the bookkeeping below only ever
        # sees well-typed ids; for a Block it costs the header, not the data.
        buffers: list[bytes | memoryview] = []
        if not isinstance(event, EndOfStream):
            buffers = encode_message(event, max_block=self.max_frame)
        if self._is_stale(event):
            return []
        reason = self._check(self.role, kind, event)
        if reason is not None:
            raise LocalProtocolError(reason)
        self._apply(self.role, kind, event)
        return buffers

    def send_block_in_place(
        self, request_id: int, chunk_id: bytes, buffer: bytearray | memoryview
    ) -> memoryview:
        """Send a block whose data the caller put at ``buffer[MAX_BLOCK_PREFIX:]``.

        Writes the block's prefix into the room just before the data and returns the
        view of ``buffer`` to write — one contiguous write, no copy of the data. An
        empty view if the request is no longer outstanding (then write nothing).
        """
        view = byte_view(buffer)
        if view.readonly:
            raise LocalProtocolError("send_block_in_place needs a writable buffer")
        if view.nbytes < MAX_BLOCK_PREFIX:
            raise LocalProtocolError(
                f"buffer of {view.nbytes} bytes has no room for the {MAX_BLOCK_PREFIX}-byte prefix"
            )
        block = Block(request_id, chunk_id, view[MAX_BLOCK_PREFIX:])
        buffers = self.send_with_data_passthrough(block)
        if not buffers:
            return view[:0]
        prefix = buffers[0]
        start = MAX_BLOCK_PREFIX - len(prefix)
        view[start:MAX_BLOCK_PREFIX] = prefix
        return view[start:]

    def _is_stale(self, event: Message | EndOfStream) -> bool:
        """A reply or cancel for a request seen before but no longer outstanding."""
        # Spelled out, not *RESPONSE_TYPES: mypy narrows only on a literal tuple.
        replies = (Cancel, HaveReply, Block, DontHave, Elsewhere, ErrorReply)
        if not isinstance(event, replies) or event.request_id is None:
            return False
        return event.request_id <= self._highest_id and event.request_id not in self._outstanding

    # ---------------------------------------------------- shared bookkeeping

    def _check(self, sender: Role, kind: _Kind, event: Event | BlockHeader) -> str | None:
        """Why ``sender`` may not send ``event`` now, or ``None``."""
        state = self._states[sender]
        if (sender, state, kind) not in _TRANSITIONS:
            return f"{sender.value} in state {state.value} cannot send {kind.value}"
        local = sender is self.role
        if isinstance(event, (WantHave, WantBlock, BadRequest)):
            if local and self.their_state is not State.OPEN:
                # Only checked for our own requests: the peer's may cross our close.
                return "the server has ended its side; no request can be answered"
            request_id = event.request_id
            if request_id is None:
                return None
            if request_id <= self._highest_id:
                return f"request id {request_id} does not increase on {self._highest_id}"
            if not local:
                if len(self._outstanding) >= 2 * self.max_wantlist:
                    return (
                        f"{len(self._outstanding)} requests outstanding: the peer ignores "
                        f"the wantlist limit of {self.max_wantlist}"
                    )
            elif len(self._outstanding) >= self.max_in_flight:
                return (
                    f"{len(self._outstanding)} requests in flight "
                    f"(the limit is {self.max_in_flight})"
                )
            elif isinstance(event, WantBlock) and event.length > self.max_frame:
                return f"block of {event.length} bytes exceeds max_frame {self.max_frame}"
        elif isinstance(event, Cancel):
            if event.request_id > self._highest_id:
                return f"cancel of request id {event.request_id}, which was never sent"
            if local and len(self._cancelled) >= self.max_in_flight:
                return (
                    f"{len(self._cancelled)} cancels unconfirmed: the server is not "
                    "answering, close the stream instead"
                )
        elif (
            isinstance(event, (HaveReply, Block, DontHave, Elsewhere, ErrorReply, BlockHeader))
            and event.request_id is not None
        ):
            request = self._outstanding.get(event.request_id)
            if request is None and event.request_id in self._cancelled:
                request = self._cancelled[event.request_id][0]
            if request is None:
                return f"reply to request id {event.request_id}, which is not outstanding"
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
            self._cancelled.clear()
        elif isinstance(event, (WantHave, WantBlock, BadRequest)):
            if event.request_id is None:
                return
            self._highest_id = event.request_id
            # A server past its final reply or close answers nothing more: requests
            # that crossed it are not kept.
            if self.role is Role.CLIENT or self.our_state is State.OPEN:
                self._outstanding[event.request_id] = event
        elif isinstance(event, Cancel):
            request = self._outstanding.pop(event.request_id, None)
            if request is not None and self.role is Role.CLIENT:
                self._cancelled[event.request_id] = (request, self._highest_id)
        elif isinstance(event, RESPONSE_TYPES) and event.request_id is not None:
            request_id = event.request_id
            if self._outstanding.pop(request_id, None) is None:
                self._cancelled.pop(request_id, None)
            # The server reads in order and sends nothing for a request after reading
            # its Cancel; so any reply to a request sent after a Cancel proves that
            # Cancel was read, and no reply to the cancelled request can follow.
            while self._cancelled:
                first, (_, watermark) = next(iter(self._cancelled.items()))
                if watermark >= request_id:
                    break
                del self._cancelled[first]
