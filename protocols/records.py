"""Signed version records, their gossip announcements, the DHT rules, and the HLC.

A version record says "node A published ``model:tag`` as manifest D (size S), descended
from these parent versions, at hybrid-logical time H", signed with A's libp2p ed25519
identity key. Records travel in gossip announcements (``dmm/announce/1``), as DHT values
under ``/dmm/version/<host>/<namespace>/<model>:<tag>`` and in catalog replies; every
path decodes them with ``VersionRecord.decode``, which checks every field and the
signature.

Wire form (canonical CBOR map, short keys)::

    v    format version, 1
    m    model, full "host/namespace/model" (no tag)
    t    tag
    d    manifest digest "sha256:<hex>"
    s    manifest + blobs size in bytes (the node decides what it counts; >= 0)
    p    parents: array of version ids, each 32 raw bytes, sorted ascending, unique
    h    HLC timestamp (see HybridClock)
    a    author: libp2p peer id string of the signing ed25519 key ("12D3KooW...")
    k    the author's 32-byte raw ed25519 public key
    sig  64-byte ed25519 signature

The version id is ``sha256(canonical CBOR of the map without "sig")``, 32 raw bytes: it
covers the author, so two nodes publishing the same manifest make two versions. The
signature is over ``b"dmm/version-record/1\\0"`` + that same CBOR; the prefix keeps a
signature made with the node's identity key from meaning anything in another protocol.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from . import _cbor
from ._cbor import Value
from ._checks import (
    Invalid,
    check_digest,
    check_keys,
    check_model,
    check_text,
    get_bytes,
    get_int,
    get_list_of,
    get_str,
)
from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ANNOUNCE_TOPIC",
    "DEFAULT_MAX_DRIFT_MS",
    "FORMAT_VERSION",
    "MAX_ANNOUNCED_RECORDS",
    "MAX_ANNOUNCEMENT_SIZE",
    "MAX_LISTEN_ADDRS",
    "MAX_LISTEN_ADDR_LENGTH",
    "MAX_PARENTS",
    "MAX_RECORD_SIZE",
    "VERSION_ID_SIZE",
    "VERSION_KEY_PREFIX",
    "Announcement",
    "HybridClock",
    "VersionRecord",
    "hlc_logical",
    "hlc_pack",
    "hlc_physical",
    "peer_id_from_public_key",
    "select_newest",
    "select_newest_value",
    "validate_record_key",
    "version_key",
]

FORMAT_VERSION = 1
MAX_RECORD_SIZE = 16 * 1024
MAX_PARENTS = 64
VERSION_ID_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# Longest possible peer id string is 52 characters; leave room for a clear error instead
# of an unbounded string.
MAX_AUTHOR_LENGTH = 128
MAX_SIZE_VALUE = 1 << 63

ANNOUNCE_TOPIC = "dmm/announce/1"
# Gossipsub drops RPCs over 1 MiB; stay far below so batching never gets near it.
MAX_ANNOUNCEMENT_SIZE = 64 * 1024
# 16 records with 64 parents each still fit in MAX_ANNOUNCEMENT_SIZE.
MAX_ANNOUNCED_RECORDS = 16
MAX_LISTEN_ADDRS = 8
MAX_LISTEN_ADDR_LENGTH = 256

VERSION_KEY_PREFIX = "/dmm/version/"
# DHT peers serve value keys of at most this many bytes. A longer name is keyed by its
# sha256 instead ("/dmm/version/#<hex>"): '#' never occurs in a model name.
MAX_VERSION_KEY_BYTES = 128
_HASHED_MARK = "#"

_SIGNATURE_DOMAIN = b"dmm/version-record/1\x00"
_RECORD_KEYS = ("v", "m", "t", "d", "s", "p", "h", "a", "k", "sig")
_ANNOUNCEMENT_KEYS = ("v", "r", "l")

# --------------------------------------------------------------------------- HLC

LOGICAL_BITS = 16
HLC_LIMIT = 1 << 64
DEFAULT_MAX_DRIFT_MS = 5 * 60 * 1000


def hlc_pack(physical_ms: int, logical: int) -> int:
    """``(physical_ms << 16) | logical``: ordering the ints orders the timestamps."""
    if not 0 <= logical < 1 << LOGICAL_BITS or not 0 <= physical_ms < 1 << (64 - LOGICAL_BITS):
        raise LocalProtocolError(f"HLC out of range: ({physical_ms}, {logical})")
    return (physical_ms << LOGICAL_BITS) | logical


def hlc_physical(hlc: int) -> int:
    """Milliseconds since the Unix epoch."""
    return hlc >> LOGICAL_BITS


def hlc_logical(hlc: int) -> int:
    return hlc & ((1 << LOGICAL_BITS) - 1)


class HybridClock:
    """A hybrid logical clock (Kulkarni et al.); wall time is always passed in.

    ``now`` stamps a local event, ``observe`` merges a timestamp received from a peer;
    both return a value greater than every value this clock returned or observed before.
    Working on the packed int makes the standard rules one ``max``: a logical counter
    that would overflow carries into the physical part instead of wrapping.
    Persist ``last`` and pass it back on restart to stay monotonic across restarts.
    """

    __slots__ = ("_last", "max_drift_ms")

    def __init__(self, last: int = 0, *, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> None:
        if not 0 <= last < HLC_LIMIT:
            raise LocalProtocolError(f"HLC out of range: {last}")
        if max_drift_ms < 0:
            raise LocalProtocolError(f"max_drift_ms must be >= 0, not {max_drift_ms}")
        self._last = last
        self.max_drift_ms = max_drift_ms

    @property
    def last(self) -> int:
        return self._last

    def now(self, wall_ms: int) -> int:
        """A timestamp for a local event at wall-clock time ``wall_ms``."""
        return self._advance(max(self._last + 1, _wall(wall_ms)))

    def observe(self, remote: int, wall_ms: int) -> int:
        """Merge a peer's timestamp; refuses one too far ahead of ``wall_ms``.

        Raises ``RemoteProtocolError`` (and leaves the clock unchanged) when ``remote`` is
        not a 64-bit HLC or is more than ``max_drift_ms`` ahead of our wall clock: one
        peer with a broken clock must not drag every node's clock into the future.
        """
        if type(remote) is not int or not 0 <= remote < HLC_LIMIT:
            raise RemoteProtocolError(f"HLC timestamp out of range: {remote!r}")
        wall = _wall(wall_ms)
        ahead = hlc_physical(remote) - wall_ms
        if ahead > self.max_drift_ms:
            raise RemoteProtocolError(
                f"remote HLC is {ahead} ms ahead of our clock (the limit is {self.max_drift_ms})"
            )
        return self._advance(max(self._last + 1, remote + 1, wall))

    def _advance(self, value: int) -> int:
        if value >= HLC_LIMIT:
            raise LocalProtocolError("HLC overflowed 64 bits")
        self._last = value
        return value


def _wall(wall_ms: int) -> int:
    if type(wall_ms) is not int or not 0 <= wall_ms < 1 << (64 - LOGICAL_BITS):
        raise LocalProtocolError(f"wall clock out of range: {wall_ms!r}")
    return wall_ms << LOGICAL_BITS


# ------------------------------------------------------------------- peer ids

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, inside an identity multihash
# (code 0x00, length 0x24 = 36): how libp2p names a peer whose key is ed25519.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def _base58btc(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(_B58_ALPHABET[digit])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(digits))


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of a raw 32-byte ed25519 public key."""
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_SIZE:
        raise LocalProtocolError("an ed25519 public key is 32 bytes")
    return _base58btc(_ED25519_PEER_ID_PREFIX + public_key)


# ------------------------------------------------------------- version records


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One signed version of ``model:tag``; build with ``sign`` or ``decode``.

    The constructor itself checks nothing: a record from ``sign`` or ``decode`` is valid
    and verified, one built by hand is whatever it was given.
    """

    model: str
    tag: str
    manifest_digest: str
    size: int
    parents: tuple[bytes, ...]
    hlc: int
    author: str
    public_key: bytes
    signature: bytes

    @property
    def name(self) -> str:
        """``host/namespace/model:tag``, as ``storage.names.ModelName.full``."""
        return f"{self.model}:{self.tag}"

    @property
    def version_id(self) -> bytes:
        """32 raw bytes: sha256 of the canonical CBOR of every field but the signature."""
        return hashlib.sha256(_cbor.dumps(self._unsigned_map())).digest()

    def encode(self) -> bytes:
        """Canonical CBOR; ``VersionRecord.decode(r.encode()) == r`` for a valid record."""
        fields = self._unsigned_map()
        fields["sig"] = self.signature
        return _cbor.dumps(fields)

    def _unsigned_map(self) -> dict[str, object]:
        return {
            "v": FORMAT_VERSION,
            "m": self.model,
            "t": self.tag,
            "d": self.manifest_digest,
            "s": self.size,
            "p": list(self.parents),
            "h": self.hlc,
            "a": self.author,
            "k": self.public_key,
        }

    @classmethod
    def sign(
        cls,
        *,
        model: str,
        tag: str,
        manifest_digest: str,
        size: int,
        parents: Iterable[bytes],
        hlc: int,
        signing_key: nacl.signing.SigningKey,
    ) -> VersionRecord:
        """A record authored by ``signing_key``'s peer id; parents are sorted and deduplicated.

        Raises ``LocalProtocolError`` if a field is invalid (the same rules ``decode`` uses).
        """
        public_key = bytes(signing_key.verify_key)
        parent_list = list(parents)
        for parent in parent_list:
            if type(parent) is not bytes or len(parent) != VERSION_ID_SIZE:
                raise LocalProtocolError("every parent must be a 32-byte version id")
        unsigned = cls(
            model=model,
            tag=tag,
            manifest_digest=manifest_digest,
            size=size,
            parents=tuple(sorted(set(parent_list))),
            hlc=hlc,
            author=peer_id_from_public_key(public_key),
            public_key=public_key,
            signature=b"",
        )
        try:
            _check_unsigned(unsigned)
        except Invalid as exc:
            raise LocalProtocolError(f"cannot sign version record: {exc}") from None
        message = _SIGNATURE_DOMAIN + _cbor.dumps(unsigned._unsigned_map())
        signature = signing_key.sign(message).signature
        return cls(
            model=unsigned.model,
            tag=unsigned.tag,
            manifest_digest=unsigned.manifest_digest,
            size=unsigned.size,
            parents=unsigned.parents,
            hlc=unsigned.hlc,
            author=unsigned.author,
            public_key=unsigned.public_key,
            signature=signature,
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_RECORD_SIZE) -> VersionRecord:
        """Decode and verify; any problem is a one-line ``RemoteProtocolError``."""
        if len(data) > max_size:
            raise RemoteProtocolError(
                f"version record is {len(data)} bytes (the limit is {max_size})"
            )
        obj = _cbor.loads(data, max_depth=2)
        try:
            return cls._from_value(obj)
        except Invalid as exc:
            raise RemoteProtocolError(f"bad version record: {exc}") from None

    @classmethod
    def _from_value(cls, obj: Value) -> VersionRecord:
        if not isinstance(obj, dict):
            raise Invalid("not a CBOR map")
        _check_format_version(obj)
        check_keys(obj, _RECORD_KEYS)
        parents = get_list_of(obj, "p", MAX_PARENTS, bytes)
        record = cls(
            model=get_str(obj, "m", 512),
            tag=get_str(obj, "t", 512),
            manifest_digest=get_str(obj, "d", 128),
            size=get_int(obj, "s", 0, MAX_SIZE_VALUE),
            parents=tuple(parents),
            hlc=get_int(obj, "h", 0, HLC_LIMIT),
            author=get_str(obj, "a", MAX_AUTHOR_LENGTH),
            public_key=get_bytes(obj, "k", PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE),
            signature=get_bytes(obj, "sig", SIGNATURE_SIZE, SIGNATURE_SIZE),
        )
        _check_unsigned(record)
        message = _SIGNATURE_DOMAIN + _cbor.dumps(record._unsigned_map())
        try:
            nacl.signing.VerifyKey(record.public_key).verify(message, record.signature)
        except nacl.exceptions.CryptoError:
            raise Invalid("bad signature") from None
        return record


def _check_format_version(obj: Mapping[str, Value]) -> None:
    version = obj.get("v")
    if type(version) is not int or version != FORMAT_VERSION:
        raise Invalid(f"unknown format version {version!r}")


def _check_unsigned(record: VersionRecord) -> None:
    check_model(record.model, record.tag)
    check_digest(record.manifest_digest)
    if type(record.size) is not int or not 0 <= record.size < MAX_SIZE_VALUE:
        raise Invalid(f"size {record.size!r} is not an integer in [0, 2**63)")
    if type(record.hlc) is not int or not 0 <= record.hlc < HLC_LIMIT:
        raise Invalid(f"hlc {record.hlc!r} is not a 64-bit unsigned integer")
    if len(record.parents) > MAX_PARENTS:
        raise Invalid(f"{len(record.parents)} parents (the limit is {MAX_PARENTS})")
    for parent in record.parents:
        if type(parent) is not bytes or len(parent) != VERSION_ID_SIZE:
            raise Invalid("every parent must be a 32-byte version id")
    # One encoding per record: parents form a set, written in ascending order.
    if any(a >= b for a, b in itertools.pairwise(record.parents)):
        raise Invalid("parents are not sorted ascending without duplicates")
    if type(record.public_key) is not bytes or len(record.public_key) != PUBLIC_KEY_SIZE:
        raise Invalid("public key must be 32 bytes")
    if type(record.author) is not str:
        raise Invalid("author must be a text string")
    if record.author != peer_id_from_public_key(record.public_key):
        raise Invalid("author peer id does not match the public key")


# ------------------------------------------------------------------ announcements


@dataclass(frozen=True, slots=True)
class Announcement:
    """A gossip message on ``dmm/announce/1``: new versions plus where to fetch them.

    ``listen_addrs`` are unsigned multiaddr hints from the announcer (who is known from
    gossipsub's own message signature); only their form is checked here.
    """

    records: tuple[VersionRecord, ...]
    listen_addrs: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """Canonical CBOR; raises ``LocalProtocolError`` past the count or size limits."""
        try:
            _check_announcement(self.records, self.listen_addrs)
        except Invalid as exc:
            raise LocalProtocolError(f"cannot encode announcement: {exc}") from None
        data = _cbor.dumps(
            {
                "v": FORMAT_VERSION,
                "r": [record.encode() for record in self.records],
                "l": list(self.listen_addrs),
            }
        )
        if len(data) > MAX_ANNOUNCEMENT_SIZE:
            raise LocalProtocolError(
                f"announcement is {len(data)} bytes (the limit is {MAX_ANNOUNCEMENT_SIZE})"
            )
        return data

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_ANNOUNCEMENT_SIZE) -> Announcement:
        """Decode and verify every record; any problem is a ``RemoteProtocolError``."""
        if len(data) > max_size:
            raise RemoteProtocolError(
                f"announcement is {len(data)} bytes (the limit is {max_size})"
            )
        obj = _cbor.loads(data, max_depth=2)
        try:
            if not isinstance(obj, dict):
                raise Invalid("not a CBOR map")
            _check_format_version(obj)
            check_keys(obj, _ANNOUNCEMENT_KEYS)
            raw_records = get_list_of(obj, "r", MAX_ANNOUNCED_RECORDS, bytes)
            listen_addrs = tuple(get_list_of(obj, "l", MAX_LISTEN_ADDRS, str))
            records = tuple(VersionRecord.decode(raw) for raw in raw_records)
            _check_announcement(records, listen_addrs)
        except Invalid as exc:
            raise RemoteProtocolError(f"bad announcement: {exc}") from None
        return cls(records, listen_addrs)


def _check_announcement(records: Sequence[VersionRecord], addrs: Sequence[str]) -> None:
    if not 1 <= len(records) <= MAX_ANNOUNCED_RECORDS:
        raise Invalid(f"{len(records)} records (expected 1..{MAX_ANNOUNCED_RECORDS})")
    if len(addrs) > MAX_LISTEN_ADDRS:
        raise Invalid(f"{len(addrs)} listen addresses (the limit is {MAX_LISTEN_ADDRS})")
    for addr in addrs:
        if type(addr) is not str:
            raise Invalid("listen addresses must be text strings")
        check_text(addr, "listen address", MAX_LISTEN_ADDR_LENGTH)
        if not addr.startswith("/") or not addr.isascii() or " " in addr:
            raise Invalid("listen address is not a multiaddr string")


# ------------------------------------------------------------------------ DHT


def version_key(model: str, tag: str) -> str:
    """The DHT key holding the newest record of ``model:tag`` (model in full form)."""
    try:
        check_model(model, tag)
    except Invalid as exc:
        raise LocalProtocolError(str(exc)) from None
    key = f"{VERSION_KEY_PREFIX}{model}:{tag}"
    if len(key.encode()) <= MAX_VERSION_KEY_BYTES:
        return key
    return f"{VERSION_KEY_PREFIX}{_HASHED_MARK}{_name_hash(model, tag)}"


def _name_hash(model: str, tag: str) -> str:
    return hashlib.sha256(f"{model}:{tag}".encode()).hexdigest()


def validate_record_key(key: str, value: bytes) -> VersionRecord:
    """The DHT validator: ``value`` is a valid record for exactly the model in ``key``.

    Raises ``RemoteProtocolError``; returns the decoded record for callers that want it.
    """
    if type(key) is not str or not key.startswith(VERSION_KEY_PREFIX):
        raise RemoteProtocolError(f"not a {VERSION_KEY_PREFIX} key")
    name = key[len(VERSION_KEY_PREFIX) :]
    if name.startswith(_HASHED_MARK):
        record = VersionRecord.decode(value)
        if key != version_key(record.model, record.tag):
            raise RemoteProtocolError(f"record for {record.name} stored under the key {key}")
        return record
    model, sep, tag = name.rpartition(":")
    try:
        if not sep:
            raise Invalid("key has no tag")
        check_model(model, tag)
    except Invalid as exc:
        raise RemoteProtocolError(f"bad version key: {exc}") from None
    record = VersionRecord.decode(value)
    if record.model != model or record.tag != tag:
        raise RemoteProtocolError(f"record for {record.name} stored under the key of {name}")
    return record


def select_newest(records: Sequence[VersionRecord]) -> int:
    """Index of the newest record: highest HLC, ties broken by the higher version id."""
    if not records:
        raise LocalProtocolError("select_newest of no records")
    return max(range(len(records)), key=lambda i: (records[i].hlc, records[i].version_id))


def select_newest_value(key: str, values: Sequence[bytes]) -> int:
    """The DHT selector over raw values: invalid ones never win.

    Raises ``RemoteProtocolError`` when no value is valid for ``key``.
    """
    best: tuple[int, bytes] | None = None
    best_index = -1
    for index, value in enumerate(values):
        try:
            record = validate_record_key(key, value)
        except RemoteProtocolError:
            continue
        rank = (record.hlc, record.version_id)
        if best is None or rank > best:
            best, best_index = rank, index
    if best is None:
        raise RemoteProtocolError(f"no valid record among {len(values)} values for {key}")
    return best_index
