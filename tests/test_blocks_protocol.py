"""protocols/blocks.py: the /dmm/blocks/1 codec and the BlockExchange machine.

The codec is checked like the catalog's (tests/test_protocols.py): hypothesis round trips,
hypothesis garbage that may only raise RemoteProtocolError, and tables of named bad
inputs pinned to the reason each is refused for. The machine is checked by pairing a
client and a server in memory, feeding each the other's bytes at random split points.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import re
from collections.abc import Iterable

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.blocks import (
    DEFAULT_MAX_BLOCK,
    MAX_BLOCK_LIMIT,
    MAX_BLOCK_PREFIX,
    MAX_CONTROL_FRAME,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_IDS_PER_MESSAGE,
    NEED_DATA,
    REQUEST_ID_LIMIT,
    BadRequest,
    Block,
    BlockExchange,
    Cancel,
    DontHave,
    Elsewhere,
    EndOfStream,
    ErrorReply,
    Event,
    HaveReply,
    Message,
    Request,
    Response,
    Role,
    State,
    WantBlock,
    WantHave,
    decode_messages,
    encode_message,
    verify_block,
)
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import encode_frame, encode_varint

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MiB = 1024 * 1024
BLOB = "sha256:" + "ab" * 32
A, B, C = (bytes([n]) * 32 for n in (0xA, 0xB, 0xC))


def chunk(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def drain(conn: BlockExchange) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, EndOfStream):
            return events


def feed(conn: BlockExchange, pieces: Iterable[bytes], *, eof: bool = False) -> list[Event]:
    """Feed ``pieces`` as a node would: at most ``max_read`` bytes a call, drained between."""
    events: list[Event] = []
    for piece in pieces:
        for start in range(0, len(piece), conn.max_read):
            conn.receive_data(piece[start : start + conn.max_read])
            events += drain(conn)
    if eof:
        conn.receive_eof()
        events += drain(conn)
    return events


def split_randomly(stream: bytes, data: st.DataObject) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def frame(fields: object) -> bytes:
    return encode_frame(cbor2.dumps(fields, canonical=True), MAX_CONTROL_FRAME)


def want_block(request_id: int, data: bytes, offset: int = 0) -> WantBlock:
    return WantBlock(request_id, chunk(data), BLOB, offset, len(data))


def connected(**limits: int) -> tuple[BlockExchange, BlockExchange]:
    return BlockExchange(Role.CLIENT, **limits), BlockExchange(Role.SERVER, **limits)


def deliver(sender: BlockExchange, receiver: BlockExchange, *events: Message) -> list[Event]:
    return feed(receiver, [sender.send(e) for e in events])


# ------------------------------------------------------------------- codec

request_ids = st.integers(0, REQUEST_ID_LIMIT - 1)
chunk_ids = st.binary(min_size=32, max_size=32)
digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
printable = st.text(max_size=40).filter(str.isprintable)


@st.composite
def have_replies(draw: st.DrawFn) -> HaveReply:
    ids = draw(st.lists(chunk_ids, max_size=12, unique=True))
    cut = draw(st.integers(0, len(ids)))
    return HaveReply(draw(request_ids), tuple(ids[:cut]), tuple(ids[cut:]))


@st.composite
def want_blocks(draw: st.DrawFn) -> WantBlock:
    length = draw(st.integers(0, MAX_BLOCK_LIMIT))
    offset = draw(st.integers(0, (1 << 63) - length))
    return WantBlock(draw(request_ids), draw(chunk_ids), draw(digests), offset, length)


def as_view(data: bytes) -> memoryview:
    return memoryview(data)


messages_st: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        WantHave, request_ids, st.lists(chunk_ids, min_size=1, max_size=12, unique=True).map(tuple)
    ),
    want_blocks(),
    st.builds(Cancel, request_ids),
    have_replies(),
    st.builds(
        Block,
        request_ids,
        chunk_ids,
        st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=300).map(bytearray),
            st.binary(max_size=300).map(as_view),
        ),
    ),
    st.builds(DontHave, request_ids),
    st.builds(
        Elsewhere,
        request_ids,
        st.lists(
            st.text(
                "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz",
                min_size=1,
                max_size=64,
            ),
            min_size=1,
            max_size=8,
            unique=True,
        ).map(tuple),
    ),
    st.builds(
        ErrorReply,
        st.one_of(st.none(), request_ids),
        st.sampled_from(["not-found", "bad-request", "refused", "internal"]),
        printable,
    ),
)


@FUZZ
@given(messages_st)
def test_every_message_round_trips(message: Message) -> None:
    wire = b"".join(encode_message(message))
    assert decode_messages(wire) == [message]


@FUZZ
@given(st.lists(messages_st, max_size=6), st.data())
def test_message_sequences_round_trip_at_any_split(
    msgs: list[Message], data: st.DataObject
) -> None:
    wire = b"".join(b"".join(encode_message(m)) for m in msgs)
    assert decode_messages(wire) == msgs
    # The machine's reader sees the same frames whatever the read sizes.
    pieces = split_randomly(wire, data)
    assert decode_messages(b"".join(pieces)) == msgs


def test_block_data_is_passed_through_uncopied() -> None:
    data = os.urandom(1000)
    header, body = encode_message(Block(1, chunk(data), data))
    assert isinstance(body, memoryview) and body.obj is data
    assert isinstance(header, bytes)
    assert len(header) <= MAX_BLOCK_PREFIX
    # A header frame, then a raw frame of exactly the data: no CBOR around the data.
    assert header.endswith(encode_varint(len(data)))


def test_the_largest_messages_fit_the_frame_limits() -> None:
    last = REQUEST_ID_LIMIT - 1
    ids = tuple(i.to_bytes(32, "big") for i in range(MAX_IDS_PER_MESSAGE))
    biggest: list[Message] = [
        WantHave(last, ids),
        HaveReply(last, ids[:500], ids[500:]),
        ErrorReply(last, "bad-request", "\U0001f600" * MAX_ERROR_MESSAGE_LENGTH),
        WantBlock(last, A, BLOB, (1 << 63) - MAX_BLOCK_LIMIT, MAX_BLOCK_LIMIT),
    ]
    for message in biggest:
        (wire,) = encode_message(message)  # encode_frame refuses frames over the limit
        assert isinstance(wire, bytes)
        assert decode_messages(wire) == [message]
    header, _ = encode_message(Block(last, A, bytes(MAX_BLOCK_LIMIT)))
    assert len(header) == MAX_BLOCK_PREFIX


def test_verify_block() -> None:
    data = os.urandom(3000)
    assert verify_block(chunk(data), data)
    assert verify_block(chunk(data), memoryview(bytearray(data)))
    assert not verify_block(chunk(data), data[:-1])
    assert not verify_block(A, data)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=40)
    | st.sampled_from([A, B, C, BLOB])
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)
TYPES = ["want-have", "want-block", "cancel", "have", "block", "dont-have", "error", "?"]


@FUZZ
@given(
    st.sampled_from(TYPES),
    st.dictionaries(st.sampled_from(["id", "c", "b", "o", "n", "h", "d", "m"]), cbor_values),
    st.binary(max_size=64),
)
def test_random_maps_only_raise_remote_errors(
    kind: str, fields: dict[str, object], tail: bytes
) -> None:
    payload = frame({"t": kind, **fields}) + tail
    with contextlib.suppress(RemoteProtocolError):
        decode_messages(payload)
    for conn in busy_pair():
        with contextlib.suppress(RemoteProtocolError):
            feed(conn, [payload], eof=True)


@FUZZ
@given(st.binary(max_size=1500), st.sampled_from(list(Role)), st.booleans())
def test_random_bytes_only_raise_remote_errors(data: bytes, role: Role, busy: bool) -> None:
    conn = busy_pair()[0 if role is Role.CLIENT else 1] if busy else BlockExchange(role)
    try:
        events = feed(conn, [data], eof=True)
    except RemoteProtocolError as exc:
        assert "\n" not in str(exc)
    else:
        if role is Role.SERVER:
            assert all(
                isinstance(e, (WantHave, WantBlock, Cancel, BadRequest, EndOfStream))
                for e in events
            )


def busy_pair() -> tuple[BlockExchange, BlockExchange]:
    """A client and a server with requests 0..2 outstanding, so replies have something to match."""
    client, server = connected(max_frame=4096)
    requests: list[Request] = [
        WantHave(0, (A, B)),
        WantBlock(1, A, BLOB, 0, 10),
        WantBlock(2, B, BLOB, 10, 20),
    ]
    assert deliver(client, server, *requests) == requests
    return client, server


# ------------------------------------------------------- the machines, paired

chunks_st = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=6, unique_by=chunk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks_st, st.data())
def test_client_and_server_in_memory_pipelined_out_of_order(
    chunks: list[bytes], data: st.DataObject
) -> None:
    held = {chunk(c): c for c in chunks if data.draw(st.booleans())}
    client, server = connected(max_frame=300)
    requests: list[Request] = [WantHave(0, tuple(chunk(c) for c in chunks))]
    requests += [want_block(i + 1, c, offset=i * 300) for i, c in enumerate(chunks)]
    wire = b"".join(client.send(r) for r in requests) + client.send(EndOfStream())
    assert client.outstanding == tuple(r.request_id for r in requests)

    assert feed(server, split_randomly(wire, data), eof=True) == [*requests, EndOfStream()]

    replies = [serve(r, held) for r in data.draw(st.permutations(requests))]
    wire = b"".join(server.send(r) for r in replies) + server.send(EndOfStream())
    assert server.our_state is State.CLOSED

    assert feed(client, split_randomly(wire, data), eof=True) == [*replies, EndOfStream()]
    assert client.outstanding == ()
    assert (client.our_state, client.their_state) == (State.CLOSED, State.CLOSED)


def serve(request: Request, held: dict[bytes, bytes]) -> Response:
    """A stand-in for the node."""
    match request:
        case WantHave(request_id=rid, chunk_ids=ids):
            return HaveReply(
                rid, tuple(i for i in ids if i in held), tuple(i for i in ids if i not in held)
            )
        case WantBlock(request_id=rid, chunk_id=cid):
            return Block(rid, cid, held[cid]) if cid in held else DontHave(rid)
    raise AssertionError(request)


@pytest.mark.parametrize("how", ["send", "passthrough", "in_place"])
def test_two_mib_blocks_arrive_bit_exact_at_any_split(how: str) -> None:
    rng = random.Random(how)
    blocks = [os.urandom(DEFAULT_MAX_BLOCK), os.urandom(DEFAULT_MAX_BLOCK - 1), os.urandom(1)]
    client, server = connected(max_in_flight=len(blocks))
    wants = [want_block(i, data, offset=i * DEFAULT_MAX_BLOCK) for i, data in enumerate(blocks)]
    assert deliver(client, server, *wants) == wants

    wire = bytearray()
    for want, data in reversed(list(zip(wants, blocks, strict=True))):
        if how == "send":
            wire += server.send(Block(want.request_id, want.chunk_id, data))
        elif how == "passthrough":
            for buffer in server.send_with_data_passthrough(
                Block(want.request_id, want.chunk_id, data)
            ):
                wire += buffer
        else:
            room = bytearray(MAX_BLOCK_PREFIX + want.length)
            room[MAX_BLOCK_PREFIX:] = data
            out = server.send_block_in_place(want.request_id, want.chunk_id, room)
            assert out.obj is room  # the caller's buffer, framed in place
            wire += out
    assert server.outstanding == ()

    cuts = sorted(rng.sample(range(1, len(wire)), 40))
    pieces = [bytes(wire[a:b]) for a, b in itertools.pairwise([0, *cuts, len(wire)])]
    events = feed(client, pieces)
    assert [type(e) for e in events] == [Block] * 3
    for event, want, data in zip(events, reversed(wants), reversed(blocks), strict=True):
        assert isinstance(event, Block) and event.request_id == want.request_id
        assert event.data == data and type(event.data) is bytes
        assert verify_block(event.chunk_id, event.data)
    assert client.outstanding == ()


def test_blocks_up_to_the_configured_limit_in_64k_reads() -> None:
    data = os.urandom(MAX_BLOCK_LIMIT)
    client, server = connected(max_frame=MAX_BLOCK_LIMIT)
    deliver(client, server, want_block(0, data))
    wire = server.send(Block(0, chunk(data), data))
    (event,) = feed(client, [wire[i : i + 65536] for i in range(0, len(wire), 65536)])
    assert isinstance(event, Block) and event.data == data


def test_want_have_and_dont_have() -> None:
    client, server = connected()
    asked = WantHave(0, (A, B, C))
    want = WantBlock(1, C, BLOB, 0, 100)
    assert deliver(client, server, asked, want) == [asked, want]
    replies: list[Response] = [DontHave(1), HaveReply(0, (B,), (C, A))]
    assert deliver(server, client, *replies) == replies
    assert client.outstanding == server.outstanding == ()


def test_elsewhere_answers_a_want_block_and_names_peers() -> None:
    client, server = connected()
    want = WantBlock(3, C, BLOB, 0, 100)
    deliver(client, server, want)
    reply = Elsewhere(3, ("12D3KooWAbc", "QmXyz"))
    assert deliver(server, client, reply) == [reply]
    assert client.outstanding == server.outstanding == ()
    # It answers a want-block only, and names at least one well-formed peer, each once.
    deliver(client, server, WantHave(4, (A,)))
    for bad, reason in [
        (Elsewhere(4, ("12D3KooWAbc",)), "does not answer want-have"),
        (Elsewhere(4, ()), "empty"),
        (Elsewhere(4, ("x", "x")), "twice"),
        (Elsewhere(4, ("not/a/peer",)), "not a peer id"),
        (Elsewhere(4, tuple(f"p{i}" for i in range(9))), "9"),
        (Elsewhere(4, ["p"]), "must be a tuple"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(LocalProtocolError, match=reason):
            server.send(bad)
    with pytest.raises(RemoteProtocolError, match="not a peer id"):
        feed(client, [frame({"t": "elsewhere", "id": 4, "p": ["a b"]})])


# ------------------------------------------------------------------ cancel


def test_server_drops_a_cancelled_request_and_its_late_reply() -> None:
    client, server = connected()
    data = os.urandom(5000)
    first, second = want_block(0, data), want_block(1, data, offset=5000)
    deliver(client, server, first, second)
    assert deliver(client, server, Cancel(0)) == [Cancel(0)]
    assert client.outstanding == server.outstanding == (1,)
    assert client.cancelled == (0,)
    # The node's worker finishes anyway: nothing is sent, nothing changes.
    assert server.send(Block(0, first.chunk_id, data)) == b""
    assert (
        len(server.send_block_in_place(0, first.chunk_id, bytearray(MAX_BLOCK_PREFIX + 5000))) == 0
    )
    assert server.send(ErrorReply(0, "internal", "disk gone")) == b""
    # Reply 1 may have been sent before the server read Cancel(0): not proof enough.
    assert deliver(server, client, Block(1, second.chunk_id, data)) == [
        Block(1, second.chunk_id, data)
    ]
    assert client.cancelled == (0,)
    # A reply to a request sent after the Cancel is.
    deliver(client, server, WantHave(2, (A,)))
    deliver(server, client, HaveReply(2, (), (A,)))
    assert not client.cancelled
    # From then on a reply to 0 is a protocol violation.
    client.receive_data(b"".join(encode_message(DontHave(0))))
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        drain(client)


def test_a_reply_crossing_the_cancel_is_checked_and_dropped() -> None:
    client, server = connected()
    data = os.urandom(5000)
    want = want_block(0, data)
    deliver(client, server, want)
    in_flight = server.send(Block(0, want.chunk_id, data))
    cancel = client.send(Cancel(0))
    assert feed(client, [in_flight]) == []  # dropped, not reported
    assert client.cancelled == client.outstanding == ()
    assert feed(server, [cancel]) == []  # nothing left to cancel
    assert client.send(Cancel(0)) == b""  # already answered: nothing to send

    # A crossing reply is still checked against its request.
    deliver(client, server, want_block(1, data))
    client.send(Cancel(1))
    client.receive_data(b"".join(encode_message(Block(1, A, data))))
    with pytest.raises(RemoteProtocolError, match="chunk id differs"):
        drain(client)


def test_unconfirmed_cancels_are_capped() -> None:
    client, server = connected(max_in_flight=2)
    deliver(client, server, WantHave(0, (A,)), WantHave(1, (A,)))
    client.send(Cancel(0))
    client.send(Cancel(1))
    deliver(client, server, WantHave(2, (A,)))
    with pytest.raises(LocalProtocolError, match="cancels unconfirmed"):
        client.send(Cancel(2))
    assert client.outstanding == (2,) and client.cancelled == (0, 1)


# ----------------------------------------------------- the server's refusals

BAD_REQUESTS: list[tuple[str, dict[str, object], str, str]] = [
    (
        "unknown type",
        {"t": "want-everything", "id": 1},
        "bad-request",
        "unknown blocks message type",
    ),
    (
        "chunk id too short",
        {"t": "want-block", "id": 1, "c": A[:31], "b": BLOB, "o": 0, "n": 1},
        "bad-request",
        "expected 32",
    ),
    (
        "chunk id as text",
        {"t": "want-block", "id": 1, "c": "ab", "b": BLOB, "o": 0, "n": 1},
        "bad-request",
        "must be a byte string",
    ),
    (
        "negative offset",
        {"t": "want-block", "id": 1, "c": A, "b": BLOB, "o": -1, "n": 1},
        "bad-request",
        "out of range",
    ),
    (
        "length as text",
        {"t": "want-block", "id": 1, "c": A, "b": BLOB, "o": 0, "n": "1"},
        "bad-request",
        "must be an integer",
    ),
    (
        "length over 16 MiB",
        {"t": "want-block", "id": 1, "c": A, "b": BLOB, "o": 0, "n": MAX_BLOCK_LIMIT + 1},
        "bad-request",
        "out of range",
    ),
    (
        "range past any blob",
        {"t": "want-block", "id": 1, "c": A, "b": BLOB, "o": (1 << 63) - 1, "n": 2},
        "bad-request",
        "past the largest blob",
    ),
    (
        "bad digest",
        {"t": "want-block", "id": 1, "c": A, "b": "sha256:xyz", "o": 0, "n": 1},
        "bad-request",
        "invalid digest",
    ),
    (
        "upper-case digest",
        {"t": "want-block", "id": 1, "c": A, "b": BLOB.upper(), "o": 0, "n": 1},
        "bad-request",
        "invalid digest",
    ),
    (
        "length over this server's cap",
        {"t": "want-block", "id": 1, "c": A, "b": BLOB, "o": 0, "n": DEFAULT_MAX_BLOCK + 1},
        "refused",
        "sends at most",
    ),
    ("empty want-have", {"t": "want-have", "id": 1, "c": []}, "bad-request", "empty"),
    (
        "too many ids",
        {"t": "want-have", "id": 1, "c": [i.to_bytes(32, "big") for i in range(1025)]},
        "bad-request",
        "limit is 1024",
    ),
    ("duplicate ids", {"t": "want-have", "id": 1, "c": [A, A]}, "bad-request", "twice"),
    ("ids as text", {"t": "want-have", "id": 1, "c": ["a"]}, "bad-request", "must be bytes"),
    ("extra field", {"t": "want-have", "id": 1, "c": [A], "z": 0}, "bad-request", "unexpected"),
    ("id as bool", {"t": "want-have", "id": True, "c": [A]}, "bad-request", "must be an integer"),
    ("id too big", {"t": "want-have", "id": 2**32, "c": [A]}, "bad-request", "out of range"),
]


@pytest.mark.parametrize(
    ("case", "fields", "code", "reason"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_become_bad_request_events_on_the_server(
    case: str, fields: dict[str, object], code: str, reason: str
) -> None:
    server = BlockExchange(Role.SERVER)
    (event,) = feed(server, [frame(fields)])
    assert isinstance(event, BadRequest)
    assert (event.code, "\n" in event.reason) == (code, False)
    assert re.search(reason, event.reason)
    raw_id = fields["id"]
    expected_id = raw_id if type(raw_id) is int and raw_id < REQUEST_ID_LIMIT else None
    assert event.request_id == expected_id
    if code == "bad-request":  # the codec refuses it too, for the same reason
        with pytest.raises(RemoteProtocolError, match=reason):
            decode_messages(frame(fields))
    # The server answers it, and the stream goes on (or, with no id, ends cleanly).
    assert server.send(event.error_reply())
    assert server.outstanding == ()
    assert server.our_state is (State.OPEN if expected_id is not None else State.DONE)


def test_a_full_wantlist_is_refused_not_crashed() -> None:
    client, server = connected(max_wantlist=2, max_in_flight=8)
    wants = [WantHave(i, (A,)) for i in range(3)]
    events = deliver(client, server, *wants)
    assert events[:2] == wants[:2]
    refused = events[2]
    assert isinstance(refused, BadRequest) and refused.code == "refused"
    assert refused.request_id == 2 and "wantlist full" in refused.reason
    assert deliver(server, client, refused.error_reply()) == [refused.error_reply()]
    assert client.outstanding == server.outstanding == (0, 1)
    # Room again once a want is answered.
    deliver(server, client, HaveReply(0, (A,), ()))
    assert deliver(client, server, WantHave(3, (A,))) == [WantHave(3, (A,))]


SERVER_VIOLATIONS: list[tuple[str, bytes, str]] = [
    ("client sends a block", frame({"t": "block", "id": 0, "c": A}), "only a server"),
    ("client sends a reply", frame({"t": "dont-have", "id": 0}), "only a server"),
    ("malformed cancel", frame({"t": "cancel"}), "missing field"),
    ("cancel of a request never sent", frame({"t": "cancel", "id": 5}), "never sent"),
    ("request id reused", frame({"t": "want-have", "id": 3, "c": [A]}) * 2, "does not increase"),
    (
        "request id decreasing",
        frame({"t": "want-have", "id": 3, "c": [A]}) + frame({"t": "want-have", "id": 2, "c": [A]}),
        "does not increase",
    ),
    (
        "wantlist flood",
        b"".join(frame({"t": "want-have", "id": i, "c": [A]}) for i in range(5)),
        "ignores the wantlist",
    ),
    ("oversize request frame", encode_varint(MAX_CONTROL_FRAME + 1), "exceeds"),
    ("bad CBOR", encode_frame(b"\xff", 10), "indefinite"),
    ("not a map", frame([1]), "not a CBOR map"),
]


@pytest.mark.parametrize(
    ("case", "data", "reason"), SERVER_VIOLATIONS, ids=[c[0] for c in SERVER_VIOLATIONS]
)
def test_client_violations_end_the_stream(case: str, data: bytes, reason: str) -> None:
    server = BlockExchange(Role.SERVER, max_wantlist=2)
    with pytest.raises(RemoteProtocolError, match=reason):
        feed(server, [data])
    assert server.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()


# ----------------------------------------------------- the client's checks

DATA = bytes(range(10))
REPLY_VIOLATIONS: list[tuple[str, bytes, str]] = [
    ("reply to an unknown id", frame({"t": "dont-have", "id": 7}), "not outstanding"),
    ("block for an unknown id", frame({"t": "block", "id": 7, "c": A}), "not outstanding"),
    ("wrong chunk id", frame({"t": "block", "id": 1, "c": B}), "chunk id differs"),
    (
        "short block",
        frame({"t": "block", "id": 1, "c": A}) + encode_frame(DATA[:9], 9),
        "9 bytes answers a request for 10",
    ),
    (
        "long block",
        frame({"t": "block", "id": 1, "c": A}) + encode_frame(DATA + b"!", 11),
        "11 bytes answers",
    ),
    (
        # Under MAX_CONTROL_FRAME the frame decoder lets it in; the block limit stops it.
        "oversize block",
        frame({"t": "block", "id": 1, "c": A}) + encode_frame(bytes(4097), 4097),
        "block of 4097 bytes exceeds the 4096-byte",
    ),
    (
        "oversize control frame",
        encode_frame(b"\xa0" * (MAX_CONTROL_FRAME + 1), 2 * MAX_CONTROL_FRAME),
        f"exceeds the {MAX_CONTROL_FRAME}-byte limit",
    ),
    ("block for a want-have", frame({"t": "block", "id": 0, "c": A}), "does not answer want-have"),
    ("dont-have for a want-have", frame({"t": "dont-have", "id": 0}), "does not answer want-have"),
    (
        "have reply missing an id",
        frame({"t": "have", "id": 0, "h": [A], "d": []}),
        "exactly the chunk ids",
    ),
    (
        "have reply with a stranger",
        frame({"t": "have", "id": 0, "h": [A], "d": [C]}),
        "exactly the chunk ids",
    ),
    (
        "have reply for a want-block",
        frame({"t": "have", "id": 1, "h": [A], "d": []}),
        "does not answer want-block",
    ),
    (
        "have reply listing an id twice",
        frame({"t": "have", "id": 0, "h": [A], "d": [A]}),
        "listed twice",
    ),
    ("answered twice", frame({"t": "dont-have", "id": 1}) * 2, "not outstanding"),
    ("server sends a request", frame({"t": "want-have", "id": 9, "c": [A]}), "only a client"),
    ("malformed reply", frame({"t": "dont-have"}), "missing field"),
    (
        "short chunk id in a block header",
        frame({"t": "block", "id": 1, "c": A[:31]}),
        "expected 32",
    ),
    (
        "unknown error code",
        frame({"t": "error", "id": 1, "c": "oops", "m": ""}),
        "unknown error code",
    ),
    ("trailing CBOR", encode_frame(b"\xa0\x00", 10), "trailing"),
]


@pytest.mark.parametrize(
    ("case", "data", "reason"), REPLY_VIOLATIONS, ids=[c[0] for c in REPLY_VIOLATIONS]
)
def test_server_violations_end_the_stream(case: str, data: bytes, reason: str) -> None:
    client = BlockExchange(Role.CLIENT, max_frame=4096)
    client.send(WantHave(0, (A, B)))
    client.send(WantBlock(1, A, BLOB, 0, len(DATA)))
    with pytest.raises(RemoteProtocolError, match=reason):
        feed(client, [data])
    assert client.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_a_wrong_block_is_refused_before_its_data_arrives() -> None:
    client = BlockExchange(Role.CLIENT)
    client.send(WantBlock(0, A, BLOB, 0, DEFAULT_MAX_BLOCK))
    client.receive_data(frame({"t": "block", "id": 0, "c": B}) + encode_varint(DEFAULT_MAX_BLOCK))
    with pytest.raises(RemoteProtocolError, match="chunk id differs"):
        client.next_event()
    # An oversize block is refused on its length prefix alone.
    client = BlockExchange(Role.CLIENT)
    client.send(WantBlock(0, A, BLOB, 0, DEFAULT_MAX_BLOCK))
    client.receive_data(
        frame({"t": "block", "id": 0, "c": A}) + encode_varint(DEFAULT_MAX_BLOCK + 1)
    )
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        client.next_event()


def test_control_frames_are_capped_whatever_the_block_limit() -> None:
    # A client's frame decoder takes 2 MiB frames for blocks; any other frame that big is
    # refused before the CBOR decoder sees it.
    client = BlockExchange(Role.CLIENT)
    client.send(WantHave(0, (A,)))
    with pytest.raises(RemoteProtocolError, match="control frame of"):
        feed(client, [encode_frame(b"\xa0" * (MAX_CONTROL_FRAME + 1), DEFAULT_MAX_BLOCK)])


@pytest.mark.parametrize(
    ("case", "tail", "reason"),
    [
        ("inside a frame", frame({"t": "dont-have", "id": 1})[:-1], "inside a frame"),
        (
            "between header and data",
            frame({"t": "block", "id": 1, "c": A}),
            "between a block header",
        ),
        (
            "inside the data",
            frame({"t": "block", "id": 1, "c": A}) + encode_varint(10) + DATA[:5],
            "inside a frame",
        ),
        ("with requests unanswered", b"", "unanswered"),
    ],
)
def test_stream_ending_early_is_an_error(case: str, tail: bytes, reason: str) -> None:
    client = BlockExchange(Role.CLIENT)
    client.send(WantBlock(1, A, BLOB, 0, len(DATA)))
    with pytest.raises(RemoteProtocolError, match=reason):
        feed(client, [tail], eof=True)


# ------------------------------------------------------------ local misuse


def test_local_misuse_raises_local_errors_and_changes_nothing() -> None:
    client, server = connected(max_in_flight=2)
    deliver(client, server, WantHave(5, (A,)), WantBlock(6, A, BLOB, 0, 10))
    misuse: list[tuple[BlockExchange, object, str]] = [
        (client, WantHave(7, (A,)), "2 requests in flight"),  # over max_in_flight
        (client, HaveReply(5, (A,), ()), "cannot send HaveReply"),
        (server, WantHave(9, (A,)), "cannot send WantHave"),
        (client, BadRequest(9, "x"), "cannot send BadRequest"),
        (client, Cancel(9), "never sent"),
        (server, DontHave(9), "not outstanding"),  # a request it never received
        (server, Block(6, B, DATA), "chunk id differs"),
        (server, Block(6, A, DATA[:9]), "9 bytes answers a request for 10"),
        (server, DontHave(5), "does not answer want-have"),
        (server, HaveReply(5, (), ()), "exactly the chunk ids"),
        (server, HaveReply(6, (A,), ()), "does not answer want-block"),
        (server, ErrorReply(5, "whatever", "x"), "unknown error code"),
        (server, ErrorReply(5, "internal", "\n"), "control"),
        (server, HaveReply(5, [A], ()), "must be a tuple"),  # type: ignore[arg-type]
        (server, HaveReply(5, "AB", ()), "must be a tuple"),  # type: ignore[arg-type]
        (server, Block(6, A, [1] * 10), "not a contiguous byte buffer"),  # type: ignore[arg-type]
        (server, Block(6, A[:31], DATA), "expected 32"),
        (server, Block(6, A, bytes(DEFAULT_MAX_BLOCK + 1)), "exceeds the 2097152-byte"),
        (server, EndOfStream(), "unanswered"),
    ]
    for conn, event, reason in misuse:
        before = (conn.outstanding, conn.next_request_id, conn.our_state)
        with pytest.raises(LocalProtocolError, match=reason):
            conn.send(event)  # type: ignore[arg-type]
        assert (conn.outstanding, conn.next_request_id, conn.our_state) == before, event

    fresh = BlockExchange(Role.CLIENT, max_frame=1000)
    refused: list[tuple[Message, str]] = [
        (WantHave(0, ()), "empty"),
        (WantHave(0, (A, A)), "twice"),
        (WantHave(0, (A[:31],)), "expected 32"),
        (WantHave(-1, (A,)), "out of range"),
        (WantHave("1", (A,)), "must be an integer"),  # type: ignore[arg-type]
        (WantBlock(0, A, "sha256:xyz", 0, 1), "invalid digest"),
        (WantBlock(0, A, BLOB, 0, 1001), "exceeds max_frame 1000"),
        (WantBlock(0, A, BLOB, -5, 1), "out of range"),
    ]
    for event, reason in refused:
        with pytest.raises(LocalProtocolError, match=reason):
            fresh.send(event)
        assert fresh.outstanding == () and fresh.next_request_id == 0

    fresh.send(WantHave(3, (A,)))
    with pytest.raises(LocalProtocolError, match="does not increase"):
        fresh.send(WantHave(3, (A,)))
    with pytest.raises(LocalProtocolError, match="does not increase"):
        fresh.send(WantHave(2, (A,)))
    fresh.send(EndOfStream())
    with pytest.raises(LocalProtocolError, match="cannot send request"):
        fresh.send(WantHave(4, (A,)))

    with pytest.raises(LocalProtocolError, match="writable"):
        server.send_block_in_place(6, A, bytes(MAX_BLOCK_PREFIX + 10))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="no room"):
        server.send_block_in_place(6, A, bytearray(10))
    assert server.outstanding == (5, 6)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_frame": 0},
        {"max_frame": MAX_BLOCK_LIMIT + 1},
        {"max_wantlist": 0},
        {"max_in_flight": 0},
    ],
)
def test_limits_are_checked(limits: dict[str, int]) -> None:
    with pytest.raises(LocalProtocolError):
        BlockExchange(Role.CLIENT, **limits)


# -------------------------------------------------------------- closing


def test_final_error_reply_ends_the_server_side_and_drops_late_work() -> None:
    client, server = connected()
    deliver(client, server, WantHave(0, (A,)), WantBlock(1, A, BLOB, 0, 10))
    final = ErrorReply(None, "refused", "shutting down")
    to_client = server.send(final)
    assert server.our_state is State.DONE and server.outstanding == ()
    assert server.send(Block(1, A, DATA)) == b""  # a worker finishing late
    # A request that crossed the final reply is not reported: nobody will answer it.
    assert deliver(client, server, WantHave(2, (B,))) == []
    to_client += server.send(EndOfStream())
    assert feed(client, [to_client], eof=True) == [final, EndOfStream()]
    assert client.outstanding == ()
    with pytest.raises(LocalProtocolError, match="ended its side"):
        client.send(WantHave(3, (A,)))


def test_client_may_close_while_waiting_for_replies() -> None:
    client, server = connected()
    wire = client.send(WantHave(0, (A,))) + client.send(EndOfStream())
    assert feed(server, [wire], eof=True) == [WantHave(0, (A,)), EndOfStream()]
    reply = HaveReply(0, (), (A,))
    wire = server.send(reply) + server.send(EndOfStream())
    assert feed(client, [wire], eof=True) == [reply, EndOfStream()]
