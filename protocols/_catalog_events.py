"""``/dmm/catalog/1`` messages and their CBOR codec (the state machine is in catalog.py).

Every message is one CBOR map in one frame: ``{"t": <type>, "id": <request id>, ...}``.
The client sends requests, the server answers each with exactly one response carrying
the same ``id``; ``ErrorReply`` answers any request. Field limits below apply to both
directions: ``encode_message`` refuses what ``decode_message`` would refuse.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from storage.names import InvalidName, parse_model_name

from . import _cbor
from ._cbor import Value
from ._checks import (
    Invalid,
    check_digest,
    check_keys,
    check_model,
    get_bool,
    get_bytes,
    get_int,
    get_list_of,
    get_str,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .records import HLC_LIMIT, MAX_RECORD_SIZE, MAX_SIZE_VALUE, VERSION_ID_SIZE

__all__ = [
    "ERROR_CODES",
    "MAX_CHUNKS_PER_REPLY",
    "MAX_ERROR_MESSAGE_LENGTH",
    "MAX_GLOB_LENGTH",
    "MAX_LIMIT",
    "MAX_MANIFEST_SIZE",
    "MAX_RECORDS_PER_REPLY",
    "REQUEST_ID_LIMIT",
    "REQUEST_TYPES",
    "RESPONSE_TYPES",
    "BadRequest",
    "ChunkEntry",
    "ChunkList",
    "EndOfStream",
    "ErrorReply",
    "GetChunks",
    "GetManifest",
    "GetVersions",
    "ListModels",
    "MalformedMessage",
    "ManifestData",
    "Message",
    "ModelList",
    "ModelSummary",
    "Request",
    "Response",
    "Versions",
    "decode_message",
    "encode_message",
]

REQUEST_ID_LIMIT = 1 << 32
MAX_GLOB_LENGTH = 256
# Also the most summaries in one ModelList.
MAX_LIMIT = 1000
MAX_RECORDS_PER_REPLY = 64
MAX_MANIFEST_SIZE = 1024 * 1024
MAX_ERROR_MESSAGE_LENGTH = 1024
# Names are at most 255 characters (storage.names); longer text is refused before parsing.
_MAX_NAME_FIELD = 255
_MAX_TAG_FIELD = 128
_MAX_DIGEST_FIELD = 80
ERROR_CODES = frozenset({"not-found", "bad-request", "refused", "internal"})
# A blob's chunk list in pages: 16384 entries of 44 bytes is ~704 KiB, under the client's
# reply limit; a 2 GiB blob of 1 MiB chunks fits in one page.
MAX_CHUNKS_PER_REPLY = 16384
MAX_CHUNK_LENGTH = 16 * 1024 * 1024
_CHUNK_ENTRY = struct.Struct("<QI32s")


# ---------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ListModels:
    """At most ``limit`` models whose ``name:tag`` matches ``glob`` (``catalog.glob_matches``)."""

    TYPE: ClassVar[str] = "list"
    request_id: int
    glob: str
    limit: int


@dataclass(frozen=True, slots=True)
class GetVersions:
    """The version records of ``name`` (any form ``storage.names.parse_model_name`` takes)."""

    TYPE: ClassVar[str] = "get-versions"
    request_id: int
    name: str


@dataclass(frozen=True, slots=True)
class GetManifest:
    """A manifest by digest (``sha256:<hex>``) or by model name (the newest version)."""

    TYPE: ClassVar[str] = "get-manifest"
    request_id: int
    name_or_digest: str

    @property
    def digest(self) -> str | None:
        """The requested digest, or ``None`` when a model name was asked for."""
        return self.name_or_digest if _looks_like_digest(self.name_or_digest) else None


@dataclass(frozen=True, slots=True)
class GetChunks:
    """A page of a blob's content-defined chunk list: entries ``start`` .. ``start+limit``."""

    TYPE: ClassVar[str] = "get-chunks"
    request_id: int
    digest: str
    start: int
    limit: int


# --------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    offset: int
    length: int
    chunk_id: bytes  # raw sha256 of the chunk


@dataclass(frozen=True, slots=True)
class ChunkList:
    """The answer to ``GetChunks``: ``total`` entries in all; these start at ``start``.

    Entries are contiguous (each starts where the one before ends). Nothing here proves
    the list right: the fetcher verifies every chunk and, at the end, the whole blob.
    """

    TYPE: ClassVar[str] = "chunks"
    request_id: int
    digest: str
    size: int
    total: int
    start: int
    chunks: tuple[ChunkEntry, ...]


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """The newest version a server holds of one ``name:tag`` (name in full form)."""

    name: str
    tag: str
    version_id: bytes
    manifest_digest: str
    size: int
    hlc: int


@dataclass(frozen=True, slots=True)
class ModelList:
    """The answer to ``ListModels``; ``truncated`` means more models matched than listed."""

    TYPE: ClassVar[str] = "models"
    request_id: int
    models: tuple[ModelSummary, ...]
    truncated: bool


@dataclass(frozen=True, slots=True)
class Versions:
    """The answer to ``GetVersions``: encoded records, each for ``VersionRecord.decode``.

    Only sizes are checked here; the receiver decodes (and so verifies) each record.
    """

    TYPE: ClassVar[str] = "versions"
    request_id: int
    records: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ManifestData:
    """The answer to ``GetManifest``; ``data`` is checked to hash to ``digest``."""

    TYPE: ClassVar[str] = "manifest"
    request_id: int
    digest: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal. ``request_id`` ``None`` is about the stream, not one request: it is
    the server's last message, and every request still outstanding has failed."""

    TYPE: ClassVar[str] = "error"
    request_id: int | None
    code: str
    message: str


# ------------------------------------------------------- receive-only pseudo-events


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Server side only: a request that arrived intact but failed validation.

    Answer it with ``ErrorReply(request_id, "bad-request", reason)``; when
    ``request_id`` is ``None`` the id itself was unreadable, and the only possible
    answer is ``ErrorReply(None, ...)``, which ends the server's side of the stream.
    """

    request_id: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed its side (from ``next_event``), or we close ours (to ``send``)."""


Request: TypeAlias = ListModels | GetVersions | GetManifest | GetChunks
Response: TypeAlias = ModelList | Versions | ManifestData | ChunkList | ErrorReply
Message: TypeAlias = Request | Response

REQUEST_TYPES: tuple[type[Request], ...] = (ListModels, GetVersions, GetManifest, GetChunks)
RESPONSE_TYPES: tuple[type[Response], ...] = (
    ModelList,
    Versions,
    ManifestData,
    ChunkList,
    ErrorReply,
)


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


def encode_message(message: Message) -> bytes:
    """The CBOR payload of ``message`` (unframed); ``LocalProtocolError`` if invalid."""
    if not isinstance(message, REQUEST_TYPES + RESPONSE_TYPES):
        raise LocalProtocolError(f"{type(message).__name__} is not a catalog message")
    fields = _to_map(message)
    try:
        _DECODERS[message.TYPE](fields)
    except Invalid as exc:
        raise LocalProtocolError(f"cannot send {message.TYPE}: {exc}") from None
    return _cbor.dumps(fields)


def decode_message(payload: bytes) -> Message:
    """Decode one payload; ``MalformedMessage`` for a bad map, ``RemoteProtocolError`` for
    bad CBOR."""
    obj = _cbor.loads(payload, max_depth=3)
    if not isinstance(obj, dict):
        raise RemoteProtocolError("catalog message is not a CBOR map")
    raw_type, raw_id = obj.get("t"), obj.get("id")
    request_id = raw_id if type(raw_id) is int and 0 <= raw_id < REQUEST_ID_LIMIT else None
    if not isinstance(raw_type, str) or raw_type not in _DECODERS:
        shown = repr(raw_type)[:40]
        raise MalformedMessage(f"unknown catalog message type {shown}", request_id, None)
    decoder = _DECODERS[raw_type]
    try:
        return decoder(obj)
    except Invalid as exc:
        raise MalformedMessage(f"bad {raw_type} message: {exc}", request_id, raw_type) from None


def _to_map(message: Message) -> dict[str, Value]:
    fields: dict[str, Value] = {"t": message.TYPE, "id": message.request_id}
    match message:
        case ListModels(glob=glob, limit=limit):
            fields.update(g=glob, n=limit)
        case GetVersions(name=name):
            fields.update(n=name)
        case GetManifest(name_or_digest=name_or_digest):
            fields.update(n=name_or_digest)
        case ModelList(models=models, truncated=truncated):
            fields.update(m=[_summary_to_map(m) for m in models], x=truncated)
        case Versions(records=records):
            fields.update(r=list(records))
        case ManifestData(digest=digest, data=data):
            fields.update(d=digest, b=data)
        case GetChunks(digest=digest, start=start, limit=limit):
            fields.update(d=digest, s=start, n=limit)
        case ChunkList(digest=digest, size=size, total=total, start=start, chunks=chunks):
            packed = b"".join(
                _CHUNK_ENTRY.pack(c.offset, c.length, c.chunk_id)
                if isinstance(c, ChunkEntry) and len(c.chunk_id) == 32
                else _bad_entry(c)
                for c in chunks
            )
            fields.update(d=digest, z=size, n=total, s=start, c=packed)
        case ErrorReply(code=code, message=text):
            fields.update(c=code, m=text)
    return fields


def _summary_to_map(summary: ModelSummary) -> dict[str, Value]:
    if not isinstance(summary, ModelSummary):
        raise LocalProtocolError(f"ModelList.models holds a {type(summary).__name__}")
    return {
        "n": summary.name,
        "t": summary.tag,
        "v": summary.version_id,
        "d": summary.manifest_digest,
        "s": summary.size,
        "h": summary.hlc,
    }


def _bad_entry(entry: object) -> bytes:
    raise LocalProtocolError(f"ChunkList.chunks holds an invalid entry {entry!r:.60}")


def _decode_get_chunks(obj: Mapping[str, Value]) -> GetChunks:
    check_keys(obj, ("t", "id", "d", "s", "n"))
    digest = get_str(obj, "d", _MAX_DIGEST_FIELD)
    check_digest(digest)
    return GetChunks(
        request_id=_request_id(obj),
        digest=digest,
        start=get_int(obj, "s", 0, MAX_SIZE_VALUE),
        limit=get_int(obj, "n", 1, MAX_CHUNKS_PER_REPLY + 1),
    )


def _decode_chunk_list(obj: Mapping[str, Value]) -> ChunkList:
    check_keys(obj, ("t", "id", "d", "z", "n", "s", "c"))
    digest = get_str(obj, "d", _MAX_DIGEST_FIELD)
    check_digest(digest)
    size = get_int(obj, "z", 0, MAX_SIZE_VALUE)
    total = get_int(obj, "n", 0, MAX_SIZE_VALUE)
    start = get_int(obj, "s", 0, MAX_SIZE_VALUE)
    packed = get_bytes(obj, "c", 0, MAX_CHUNKS_PER_REPLY * _CHUNK_ENTRY.size)
    if len(packed) % _CHUNK_ENTRY.size:
        raise Invalid("chunk entries are not a whole number of 44-byte records")
    chunks = tuple(ChunkEntry(*e) for e in _CHUNK_ENTRY.iter_unpack(packed))
    if start + len(chunks) > total:
        raise Invalid(f"entries {start}..{start + len(chunks)} run past the total {total}")
    for before, after in itertools.pairwise(chunks):
        if after.offset != before.offset + before.length:
            raise Invalid("chunk entries are not contiguous")
    for c in chunks:
        if not 0 < c.length <= MAX_CHUNK_LENGTH or c.offset + c.length > size:
            raise Invalid(f"chunk at {c.offset} of {c.length} bytes does not fit the blob")
    if start == 0 and chunks and chunks[0].offset != 0:
        raise Invalid("the first chunk does not start at offset 0")
    return ChunkList(_request_id(obj), digest, size, total, start, chunks)


def _request_id(obj: Mapping[str, Value]) -> int:
    return get_int(obj, "id", 0, REQUEST_ID_LIMIT)


def _looks_like_digest(text: str) -> bool:
    # A digest-shaped string is always a digest, never a model called "sha256".
    return text.startswith(("sha256:", "sha256-"))


def _decode_list_models(obj: Mapping[str, Value]) -> ListModels:
    check_keys(obj, ("t", "id", "g", "n"))
    return ListModels(
        request_id=_request_id(obj),
        glob=get_str(obj, "g", MAX_GLOB_LENGTH),
        limit=get_int(obj, "n", 1, MAX_LIMIT + 1),
    )


def _check_name(name: str) -> None:
    try:
        parse_model_name(name)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None


def _decode_get_versions(obj: Mapping[str, Value]) -> GetVersions:
    check_keys(obj, ("t", "id", "n"))
    name = get_str(obj, "n", _MAX_NAME_FIELD)
    _check_name(name)
    return GetVersions(request_id=_request_id(obj), name=name)


def _decode_get_manifest(obj: Mapping[str, Value]) -> GetManifest:
    check_keys(obj, ("t", "id", "n"))
    name = get_str(obj, "n", _MAX_NAME_FIELD)
    if _looks_like_digest(name):
        check_digest(name)
    else:
        _check_name(name)
    return GetManifest(request_id=_request_id(obj), name_or_digest=name)


def _decode_summary(obj: Mapping[str, Value]) -> ModelSummary:
    check_keys(obj, ("n", "t", "v", "d", "s", "h"))
    summary = ModelSummary(
        name=get_str(obj, "n", _MAX_NAME_FIELD),
        tag=get_str(obj, "t", _MAX_TAG_FIELD),
        version_id=get_bytes(obj, "v", VERSION_ID_SIZE, VERSION_ID_SIZE),
        manifest_digest=get_str(obj, "d", _MAX_DIGEST_FIELD),
        size=get_int(obj, "s", 0, MAX_SIZE_VALUE),
        hlc=get_int(obj, "h", 0, HLC_LIMIT),
    )
    check_model(summary.name, summary.tag)
    check_digest(summary.manifest_digest)
    return summary


def _decode_model_list(obj: Mapping[str, Value]) -> ModelList:
    check_keys(obj, ("t", "id", "m", "x"))
    summaries = get_list_of(obj, "m", MAX_LIMIT, dict)
    return ModelList(
        request_id=_request_id(obj),
        models=tuple(_decode_summary(s) for s in summaries),
        truncated=get_bool(obj, "x"),
    )


def _decode_versions(obj: Mapping[str, Value]) -> Versions:
    check_keys(obj, ("t", "id", "r"))
    records = get_list_of(obj, "r", MAX_RECORDS_PER_REPLY, bytes)
    for record in records:
        if not 0 < len(record) <= MAX_RECORD_SIZE:
            raise Invalid(f"a record is {len(record)} bytes (expected 1..{MAX_RECORD_SIZE})")
    return Versions(request_id=_request_id(obj), records=tuple(records))


def _decode_manifest_data(obj: Mapping[str, Value]) -> ManifestData:
    check_keys(obj, ("t", "id", "d", "b"))
    digest = get_str(obj, "d", _MAX_DIGEST_FIELD)
    check_digest(digest)
    data = get_bytes(obj, "b", 0, MAX_MANIFEST_SIZE)
    # Checked here so no caller can forget: a manifest that is not what it claims to be
    # never leaves the codec.
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise Invalid("manifest data does not match its digest")
    return ManifestData(request_id=_request_id(obj), digest=digest, data=data)


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


_DECODERS: dict[str, Callable[[Mapping[str, Value]], Message]] = {
    ListModels.TYPE: _decode_list_models,
    GetVersions.TYPE: _decode_get_versions,
    GetManifest.TYPE: _decode_get_manifest,
    ModelList.TYPE: _decode_model_list,
    Versions.TYPE: _decode_versions,
    ManifestData.TYPE: _decode_manifest_data,
    GetChunks.TYPE: _decode_get_chunks,
    ChunkList.TYPE: _decode_chunk_list,
    ErrorReply.TYPE: _decode_error_reply,
}
