"""protocols/: framing, canonical CBOR, signed version records, and /dmm/catalog/1.

Codecs are checked three ways: hypothesis round trips (decode(encode(m)) == m), hypothesis
garbage (random bytes and random CBOR only ever raise RemoteProtocolError), and a table of
named bad inputs, each pinned to the reason it must be refused for. The catalog machine is
checked by pairing a client and a server in memory.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import hashlib
import itertools
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import cbor2
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import _cbor
from protocols.catalog import (
    MAX_PIPELINE,
    MAX_REQUEST_FRAME,
    NEED_DATA,
    BadRequest,
    CatalogConnection,
    EndOfStream,
    ErrorReply,
    Event,
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
    decode_message,
    display_name,
    encode_message,
    glob_matches,
    index_key_for_glob,
    index_keys_for_name,
    literal_prefix,
)
from protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocols.framing import FrameDecoder, encode_frame, encode_varint
from protocols.records import (
    _SIGNATURE_DOMAIN,
    DEFAULT_MAX_DRIFT_MS,
    MAX_ANNOUNCED_RECORDS,
    MAX_LISTEN_ADDRS,
    MAX_PARENTS,
    MAX_VERSION_KEY_BYTES,
    Announcement,
    HybridClock,
    VersionRecord,
    hlc_logical,
    hlc_pack,
    hlc_physical,
    peer_id_from_public_key,
    select_newest,
    select_newest_value,
    validate_record_key,
    version_key,
)

PROTOCOLS_DIR = Path(__file__).resolve().parent.parent / "protocols"
PROTOCOL_MODULES = sorted(
    "protocols" if p.stem == "__init__" else f"protocols.{p.stem}"
    for p in PROTOCOLS_DIR.glob("*.py")
)
# Sans-IO: no event loop, no network stack, no threads in protocols/.
FORBIDDEN_IMPORTS = {"trio", "libp2p", "multiaddr", "socket", "asyncio", "threading"}

KEYS = [nacl.signing.SigningKey(bytes([i]) * 32) for i in range(1, 4)]
KEY = KEYS[0]
LLAMA = "registry.ollama.ai/library/llama3"
DIGEST = "sha256:" + "ab" * 32
WALL_MS = 1_750_000_000_000

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_record(**changes: object) -> VersionRecord:
    fields: dict[str, object] = {
        "model": LLAMA,
        "tag": "latest",
        "manifest_digest": DIGEST,
        "size": 1234,
        "parents": [],
        "hlc": hlc_pack(WALL_MS, 0),
        "signing_key": KEY,
    }
    fields.update(changes)
    return VersionRecord.sign(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------ sans-IO hygiene


def _imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(PROTOCOLS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_protocol_sources_import_no_io(path: Path) -> None:
    assert not _imported_roots(path.read_text()) & FORBIDDEN_IMPORTS


def test_protocol_modules_pull_in_no_io_at_runtime() -> None:
    # One interpreter per module, so a module that drags in trio through a dependency
    # is caught even when another module happened to import it first.
    script = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IMPORTS!r})\n"
        "print(','.join(bad))\n"
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", script, name],
            cwd=PROTOCOLS_DIR.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in PROTOCOL_MODULES
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "", f"{name} imports {out.strip()}"


# -------------------------------------------------------------------- framing


def frames_of(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_frames_round_trip_including_empty_and_max_size() -> None:
    payloads = [b"", b"x", b"y" * 127, b"z" * 128, b"w" * 300]
    decoder = FrameDecoder(300)
    decoder.receive_data(b"".join(encode_frame(p, 300) for p in payloads))
    assert frames_of(decoder) == payloads
    decoder.eof()
    assert decoder.buffered == 0


def test_two_mib_frame_arrives_in_64k_reads() -> None:
    payload = bytes(range(256)) * (8 * 1024)
    data = encode_frame(payload, len(payload)) + encode_frame(b"next", len(payload))
    decoder = FrameDecoder(len(payload))
    got = []
    for start in range(0, len(data), 65536):
        decoder.receive_data(data[start : start + 65536])
        got += frames_of(decoder)
    assert got == [payload, b"next"]


def test_oversize_frame_refused_before_its_payload_arrives() -> None:
    decoder = FrameDecoder(1000)
    decoder.receive_data(encode_varint(1001))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_frame()
    # A prefix that already proves the size is refused before it is complete.
    decoder = FrameDecoder(1000)
    decoder.receive_data(b"\xff\xff")
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_frame()


def test_encode_frame_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, 10)


def test_receive_buffer_is_capped() -> None:
    decoder = FrameDecoder(100)
    decoder.receive_data(b"\x05" * decoder.max_read)
    decoder.receive_data(b"\x05" * decoder.max_read)
    with pytest.raises(LocalProtocolError, match="drain"):
        decoder.receive_data(b"\x05")


def test_eof_reports_truncation_after_complete_frames() -> None:
    decoder = FrameDecoder(100)
    decoder.receive_data(encode_frame(b"whole", 100) + b"\x05ab")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        decoder.eof()
    assert decoder.next_frame() == b"whole"
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 300))
def test_random_bytes_only_raise_remote_errors_from_frame_decoder(data: bytes, size: int) -> None:
    decoder = FrameDecoder(size)
    try:
        for start in range(0, len(data), decoder.max_read):
            decoder.receive_data(data[start : start + decoder.max_read])
            for frame in frames_of(decoder):
                assert len(frame) <= size
        decoder.eof()
    except RemoteProtocolError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8), st.data())
def test_frames_survive_any_split(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(p, 200) for p in payloads)
    decoder = FrameDecoder(200)
    got = []
    for piece in split_randomly(stream, data):
        decoder.receive_data(piece)
        got += frames_of(decoder)
    decoder.eof()
    assert got == payloads


def split_randomly(stream: bytes, data: st.DataObject) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# ------------------------------------------------------------------ CBOR subset

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(cbor_values)
def test_strict_cbor_reads_what_cbor2_writes_and_nothing_looser(value: _cbor.Value) -> None:
    encoded = cbor2.dumps(value, canonical=True)
    assert _cbor.loads(encoded, max_depth=10) == value
    assert _cbor.dumps(_cbor.loads(encoded, max_depth=10)) == encoded


@FUZZ
@given(st.binary(max_size=200))
def test_strict_cbor_random_bytes_only_raise_remote_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        _cbor.loads(data)


# ------------------------------------------------------------ version records

part = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True)
models = st.builds(
    lambda host, ns, m: f"{host}/{ns}/{m}",
    st.sampled_from(["registry.ollama.ai", "example.com", "localhost:5000"]),
    st.one_of(st.just("library"), part),
    st.one_of(part, st.from_regex(r"[a-z0-9][a-z0-9.]{0,10}", fullmatch=True)).filter(
        lambda m: ".." not in m
    ),
)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,10}", fullmatch=True)
digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
version_ids = st.binary(min_size=32, max_size=32)
hlcs = st.integers(0, 2**64 - 1)
records = st.builds(
    lambda model, tag, digest, size, parents, hlc, key: VersionRecord.sign(
        model=model,
        tag=tag,
        manifest_digest=digest,
        size=size,
        parents=parents,
        hlc=hlc,
        signing_key=key,
    ),
    models,
    tags,
    digests,
    st.integers(0, 2**63 - 1),
    st.lists(version_ids, max_size=4),
    hlcs,
    st.sampled_from(KEYS),
)
addrs = st.builds(lambda port: f"/ip4/10.0.0.1/tcp/{port}", st.integers(1, 65535))


@FUZZ
@given(records)
def test_records_round_trip(record: VersionRecord) -> None:
    encoded = record.encode()
    assert VersionRecord.decode(encoded) == record
    assert VersionRecord.decode(encoded).version_id == record.version_id
    assert VersionRecord.decode(encoded).encode() == encoded


@FUZZ
@given(st.lists(records, min_size=1, max_size=3), st.lists(addrs, max_size=MAX_LISTEN_ADDRS))
def test_announcements_round_trip(recs: list[VersionRecord], listen: list[str]) -> None:
    announcement = Announcement(tuple(recs), tuple(listen))
    assert Announcement.decode(announcement.encode()) == announcement


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_remote_errors_from_record_decoders(data: bytes) -> None:
    for decode in (VersionRecord.decode, Announcement.decode):
        with contextlib.suppress(RemoteProtocolError):
            decode(data)


@FUZZ
@given(st.dictionaries(st.sampled_from([*"vmtdsphak", "sig"]), cbor_values))
def test_random_record_shaped_maps_only_raise_remote_errors(fields: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        VersionRecord.decode(cbor2.dumps(fields, canonical=True))


@FUZZ
@given(st.integers(0, 329), st.integers(1, 255))
def test_any_flipped_byte_breaks_a_record(position: int, flip: int) -> None:
    encoded = bytearray(make_record().encode())
    encoded[position % len(encoded)] ^= flip
    with pytest.raises(RemoteProtocolError):
        VersionRecord.decode(bytes(encoded))


def test_peer_id_matches_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    for key in KEYS:
        public = bytes(key.verify_key)
        expected = ID.from_pubkey(Ed25519PublicKey.from_bytes(public)).to_base58()
        assert peer_id_from_public_key(public) == expected
        assert expected.startswith("12D3KooW")


def test_sign_normalises_parents_and_version_id_covers_author() -> None:
    a, b = b"\x02" * 32, b"\x01" * 32
    record = make_record(parents=[a, b, a])
    assert record.parents == (b, a)
    assert make_record(signing_key=KEYS[1]).version_id != make_record().version_id
    assert len(record.version_id) == 32


def test_sign_refuses_invalid_fields() -> None:
    for changes in ({"model": "llama3"}, {"size": -1}, {"parents": ["ab" * 32]}):
        with pytest.raises(LocalProtocolError):
            make_record(**changes)


def unsigned_fields(record: VersionRecord) -> dict[str, object]:
    return {
        "v": 1,
        "m": record.model,
        "t": record.tag,
        "d": record.manifest_digest,
        "s": record.size,
        "p": list(record.parents),
        "h": record.hlc,
        "a": record.author,
        "k": record.public_key,
    }


def forge(key: nacl.signing.SigningKey = KEY, **changes: object) -> bytes:
    """A record with ``changes`` applied and a valid signature by ``key`` over them, so
    the one defect under test is the only one."""
    fields = unsigned_fields(make_record())
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    message = _SIGNATURE_DOMAIN + cbor2.dumps(fields, canonical=True)
    fields["sig"] = key.sign(message).signature
    return cbor2.dumps(fields, canonical=True)


def with_bad_signature() -> bytes:
    encoded = bytearray(make_record().encode())
    encoded[-1] ^= 1
    return bytes(encoded)


RECORD_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    ("bad signature", with_bad_signature, "bad signature"),
    ("signed by another key", lambda: forge(KEYS[1]), "bad signature"),
    (
        "author of another key",
        lambda: forge(a=peer_id_from_public_key(bytes(KEYS[1].verify_key))),
        "does not match",
    ),
    ("path traversal model", lambda: forge(m="../../etc"), r"\.\."),
    ("short model name", lambda: forge(m="llama3"), "not a full"),
    ("model with tag inside", lambda: forge(m=LLAMA + ":x"), "invalid model"),
    ("bad digest", lambda: forge(d="md5:abc"), "invalid digest"),
    ("uppercase digest", lambda: forge(d="sha256:" + "AB" * 32), "invalid digest"),
    ("negative size", lambda: forge(s=-1), "out of range"),
    ("size as text", lambda: forge(s="12"), "must be an integer"),
    ("hlc as bool", lambda: forge(h=True), "must be an integer"),
    ("too many parents", lambda: forge(p=[bytes([i]) * 32 for i in range(65)]), "limit is 64"),
    ("unsorted parents", lambda: forge(p=[b"\x02" * 32, b"\x01" * 32]), "not sorted"),
    ("duplicate parents", lambda: forge(p=[b"\x01" * 32] * 2), "not sorted"),
    ("hex parent", lambda: forge(p=["01" * 32]), "items must be bytes"),
    ("short parent", lambda: forge(p=[b"\x01" * 31]), "32-byte"),
    ("unknown format version", lambda: forge(v=2), "unknown format version"),
    ("missing field", lambda: forge(t=None), "missing field 't'"),
    ("extra field", lambda: forge(x=1), "unexpected field"),
    ("trailing bytes", lambda: make_record().encode() + b"\x00", "trailing"),
    ("not a map", lambda: cbor2.dumps([1, 2]), "not a CBOR map"),
    ("bad CBOR", lambda: b"\xff", "indefinite"),
    ("CBOR tag", lambda: cbor2.dumps(cbor2.CBORTag(1, 0)), "tags"),
    ("CBOR float", lambda: cbor2.dumps(1.5), "floats"),
    ("non-canonical int", lambda: b"\x18\x01", "non-canonical"),
    ("keys out of order", lambda: b"\xa2\x61b\x01\x61a\x02", "canonical order"),
    ("duplicate keys", lambda: b"\xa2\x61a\x01\x61a\x02", "duplicated"),
    ("oversize", lambda: b"\x00" * (16 * 1024 + 1), "limit is 16384"),
]


@pytest.mark.parametrize(("case", "make", "reason"), RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_bad_records_are_refused_for_the_right_reason(
    case: str, make: Callable[[], bytes], reason: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=reason) as info:
        VersionRecord.decode(make())
    assert "\n" not in str(info.value)


def test_forge_without_defect_is_valid() -> None:
    # Guards the table above: forge() alone must produce a record that decodes.
    assert VersionRecord.decode(forge()) == make_record()


def test_announcement_limits() -> None:
    fat = make_record(parents=[bytes([i]) * 32 for i in range(MAX_PARENTS)])
    biggest = Announcement((fat,) * MAX_ANNOUNCED_RECORDS, ("/ip4/1.2.3.4/tcp/4001",) * 8)
    assert Announcement.decode(biggest.encode()) == biggest
    with pytest.raises(LocalProtocolError):
        Announcement((fat,) * (MAX_ANNOUNCED_RECORDS + 1)).encode()
    with pytest.raises(LocalProtocolError):
        Announcement(()).encode()
    bad_addr = cbor2.dumps({"v": 1, "r": [fat.encode()], "l": ["not a multiaddr"]}, canonical=True)
    with pytest.raises(RemoteProtocolError, match="multiaddr"):
        Announcement.decode(bad_addr)
    bad_record = cbor2.dumps({"v": 1, "r": [with_bad_signature()], "l": []}, canonical=True)
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        Announcement.decode(bad_record)


# ----------------------------------------------------------------- HLC and DHT


def test_hlc_follows_wall_time_and_stays_monotonic() -> None:
    clock = HybridClock()
    first = clock.now(WALL_MS)
    assert (hlc_physical(first), hlc_logical(first)) == (WALL_MS, 0)
    assert clock.now(WALL_MS) == hlc_pack(WALL_MS, 1)
    assert clock.now(WALL_MS - 1000) == hlc_pack(WALL_MS, 2)  # wall clock went back
    assert clock.now(WALL_MS + 1) == hlc_pack(WALL_MS + 1, 0)


def test_hlc_observe_takes_the_later_clock() -> None:
    clock = HybridClock(hlc_pack(WALL_MS, 5))
    assert clock.observe(hlc_pack(WALL_MS, 9), WALL_MS) == hlc_pack(WALL_MS, 10)
    assert clock.observe(hlc_pack(WALL_MS + 50, 3), WALL_MS) == hlc_pack(WALL_MS + 50, 4)
    assert clock.observe(hlc_pack(WALL_MS - 50, 3), WALL_MS) == hlc_pack(WALL_MS + 50, 5)
    assert clock.observe(hlc_pack(1, 0), WALL_MS + 100) == hlc_pack(WALL_MS + 100, 0)


def test_hlc_logical_overflow_carries() -> None:
    clock = HybridClock(hlc_pack(WALL_MS, 0xFFFF))
    assert clock.now(WALL_MS) == hlc_pack(WALL_MS + 1, 0)


def test_hlc_refuses_remote_clock_too_far_ahead() -> None:
    clock = HybridClock(hlc_pack(WALL_MS, 0))
    clock.observe(hlc_pack(WALL_MS + DEFAULT_MAX_DRIFT_MS, 0), WALL_MS)
    before = clock.last
    with pytest.raises(RemoteProtocolError, match="ahead"):
        clock.observe(hlc_pack(WALL_MS + DEFAULT_MAX_DRIFT_MS + 1, 0), WALL_MS)
    assert clock.last == before
    strict = HybridClock(max_drift_ms=10)
    with pytest.raises(RemoteProtocolError, match="ahead"):
        strict.observe(hlc_pack(WALL_MS + 11, 0), WALL_MS)
    with pytest.raises(RemoteProtocolError, match="out of range"):
        strict.observe(2**64, WALL_MS)


def test_select_newest_by_hlc_then_version_id() -> None:
    old, new = make_record(hlc=1), make_record(hlc=2)
    assert select_newest([old, new]) == 1
    assert select_newest([new, old]) == 0
    a, b = make_record(hlc=5, size=1), make_record(hlc=5, size=2)
    winner = max((a, b), key=lambda r: r.version_id)
    assert [a, b][select_newest([a, b])] == winner
    assert [b, a][select_newest([b, a])] == winner
    key = version_key(LLAMA, "latest")
    assert select_newest_value(key, [b"junk", old.encode(), new.encode()]) == 2


def test_dht_key_validation() -> None:
    record = make_record()
    key = version_key(LLAMA, "latest")
    assert key == "/dmm/version/registry.ollama.ai/library/llama3:latest"
    assert validate_record_key(key, record.encode()) == record
    for bad_key, reason in [
        (version_key(LLAMA, "8b"), "stored under"),
        (version_key("registry.ollama.ai/library/other", "latest"), "stored under"),
        ("/dmm/version/llama3:latest", "not a full"),
        ("/dmm/version/" + LLAMA, "no tag"),
        ("/dmm/model/" + LLAMA + ":latest", "not a /dmm/version/"),
    ]:
        with pytest.raises(RemoteProtocolError, match=reason):
            validate_record_key(bad_key, record.encode())
    with pytest.raises(LocalProtocolError):
        version_key("../x", "latest")


def test_long_names_get_a_hashed_version_key_that_still_validates() -> None:
    long_model = "registry.ollama.ai/" + "n" * 60 + "/" + "m" * 60
    record = make_record(model=long_model)
    key = version_key(long_model, "latest")
    assert key.startswith("/dmm/version/#") and len(key.encode()) <= MAX_VERSION_KEY_BYTES
    assert validate_record_key(key, record.encode()) == record
    # Another record (a different tag) cannot sit under that hashed key.
    other = make_record(model=long_model, tag="other")
    with pytest.raises(RemoteProtocolError, match="stored under"):
        validate_record_key(key, other.encode())
    with pytest.raises(RemoteProtocolError):
        validate_record_key("/dmm/version/#" + "0" * 64, b"junk")
    # Names that fit keep the readable key.
    assert version_key(LLAMA, "latest").endswith(":latest")


# ------------------------------------------------------------ catalog messages

request_ids = st.integers(0, 2**32 - 1)
printable = st.text(max_size=40).filter(str.isprintable)
summaries = st.builds(
    ModelSummary, models, tags, version_ids, digests, st.integers(0, 2**63 - 1), hlcs
)


def manifest_data(request_id: int, data: bytes) -> ManifestData:
    return ManifestData(request_id, sha(data), data)


requests_st: st.SearchStrategy[Request] = st.one_of(
    st.builds(ListModels, request_ids, printable, st.integers(1, 1000)),
    st.builds(GetVersions, request_ids, st.one_of(models, models.map(lambda m: m + ":x"))),
    st.builds(GetManifest, request_ids, st.one_of(digests, models, st.just("llama3"))),
)
responses_st: st.SearchStrategy[Response] = st.one_of(
    st.builds(ModelList, request_ids, st.lists(summaries, max_size=3).map(tuple), st.booleans()),
    st.builds(
        Versions, request_ids, st.lists(st.binary(min_size=1, max_size=50), max_size=3).map(tuple)
    ),
    st.builds(manifest_data, request_ids, st.binary(max_size=100)),
    st.builds(
        ErrorReply,
        st.one_of(st.none(), request_ids),
        st.sampled_from(["not-found", "bad-request", "refused", "internal"]),
        printable,
    ),
)


@FUZZ
@given(st.one_of(requests_st, responses_st))
def test_catalog_messages_round_trip(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@FUZZ
@given(
    st.sampled_from(
        ["list", "get-versions", "get-manifest", "models", "versions", "manifest", "error", "?"]
    ),
    st.dictionaries(st.sampled_from(["id", "g", "n", "m", "x", "r", "d", "b", "c"]), cbor_values),
)
def test_random_catalog_maps_only_raise_remote_errors(kind: str, fields: dict[str, object]) -> None:
    payload = cbor2.dumps({"t": kind, **fields}, canonical=True)
    with contextlib.suppress(RemoteProtocolError):
        decode_message(payload)
    for role in Role:
        conn = CatalogConnection(role)
        with contextlib.suppress(RemoteProtocolError):
            conn.receive_data(encode_frame(payload, MAX_REQUEST_FRAME * 10))
            drain(conn)


@FUZZ
@given(st.binary(max_size=1500), st.sampled_from(list(Role)))
def test_random_bytes_only_raise_remote_errors_from_catalog(data: bytes, role: Role) -> None:
    conn = CatalogConnection(role)
    try:
        conn.receive_data(data)
        drain(conn)
        conn.receive_eof()
        drain(conn)
    except RemoteProtocolError as exc:
        assert "\n" not in str(exc)


def drain(conn: CatalogConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, EndOfStream):
            return events


def frame(fields: dict[str, object]) -> bytes:
    return encode_frame(cbor2.dumps(fields, canonical=True), MAX_REQUEST_FRAME)


MESSAGE_CASES: list[tuple[str, dict[str, object], str]] = [
    ("unknown type", {"t": "delete-everything", "id": 1}, "unknown catalog message type"),
    ("missing type", {"id": 1}, "unknown catalog message type"),
    ("limit as text", {"t": "list", "id": 1, "g": "*", "n": "10"}, "must be an integer"),
    ("limit zero", {"t": "list", "id": 1, "g": "*", "n": 0}, "out of range"),
    ("limit too high", {"t": "list", "id": 1, "g": "*", "n": 1001}, "out of range"),
    ("glob too long", {"t": "list", "id": 1, "g": "a" * 257, "n": 1}, "limit is 256"),
    ("glob with newline", {"t": "list", "id": 1, "g": "a\n", "n": 1}, "control"),
    ("glob as bytes", {"t": "list", "id": 1, "g": b"*", "n": 1}, "must be a text string"),
    ("path traversal name", {"t": "get-versions", "id": 1, "n": "../../etc"}, r"\.\."),
    ("absolute name", {"t": "get-versions", "id": 1, "n": "/etc/passwd"}, "empty host"),
    ("bad digest", {"t": "get-manifest", "id": 1, "n": "sha256:xyz"}, "invalid digest"),
    ("extra field", {"t": "get-versions", "id": 1, "n": "llama3", "z": 0}, "unexpected"),
    ("id as bool", {"t": "get-versions", "id": True, "n": "llama3"}, "must be an integer"),
    ("id too big", {"t": "get-versions", "id": 2**32, "n": "llama3"}, "out of range"),
]


@pytest.mark.parametrize(
    ("case", "fields", "reason"), MESSAGE_CASES, ids=[c[0] for c in MESSAGE_CASES]
)
def test_bad_requests_become_bad_request_events_on_the_server(
    case: str, fields: dict[str, object], reason: str
) -> None:
    server = CatalogConnection(Role.SERVER)
    server.receive_data(frame(fields))
    event = server.next_event()
    assert isinstance(event, BadRequest)
    assert event.reason and "\n" not in event.reason
    assert re.search(reason, event.reason)
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_message(cbor2.dumps(fields, canonical=True))
    raw_id = fields.get("id")
    expected_id = raw_id if type(raw_id) is int and raw_id < 2**32 else None
    assert event.request_id == expected_id
    # The server can answer it, and the stream goes on.
    reply = ErrorReply(event.request_id, "bad-request", event.reason)
    assert server.send(reply)
    if expected_id is not None:
        assert server.our_state is State.OPEN
        assert server.outstanding == ()
    else:
        assert server.our_state is State.DONE


BROKEN_STREAMS: list[tuple[str, Role, bytes, str]] = [
    ("bad CBOR", Role.SERVER, encode_frame(b"\xff", 10), "indefinite"),
    ("not a map", Role.SERVER, frame([1]), "not a CBOR map"),  # type: ignore[arg-type]
    ("trailing CBOR", Role.CLIENT, encode_frame(b"\xa0\x00", 10), "trailing"),
    ("oversize request", Role.SERVER, encode_varint(MAX_REQUEST_FRAME + 1), "exceeds"),
    ("non-minimal varint", Role.SERVER, b"\x81\x00", "non-minimal"),
    ("client sends a response", Role.SERVER, frame({"t": "versions", "id": 1, "r": []}), "only"),
    (
        "server sends a request",
        Role.CLIENT,
        frame({"t": "get-versions", "id": 1, "n": "x"}),
        "only",
    ),
    (
        "response to unknown id",
        Role.CLIENT,
        frame({"t": "versions", "id": 9, "r": []}),
        "not outstanding",
    ),
    ("malformed response", Role.CLIENT, frame({"t": "versions", "id": 9}), "missing field"),
    (
        "duplicate request id",
        Role.SERVER,
        frame({"t": "get-versions", "id": 1, "n": "x"}) * 2,
        "already outstanding",
    ),
    (
        "pipeline overflow",
        Role.SERVER,
        b"".join(frame({"t": "get-versions", "id": i, "n": "x"}) for i in range(MAX_PIPELINE + 1)),
        "outstanding",
    ),
]


@pytest.mark.parametrize(
    ("case", "role", "data", "reason"), BROKEN_STREAMS, ids=[c[0] for c in BROKEN_STREAMS]
)
def test_protocol_violations_end_the_stream(
    case: str, role: Role, data: bytes, reason: str
) -> None:
    conn = CatalogConnection(role)
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=reason):
        drain(conn)
    assert conn.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_local_misuse_raises_local_errors_and_changes_nothing() -> None:
    client, server = CatalogConnection(Role.CLIENT), CatalogConnection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        client.send(Versions(1, ()))  # a client sending a response
    with pytest.raises(LocalProtocolError):
        server.send(ListModels(1, "*", 1))  # a server sending a request
    with pytest.raises(LocalProtocolError):
        server.send(Versions(1, ()))  # nothing outstanding
    with pytest.raises(LocalProtocolError):
        client.send(BadRequest(1, "x"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        client.send(GetVersions(1, "../../etc"))
    with pytest.raises(LocalProtocolError):
        client.send(ListModels(1, "*", 5000))
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(None, "whatever", "x"))
    assert client.outstanding == () and client.our_state is State.OPEN
    client.send(GetVersions(1, "llama3"))
    with pytest.raises(LocalProtocolError):
        client.send(GetVersions(1, "llama3"))  # id reuse
    client.send(EndOfStream())
    with pytest.raises(LocalProtocolError):
        client.send(GetVersions(2, "llama3"))  # after closing


def serve(request: Request) -> Response:
    """A stand-in for the node: a valid reply of the right kind for every request."""
    match request:
        case ListModels(request_id=rid, limit=limit):
            summary = ModelSummary(LLAMA, "latest", b"\x07" * 32, DIGEST, 5, 6)
            return ModelList(rid, (summary,) * min(limit, 2), limit < 2)
        case GetVersions(request_id=rid):
            return Versions(rid, (make_record().encode(),))
        case GetManifest(request_id=rid, name_or_digest=name):
            if name.startswith("sha256:"):
                return ErrorReply(rid, "not-found", f"no manifest {name}")
            return manifest_data(rid, b'{"schemaVersion": 2}')
    raise AssertionError(request)


@settings(max_examples=60, deadline=None)
@given(st.lists(requests_st, min_size=1, max_size=MAX_PIPELINE), st.data())
def test_client_and_server_in_memory_pipelined_out_of_order(
    generated: list[Request], data: st.DataObject
) -> None:
    # Give each request a distinct id, as a real client would.
    reqs: list[Request] = [type(r)(i * 7, *_payload(r)) for i, r in enumerate(generated)]  # type: ignore[arg-type]
    client, server = CatalogConnection(Role.CLIENT), CatalogConnection(Role.SERVER)
    wire = b"".join(client.send(r) for r in reqs) + client.send(EndOfStream())
    assert client.outstanding == tuple(r.request_id for r in reqs)

    received = feed(server, split_randomly(wire, data), eof=True)
    assert received == [*reqs, EndOfStream()]
    assert server.their_state is State.CLOSED

    replies = [serve(r) for r in data.draw(st.permutations(reqs))]
    wire = b"".join(server.send(r) for r in replies) + server.send(EndOfStream())
    assert server.our_state is State.CLOSED

    received = feed(client, split_randomly(wire, data), eof=True)
    assert received == [*replies, EndOfStream()]
    assert client.outstanding == ()
    assert (client.our_state, client.their_state) == (State.CLOSED, State.CLOSED)


def _payload(request: Request) -> tuple[object, ...]:
    match request:
        case ListModels(glob=glob, limit=limit):
            return (glob, limit)
        case GetVersions(name=name):
            return (name,)
        case GetManifest(name_or_digest=name):
            return (name,)
    raise AssertionError(request)


def feed(conn: CatalogConnection, pieces: Iterable[bytes], *, eof: bool) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        conn.receive_data(piece)
        events += drain(conn)
    if eof:
        conn.receive_eof()
        events += drain(conn)
    return events


def test_replies_must_match_their_requests() -> None:
    digest = sha(b"{}")
    cases: list[tuple[Request, Response, str]] = [
        (GetVersions(1, "llama3"), ModelList(1, (), False), "does not answer"),
        (
            ListModels(1, "*", 1),
            ModelList(1, (ModelSummary(LLAMA, "a", b"\0" * 32, DIGEST, 1, 1),) * 2, True),
            "limit of 1",
        ),
        (GetManifest(1, digest), manifest_data(1, b"other"), "differs"),
    ]
    for request, response, reason in cases:
        client, server = CatalogConnection(Role.CLIENT), CatalogConnection(Role.SERVER)
        server.receive_data(client.send(request))
        drain(server)
        with pytest.raises(LocalProtocolError, match=reason):
            server.send(response)
        # A peer that sends it anyway is refused the same way on the client.
        client.receive_data(encode_frame(encode_message(response), 2**21))
        with pytest.raises(RemoteProtocolError, match=reason):
            drain(client)


def test_manifest_data_must_hash_to_its_digest() -> None:
    with pytest.raises(LocalProtocolError, match="does not match"):
        encode_message(ManifestData(1, DIGEST, b"{}"))
    payload = cbor2.dumps({"t": "manifest", "id": 1, "d": DIGEST, "b": b"{}"}, canonical=True)
    with pytest.raises(RemoteProtocolError, match="does not match"):
        decode_message(payload)


def test_server_closing_with_unanswered_requests_is_an_error() -> None:
    client, server = CatalogConnection(Role.CLIENT), CatalogConnection(Role.SERVER)
    server.receive_data(client.send(GetVersions(1, "llama3")))
    drain(server)
    with pytest.raises(LocalProtocolError, match="unanswered"):
        server.send(EndOfStream())
    client.receive_eof()
    with pytest.raises(RemoteProtocolError, match="unanswered"):
        drain(client)


def test_stream_level_error_reply_ends_the_server_side() -> None:
    client, server = CatalogConnection(Role.CLIENT), CatalogConnection(Role.SERVER)
    server.receive_data(client.send(GetVersions(1, "llama3")) + client.send(GetVersions(2, "x")))
    drain(server)
    final = ErrorReply(None, "refused", "shutting down")
    client.receive_data(server.send(final) + server.send(EndOfStream()))
    client.receive_eof()
    assert drain(client) == [final, EndOfStream()]
    assert client.outstanding == ()
    with pytest.raises(LocalProtocolError, match="ended its side"):
        client.send(GetVersions(3, "llama3"))


def test_stream_ending_inside_a_frame_is_an_error() -> None:
    client = CatalogConnection(Role.CLIENT)
    client.send(GetVersions(1, "llama3"))
    reply = encode_frame(encode_message(Versions(1, ())), 100)
    client.receive_data(reply[:-1])
    client.receive_eof()
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        drain(client)


# ------------------------------------------------------------ globs and index


@pytest.mark.parametrize(
    ("pattern", "name_tag", "matches"),
    [
        ("llama*", "llama3:latest", True),
        ("llama3", "llama3:8b", True),  # no tag in the pattern: any tag
        ("llama3:8b", "llama3:latest", False),
        ("*:8b", "llama3:8b", True),
        ("Llama*", "llama3:latest", False),  # case-sensitive
        ("l?ama3", "llama3:latest", True),
        ("[lm]lama3", "mlama3:latest", True),
        ("ns/*", "ns/model:v1", True),
        ("localhost:5000/ns/m", "localhost:5000/ns/m:latest", True),
        ("*", "anything/at/all:x", True),
        ("mistral", "llama3:latest", False),
    ],
)
def test_glob_matches(pattern: str, name_tag: str, matches: bool) -> None:
    assert glob_matches(pattern, name_tag) is matches
    if ":" in pattern[pattern.rfind("/") + 1 :]:  # a tagged pattern: exactly fnmatchcase
        assert fnmatch.fnmatchcase(name_tag, pattern) is matches


@pytest.mark.parametrize(
    ("glob", "prefix", "key"),
    [
        ("llama*", "llama", "/dmm/index/lla"),
        ("ll*", "ll", "/dmm/index/ll"),
        ("*", "", "/dmm/index/"),
        ("?lama", "", "/dmm/index/"),
        ("la[m]a", "la", "/dmm/index/la"),
        ("ab:x*", "ab:x", "/dmm/index/ab"),  # the tag is not part of an index shard
        ("qwen2.5", "qwen2.5", "/dmm/index/qwe"),
    ],
)
def test_literal_prefix_and_index_key(glob: str, prefix: str, key: str) -> None:
    assert literal_prefix(glob) == prefix
    assert index_key_for_glob(glob) == key


def test_index_keys_use_the_display_name_without_tag() -> None:
    assert display_name(LLAMA) == "llama3"
    assert display_name("ns/model:tag") == "ns/model"
    assert display_name("example.com/ns/m") == "example.com/ns/m"
    assert index_keys_for_name(LLAMA) == [
        "/dmm/index/",
        "/dmm/index/l",
        "/dmm/index/ll",
        "/dmm/index/lla",
    ]
    assert index_keys_for_name("ab:latest") == ["/dmm/index/", "/dmm/index/a", "/dmm/index/ab"]
    with pytest.raises(LocalProtocolError):
        index_keys_for_name("../../etc")


@settings(max_examples=100, deadline=None)
@given(models, tags, st.data())
def test_any_glob_matching_a_name_asks_an_index_key_that_name_provides(
    model: str, tag: str, data: st.DataObject
) -> None:
    # The discovery invariant: find never misses a holder because of sharding.
    name_tag = f"{display_name(model)}:{tag}"
    cut = data.draw(st.integers(0, len(name_tag)))
    glob = name_tag[:cut] + data.draw(st.sampled_from(["*", "?*", "", "[a-z0-9]*"]))
    if glob_matches(glob, name_tag):
        assert index_key_for_glob(glob) in index_keys_for_name(model)


def test_error_hierarchy() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert str(RemoteProtocolError("two\nlines")) == "two lines"
