"""Fuzz targets: every decoder a peer or an HTTP client can reach, with what it must do.

Each ``Target`` pairs a hypothesis strategy (arbitrary bytes, and valid encodings mutated:
bits flipped, bytes inserted or deleted, truncated, a CBOR field's type changed) with a
``run`` that feeds one input and returns ``ACCEPTED`` or ``REFUSED`` (the typed error).
Anything else — another exception, a hang past the time budget, more events than bytes
fed — is a finding. ``tests/test_fuzz_protocols.py`` runs a short derandomized pass in CI;
``scripts/fuzz`` (``tests/fuzz_run.py``) a long one with counts per target.
The HTTP targets need a running node and live in ``tests/fuzz_http.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import nacl.signing
from hypothesis import strategies as st

from protocols import _cbor, blocks, catalog
from protocols.errors import RemoteProtocolError
from protocols.framing import FrameDecoder, encode_frame
from protocols.records import Announcement, VersionRecord, validate_record_key, version_key
from storage.manifest import Layer, Manifest, ManifestError, parse_manifest
from tests.fuzz_mutations import mutated, stream_strategy, whole_stream

ACCEPTED = "accepted"
REFUSED = "refused"
# Seconds one input may take; decoding a few KiB takes microseconds, so this only
# trips on a real hang (an endless loop), even on a loaded machine.
DEFAULT_BUDGET = 5.0


class Finding(Exception):
    """A target did something other than accept or refuse with the typed error."""


class Hang(Finding):
    """An input took longer than the time budget, or produced more events than bytes."""


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise ``Hang`` in the main thread if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    summary: str
    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], str]
    # An input that must be accepted (the whole valid conversation), tried first: a stream
    # target's mutations leave one whole only now and then.
    valid: Any = None


# --- valid inputs to mutate -------------------------------------------------------------

_KEY = nacl.signing.SigningKey(bytes(range(32)))
MODEL = "registry.ollama.ai/library/llama3"
MANIFEST = Manifest(
    config=Layer("application/vnd.docker.container.image.v1+json", "sha256:" + "1" * 64, 339),
    layers=(
        Layer("application/vnd.ollama.image.model", "sha256:" + "2" * 64, 3 * 1024 * 1024),
        Layer("application/vnd.ollama.image.template", "sha256:" + "3" * 64, 28),
    ),
)
MANIFEST_BYTES = MANIFEST.to_bytes()
MANIFEST_DIGEST = MANIFEST.digest
RECORD = VersionRecord.sign(
    model=MODEL,
    tag="8b",
    manifest_digest=MANIFEST_DIGEST,
    size=3 * 1024 * 1024 + 367,
    parents=[bytes(32), b"\x01" * 32],
    hlc=(1_700_000_000_000 << 16) | 3,
    signing_key=_KEY,
)
RECORD_BYTES = RECORD.encode()
ANNOUNCEMENT_BYTES = Announcement((RECORD,), ("/ip4/127.0.0.1/tcp/4001",)).encode()
_CHUNK = hashlib.sha256(b"chunk").digest()

CATALOG_REQUESTS: tuple[catalog.Request, ...] = (
    catalog.ListModels(0, "llama*", 10),
    catalog.GetVersions(1, "llama3:8b"),
    catalog.GetManifest(2, MANIFEST_DIGEST),
    catalog.GetChunks(3, "sha256:" + "2" * 64, 0, 16),
)
CATALOG_RESPONSES: tuple[catalog.Response, ...] = (
    catalog.ModelList(
        0,
        (catalog.ModelSummary(MODEL, "8b", RECORD.version_id, MANIFEST_DIGEST, 10, RECORD.hlc),),
        False,
    ),
    catalog.Versions(1, (RECORD_BYTES,)),
    catalog.ManifestData(2, MANIFEST_DIGEST, MANIFEST_BYTES),
    catalog.ChunkList(
        3,
        "sha256:" + "2" * 64,
        3 * 1024 * 1024,
        2,
        0,
        (
            catalog.ChunkEntry(0, 2 * 1024 * 1024, _CHUNK),
            catalog.ChunkEntry(2 * 1024 * 1024, 1024 * 1024, _CHUNK),
        ),
    ),
    catalog.ErrorReply(None, "refused", "going away"),
)
BLOCK_REQUESTS: tuple[blocks.Request, ...] = (
    blocks.WantHave(0, (_CHUNK, bytes(32))),
    blocks.WantBlock(1, _CHUNK, "sha256:" + "2" * 64, 0, 5),
    blocks.WantBlock(2, _CHUNK, "sha256:" + "2" * 64, 5, 5),
    blocks.WantBlock(3, _CHUNK, "sha256:" + "2" * 64, 10, 5),
)
BLOCK_CLIENT_MESSAGES: tuple[blocks.Message, ...] = (*BLOCK_REQUESTS, blocks.Cancel(2))
BLOCK_RESPONSES: tuple[blocks.Message, ...] = (
    blocks.HaveReply(0, (_CHUNK,), (bytes(32),)),
    blocks.Block(1, _CHUNK, b"chunk"),
    blocks.DontHave(2),
    blocks.Elsewhere(3, ("12D3KooWPeerA", "12D3KooWPeerB")),
    blocks.ErrorReply(None, "internal", "disk gone"),
)


def _catalog_frames(messages: Sequence[catalog.Message]) -> list[bytes]:
    return [catalog.encode_message(m) for m in messages]


def _blocks_wire(message: blocks.Message) -> bytes:
    return b"".join(bytes(part) for part in blocks.encode_message(message))


# --- runners ----------------------------------------------------------------------------


def _typed(fn: Callable[[], object], *errors: type[Exception]) -> str:
    try:
        fn()
    except errors:
        return REFUSED
    return ACCEPTED


def _run_cbor(data: bytes) -> str:
    try:
        value = _cbor.loads(data)
    except RemoteProtocolError:
        return REFUSED
    # Only canonical input is accepted, so what is accepted has exactly one encoding.
    if _cbor.dumps(value) != data:
        raise Finding(f"accepted a non-canonical encoding of {value!r:.80}")
    return ACCEPTED


def _pieces(data: bytes, step: int, limit: int) -> Iterator[bytes]:
    step = max(1, min(step, limit))
    for start in range(0, len(data), step):
        yield data[start : start + step]


def _run_framing(value: tuple[bytes, int]) -> str:
    data, step = value
    decoder = FrameDecoder(1024)
    frames = 0
    try:
        for piece in _pieces(data, step, decoder.max_read):
            decoder.receive_data(piece)
            while decoder.next_frame() is not None:
                frames += 1
                if frames > len(data):
                    raise Hang("more frames than bytes")
        decoder.eof()
        while decoder.next_frame() is not None:
            frames += 1
            if frames > len(data):
                raise Hang("more frames than bytes")
    except RemoteProtocolError:
        return REFUSED
    return ACCEPTED


def _run_catalog_message(data: bytes) -> str:
    try:
        message = catalog.decode_message(data)
    except RemoteProtocolError:
        return REFUSED
    if catalog.encode_message(message) != data:
        raise Finding(f"{message!r:.80} was accepted from an encoding it does not produce")
    return ACCEPTED


def _run_blocks_stream(value: tuple[bytes, int]) -> str:
    data, _ = value
    return _typed(lambda: blocks.decode_messages(data, max_block=1024), RemoteProtocolError)


def _run_record(data: bytes) -> str:
    try:
        record = VersionRecord.decode(data)
    except RemoteProtocolError:
        return REFUSED
    if record.encode() != data:
        raise Finding("a record was accepted from an encoding it does not produce")
    return ACCEPTED


def _run_dht_record(data: bytes) -> str:
    key = version_key(MODEL, "8b")
    return _typed(lambda: validate_record_key(key, data), RemoteProtocolError)


def _run_announcement(data: bytes) -> str:
    return _typed(lambda: Announcement.decode(data), RemoteProtocolError)


def _run_manifest(data: bytes) -> str:
    return _typed(lambda: parse_manifest(data), ManifestError)


def _drive(
    conn: Any, data: bytes, step: int, answer: Callable[[Any], None], need_data: object
) -> str:
    """Feed ``data`` to a sans-IO machine as reads of ``step`` bytes, then EOF; answer
    each event as a node would. At most one event per byte fed, plus the end."""
    budget = len(data) + 4
    try:
        pieces = list(_pieces(data, step, conn.max_read))
        for piece in [*pieces, None]:
            if piece is None:
                conn.receive_eof()
            else:
                conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is need_data:
                    break
                budget -= 1
                if budget < 0:
                    raise Hang("more events than bytes fed")
                if type(event).__name__ == "EndOfStream":
                    return ACCEPTED
                answer(event)
        raise Finding("the machine asked for more data after end of stream")
    except RemoteProtocolError:
        return REFUSED


def _run_catalog_server(value: tuple[bytes, int]) -> str:
    data, step = value
    conn = catalog.CatalogConnection(catalog.Role.SERVER)

    def answer(event: Any) -> None:
        if conn.our_state is not catalog.State.OPEN:
            return
        if isinstance(event, catalog.BadRequest):
            conn.send(catalog.ErrorReply(event.request_id, "bad-request", event.reason))
        else:
            conn.send(catalog.ErrorReply(event.request_id, "not-found", "no such model"))

    return _drive(conn, data, step, answer, catalog.NEED_DATA)


def _run_catalog_client(value: tuple[bytes, int]) -> str:
    data, step = value
    conn = catalog.CatalogConnection(catalog.Role.CLIENT)
    for request in CATALOG_REQUESTS:
        conn.send(request)
    return _drive(conn, data, step, lambda event: None, catalog.NEED_DATA)


def _run_blocks_server(value: tuple[bytes, int]) -> str:
    data, step = value
    conn = blocks.BlockExchange(blocks.Role.SERVER, max_frame=1024, max_wantlist=4)

    def answer(event: Any) -> None:
        if conn.our_state is not blocks.State.OPEN:
            return
        if isinstance(event, blocks.BadRequest):
            conn.send(event.error_reply())
        elif isinstance(event, blocks.WantHave):
            conn.send(blocks.HaveReply(event.request_id, (), event.chunk_ids))
        elif isinstance(event, blocks.WantBlock):
            conn.send(blocks.DontHave(event.request_id))

    return _drive(conn, data, step, answer, blocks.NEED_DATA)


def _run_blocks_client(value: tuple[bytes, int]) -> str:
    data, step = value
    conn = blocks.BlockExchange(blocks.Role.CLIENT, max_frame=1024)
    for request in BLOCK_REQUESTS:
        conn.send(request)
    return _drive(conn, data, step, lambda event: None, blocks.NEED_DATA)


def _frame_catalog(payload: bytes) -> bytes:
    return encode_frame(payload, len(payload))


def _cbor_frames() -> list[bytes]:
    """Valid CBOR items of every kind dmm sends, for the CBOR decoder's own target."""
    return [
        RECORD_BYTES,
        ANNOUNCEMENT_BYTES,
        *_catalog_frames(CATALOG_REQUESTS + CATALOG_RESPONSES),
        _cbor.dumps({"a": [1, -1, b"x", "y", True, None, [], {}]}),
    ]


def _blocks_payloads(messages: Sequence[blocks.Message]) -> list[bytes]:
    """The control frames' CBOR payloads (a Block's data frame is added back by its framer)."""
    payloads = []
    for message in messages:
        wire = _blocks_wire(message)
        decoder = FrameDecoder(len(wire))
        decoder.receive_data(wire)
        payload = decoder.next_frame()
        assert payload is not None
        payloads.append(payload)
    return payloads


def _frame_blocks(payload: bytes) -> bytes:
    frame = encode_frame(payload, len(payload))
    # A block header is followed by its data frame; keep the pair together.
    with contextlib.suppress(Exception):
        if cbor2.loads(payload).get("t") == "block":
            return frame + encode_frame(b"chunk", 5)
    return frame


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cbor", "protocols._cbor.loads", mutated(_cbor_frames()), _run_cbor),
        Target(
            "framing",
            "protocols.framing.FrameDecoder, reads of any size, then eof",
            stream_strategy([b"x" * 10, b"", b"y" * 1000], _frame_catalog, cbor=False),
            _run_framing,
        ),
        Target(
            "catalog-message",
            "protocols.catalog.decode_message",
            mutated(_catalog_frames(CATALOG_REQUESTS + CATALOG_RESPONSES)),
            _run_catalog_message,
        ),
        Target(
            "blocks-message",
            "protocols.blocks.decode_messages on a whole stream",
            stream_strategy(
                _blocks_payloads(BLOCK_CLIENT_MESSAGES + BLOCK_RESPONSES), _frame_blocks
            ),
            _run_blocks_stream,
        ),
        Target("record", "VersionRecord.decode", mutated([RECORD_BYTES]), _run_record),
        Target(
            "dht-record",
            "records.validate_record_key (the DHT validator)",
            mutated([RECORD_BYTES]),
            _run_dht_record,
        ),
        Target(
            "announcement",
            "Announcement.decode (gossip)",
            mutated([ANNOUNCEMENT_BYTES]),
            _run_announcement,
        ),
        Target(
            "manifest",
            "storage.manifest.parse_manifest (manifests from peers)",
            st.one_of(
                mutated([MANIFEST_BYTES], cbor=False),
                st.integers(1, 100_000).map(lambda n: b"[" * n),
                st.integers(1, 100_000).map(lambda n: b'{"a":' * n),
            ),
            _run_manifest,
        ),
        Target(
            "catalog-server",
            "CatalogConnection(SERVER).receive_data/next_event",
            stream_strategy(_catalog_frames(CATALOG_REQUESTS), _frame_catalog),
            _run_catalog_server,
            whole_stream(_catalog_frames(CATALOG_REQUESTS), _frame_catalog),
        ),
        Target(
            "catalog-client",
            "CatalogConnection(CLIENT) with 4 requests out",
            stream_strategy(_catalog_frames(CATALOG_RESPONSES), _frame_catalog),
            _run_catalog_client,
            whole_stream(_catalog_frames(CATALOG_RESPONSES), _frame_catalog),
        ),
        Target(
            "blocks-server",
            "BlockExchange(SERVER).receive_data/next_event",
            stream_strategy(_blocks_payloads(BLOCK_CLIENT_MESSAGES), _frame_blocks),
            _run_blocks_server,
            whole_stream(_blocks_payloads(BLOCK_CLIENT_MESSAGES), _frame_blocks),
        ),
        Target(
            "blocks-client",
            f"BlockExchange(CLIENT) with {len(BLOCK_REQUESTS)} requests out",
            stream_strategy(_blocks_payloads(BLOCK_RESPONSES), _frame_blocks),
            _run_blocks_client,
            whole_stream(_blocks_payloads(BLOCK_RESPONSES), _frame_blocks),
        ),
    )
}


def check(target: Target, value: Any, budget: float = DEFAULT_BUDGET) -> str:
    """Run one input; ``ACCEPTED`` or ``REFUSED``, else ``Finding`` (or the stray error)."""
    with time_budget(budget):
        return target.run(value)
