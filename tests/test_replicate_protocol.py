"""protocols/replicate.py: /dmm/replicate/1 messages and the lockstep machine.

Round trips by hypothesis, random bytes and random CBOR only ever raising
RemoteProtocolError, a table of named bad inputs, and a client and a server machine paired
in memory (including the misuse each side must refuse).
"""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import encode_frame
from protocols.replicate import (
    MAX_FRAME,
    NEED_DATA,
    BadRequest,
    EndOfStream,
    ErrorReply,
    GetStatus,
    Have,
    HaveReply,
    Message,
    Ping,
    PolicySpec,
    Pong,
    ReplicateConnection,
    ReplicateReply,
    ReplicateRequest,
    Role,
    Status,
    decode_message,
    encode_message,
)

NAME = "registry.ollama.ai/library/llama3:8b"
DIGEST = "sha256:" + "ab" * 32
PEER = "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tags = st.dictionaries(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    max_size=5,
)
peers = st.lists(
    st.sampled_from([PEER, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]), max_size=3
)
specs = st.builds(
    lambda lo, extra, extra2, pr, k, y, x: PolicySpec(
        "llama*", lo, lo + extra + extra2, lo + extra, pr, k, tuple(y), tuple(x)
    ),
    st.integers(1, 10),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(-1000, 1000),
    tags,
    peers,
    peers,
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.builds(Pong, st.integers(0, 2**64 - 1)),
    st.builds(Have, st.just(NAME), st.just(DIGEST), st.binary(min_size=32, max_size=32)),
    st.just(GetStatus()),
    st.builds(
        ReplicateRequest,
        st.just(NAME),
        st.just(DIGEST),
        st.integers(0, 2**64 - 1),
        specs,
        st.lists(st.just(PEER), max_size=3).map(tuple),
    ),
    st.builds(HaveReply, st.booleans(), st.booleans(), st.booleans()),
    st.builds(Status, tags, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(
        ReplicateReply,
        st.sampled_from(["accepted", "holding", "capacity", "policy", "busy"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100),
    ),
    st.builds(ErrorReply, st.sampled_from(["bad-request", "internal"]), st.just("why")),
)


@FUZZ
@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(data)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["t", "n", "m", "b", "c", "p", "s", "d", "o"]),
        st.one_of(
            st.integers(),
            st.text(max_size=5),
            st.booleans(),
            st.none(),
            st.binary(max_size=33),
            st.just("ping"),
            st.just("have"),
        ),
    )
)
def test_random_maps_only_raise_remote_protocol_error(obj: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(cbor2.dumps(obj, canonical=True))


def _raw(**fields: object) -> bytes:
    return cbor2.dumps(fields, canonical=True)


SPEC = {"g": "x*", "lo": 1, "hi": 3, "f": 2, "pr": 0, "k": {}, "y": [], "x": []}
BAD = {
    "not a map": (cbor2.dumps([1, 2]), "not a CBOR map"),
    "unknown type": (_raw(t="shutdown"), "unknown replicate message type"),
    "ping without nonce": (_raw(t="ping"), "missing field 'n'"),
    "negative nonce": (_raw(t="ping", n=-1), "out of range"),
    "extra field": (_raw(t="get-status", z=1), "unexpected field"),
    "short name": (_raw(t="have", m="llama3", b=DIGEST, c=b"x" * 32), "not a full"),
    "bad digest": (_raw(t="have", m=NAME, b="sha256:zz", c=b"x" * 32), "digest"),
    "short chunk id": (_raw(t="have", m=NAME, b=DIGEST, c=b"x" * 31), "31 bytes"),
    "bool as int": (_raw(t="pong", n=True), "must be an integer"),
    "unknown reply code": (_raw(t="replicate-reply", c="maybe", r=""), "unknown code"),
    "counts out of order": (
        _raw(t="replicate", m=NAME, d=DIGEST, s=1, o=[], p={**SPEC, "f": 5}),
        "out of order",
    ),
    "bad peer id": (
        _raw(t="replicate", m=NAME, d=DIGEST, s=1, o=["../etc"], p=SPEC),
        "not a peer id",
    ),
    "tag value not text": (_raw(t="status", g={"region": 1}, f=0, l=0), "text values"),
    "control characters": (_raw(t="error", c="internal", r="a\nb"), "control"),
}


@pytest.mark.parametrize("payload,reason", BAD.values(), ids=list(BAD))
def test_bad_messages_are_refused_with_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_message(payload)


def test_encoding_refuses_what_decoding_would() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(Have("llama3", DIGEST, b"x" * 32))
    with pytest.raises(LocalProtocolError):
        encode_message(ReplicateReply("perhaps", ""))


def _pair() -> tuple[ReplicateConnection, ReplicateConnection]:
    return ReplicateConnection(Role.CLIENT), ReplicateConnection(Role.SERVER)


def _deliver(data: bytes, to: ReplicateConnection) -> object:
    to.receive_data(data)
    return to.next_event()


def test_client_and_server_exchange_in_lockstep() -> None:
    client, server = _pair()
    assert server.next_event() is NEED_DATA
    assert _deliver(client.send(Ping(7)), server) == Ping(7)
    assert _deliver(server.send(Pong(7)), client) == Pong(7)
    have = Have(NAME, DIGEST, b"\x01" * 32)
    assert _deliver(client.send(have), server) == have
    assert _deliver(server.send(HaveReply(True, False, True)), client) == HaveReply(
        True, False, True
    )
    request = ReplicateRequest(NAME, DIGEST, 10, PolicySpec("llama*", 1, 3, 2), (PEER,))
    assert _deliver(client.send(request), server) == request
    assert _deliver(server.send(ReplicateReply("capacity", "full")), client) == ReplicateReply(
        "capacity", "full"
    )
    assert client.send(EndOfStream()) == b""
    server.receive_eof()
    assert isinstance(server.next_event(), EndOfStream)


def test_a_bad_request_is_an_event_the_server_answers_and_the_stream_goes_on() -> None:
    client, server = _pair()
    event = _deliver(encode_frame(_raw(t="ping"), MAX_FRAME), server)
    assert isinstance(event, BadRequest) and "missing field" in event.reason
    with pytest.raises(LocalProtocolError):
        server.send(Pong(1))  # a bad request is answered with an error only
    server.send(ErrorReply("bad-request", event.reason))
    assert _deliver(client.send(GetStatus()), server) == GetStatus()


def test_misuse_on_each_side_is_refused() -> None:
    client, server = _pair()
    with pytest.raises(LocalProtocolError):
        client.send(Pong(1))  # clients send requests
    with pytest.raises(LocalProtocolError):
        server.send(Pong(1))  # nothing to answer
    client.send(Ping(1))
    with pytest.raises(LocalProtocolError):
        client.send(Ping(2))  # lockstep: one request at a time
    with pytest.raises(LocalProtocolError):
        client.send(EndOfStream())  # not with a request pending


def test_peer_misbehaviour_is_a_remote_protocol_error_and_sticks() -> None:
    client, server = _pair()
    # Two requests without waiting for the answer.
    server.receive_data(client.send(Ping(1)) + encode_frame(encode_message(Ping(2)), MAX_FRAME))
    assert server.next_event() == Ping(1)
    with pytest.raises(RemoteProtocolError, match="second request"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    # A reply to another request, or a wrong nonce.
    client2, server2 = _pair()
    server2.receive_data(client2.send(Ping(5)))
    server2.next_event()
    client2.receive_data(encode_frame(encode_message(Status({}, 0, 0)), MAX_FRAME))
    with pytest.raises(RemoteProtocolError, match="does not answer ping"):
        client2.next_event()
    client3 = ReplicateConnection(Role.CLIENT)
    client3.send(Ping(5))
    client3.receive_data(encode_frame(encode_message(Pong(6)), MAX_FRAME))
    with pytest.raises(RemoteProtocolError, match="nonce"):
        client3.next_event()
    # A server ending its side with the request unanswered.
    client4 = ReplicateConnection(Role.CLIENT)
    client4.send(GetStatus())
    client4.receive_eof()
    with pytest.raises(RemoteProtocolError, match="pending"):
        client4.next_event()


def test_oversize_frames_are_refused_before_buffering() -> None:
    server = ReplicateConnection(Role.SERVER)
    server.receive_data(b"\xff\xff\xff\x7f")  # a length prefix far over MAX_FRAME
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()
