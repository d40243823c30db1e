"""GGUF model files: read their header and write them (test models: storage/testmodels.py).

Layout (GGUF v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata
count; each metadata entry is a string key, a u32 value type and the value; each tensor info is
a string name, u32 n_dims, u64 dims (innermost first, as ggml's ``ne``), u32 ggml type and a u64
offset into the data section; padding to the alignment; then the data section, every tensor at
an aligned offset. Strings are a u64 length and UTF-8 bytes.

The reader reads the header, metadata and tensor infos and never the tensor data; every
malformed input raises :class:`GGUFError`. The writer streams tensor data in large writes and
never holds a file in memory. Standard library only: the node imports this for ``/api/show``.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Final

__all__ = [
    "DEFAULT_ALIGNMENT",
    "FILE_TYPE_NAMES",
    "GGUF_MAGIC",
    "GGUF_VERSION",
    "GGMLType",
    "GGUFError",
    "GGUFInfo",
    "TensorData",
    "TensorInfo",
    "TensorSpec",
    "Typed",
    "ValueType",
    "details",
    "file_type_name",
    "human_number",
    "model_info",
    "parse_gguf_info",
    "read_gguf_info",
    "tensor_nbytes",
    "write_gguf",
]

GGUF_MAGIC: Final = b"GGUF"
GGUF_VERSION: Final = 3
DEFAULT_ALIGNMENT: Final = 32

# Caps on what a header may declare. Real models are far below them (vocabularies up to ~260k
# tokens, chat templates up to ~100 KiB, a few thousand tensors); they make a corrupt or hostile
# header fail at once with GGUFError instead of exhausting memory.
MAX_KV_COUNT: Final = 1 << 16
MAX_TENSOR_COUNT: Final = 1 << 17
MAX_KEY_LEN: Final = 65535  # the spec's limit
MAX_STRING_LEN: Final = 16 << 20
MAX_ARRAY_LEN: Final = 1 << 22
MAX_TENSOR_NAME_LEN: Final = 1024  # read leniently; write_gguf keeps llama.cpp's 63
MAX_DIMS: Final = 4  # GGML_MAX_DIMS
_WRITE_NAME_LEN: Final = 63  # llama.cpp rejects names of GGML_MAX_NAME (64) bytes or more


class GGUFError(ValueError):
    """The input is not a well-formed GGUF file; the message says why in one line."""


class ValueType(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class GGMLType(IntEnum):
    """ggml tensor types (``ggml_type``) that may appear in GGUF files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block), as ggml's type traits; QK_K = 256.
GGML_BLOCKS: Final[dict[int, tuple[int, int]]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}

# general.file_type (llama_ftype) as Ollama names it in details.quantization_level.
FILE_TYPE_NAMES: Final[dict[int, str]] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip

# The tensor type generate_model uses for a file type's weight matrices.
FILE_TYPE_WEIGHT_TYPE: Final[dict[int, GGMLType]] = {
    0: GGMLType.F32, 1: GGMLType.F16, 2: GGMLType.Q4_0, 3: GGMLType.Q4_1, 7: GGMLType.Q8_0,
    8: GGMLType.Q5_0, 9: GGMLType.Q5_1, 10: GGMLType.Q2_K, 11: GGMLType.Q3_K,
    12: GGMLType.Q3_K, 13: GGMLType.Q3_K, 14: GGMLType.Q4_K, 15: GGMLType.Q4_K,
    16: GGMLType.Q5_K, 17: GGMLType.Q5_K, 18: GGMLType.Q6_K, 32: GGMLType.BF16,
}  # fmt: skip

_SCALAR_CODES: Final[dict[ValueType, str]] = {
    ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
    ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "?",
    ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d",
}  # fmt: skip
_SCALARS: Final = {t: struct.Struct("<" + c) for t, c in _SCALAR_CODES.items()}
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


def tensor_nbytes(shape: Sequence[int], ggml_type: int) -> int:
    """Bytes of a tensor's data; ValueError for an unknown type or a row not made of blocks."""
    if ggml_type not in GGML_BLOCKS:
        raise ValueError(f"unknown ggml type {ggml_type}")
    block, block_bytes = GGML_BLOCKS[ggml_type]
    if shape and shape[0] % block:
        name = GGMLType(ggml_type).name
        raise ValueError(f"first dimension {shape[0]} is not a multiple of {name}'s {block}")
    return math.prod(shape) // block * block_bytes


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True, slots=True)
class Typed:
    """A metadata value with an explicit GGUF type, for when inference would pick another.

    ``element_type`` is required for (and only for) ``ValueType.ARRAY``.
    """

    type: ValueType
    value: Any
    element_type: ValueType | None = None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor as the file describes it. ``shape`` is innermost first (ggml's ``ne``);
    ``offset`` is relative to the data section (add ``GGUFInfo.data_offset``)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor to write: ``shape`` innermost first, as in :class:`TensorInfo`."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int = GGMLType.F32

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What the header of a GGUF file says. Arrays are lists; ``types`` maps each key to its
    (value type, element type or None)."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    types: dict[str, tuple[ValueType, ValueType | None]] = field(default_factory=dict)

    @property
    def parameter_count(self) -> int:
        """Total elements of all tensors, as Ollama reports general.parameter_count."""
        return sum(t.n_elements for t in self.tensors)

    def typed_metadata(self) -> dict[str, Typed]:
        """The metadata with its types, so write_gguf writes it back exactly."""
        return {k: Typed(self.types[k][0], v, self.types[k][1]) for k, v in self.metadata.items()}


# --- reading ----------------------------------------------------------------------------------


class _Source:
    """Exact, bounded reads: nothing past the end of the file is ever requested."""

    __slots__ = ("_f", "pos", "size")

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self.pos, self.size = f, 0, size

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise GGUFError(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file ends at {self.size}"
            )
        data = self._f.read(n)
        while len(data) < n:  # raw streams may return short reads
            more = self._f.read(n - len(data))
            if not more:
                raise GGUFError(f"file shrank while reading {what} at offset {self.pos}")
            data += more
        self.pos += n
        return data

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.take(8, what))[0])

    def string(self, what: str, limit: int) -> bytes:
        n = self.u64(what)
        if n > limit:
            raise GGUFError(f"{what} is {n} bytes long, over the limit of {limit}")
        return self.take(n, what)

    def name(self, what: str, limit: int) -> str:
        raw = self.string(what, limit)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not valid UTF-8: {raw[:40]!r}") from None


def _value_type(raw: int, what: str) -> ValueType:
    try:
        return ValueType(raw)
    except ValueError:
        raise GGUFError(f"{what} has unknown value type {raw}") from None


def _read_value(src: _Source, vt: ValueType, what: str) -> tuple[Any, ValueType | None]:
    if vt == ValueType.STRING:
        return src.string(what, MAX_STRING_LEN).decode(errors="replace"), None
    if vt != ValueType.ARRAY:
        s = _SCALARS[vt]
        return s.unpack(src.take(s.size, what))[0], None
    et = _value_type(src.u32(what), f"{what} array")
    if et == ValueType.ARRAY:
        raise GGUFError(f"{what} is an array of arrays, which GGUF readers do not support")
    n = src.u64(f"{what} array length")
    if n > MAX_ARRAY_LEN:
        raise GGUFError(f"{what} array has {n} elements, over the limit of {MAX_ARRAY_LEN}")
    if et != ValueType.STRING:
        code = _SCALAR_CODES[et]
        data = src.take(n * _SCALARS[et].size, what)
        return list(struct.unpack(f"<{n}{code}", data)), et
    if n * 8 > src.size - src.pos:  # each string needs at least its length field
        raise GGUFError(f"truncated: {what} declares {n} strings past the end of the file")
    take, unpack, out = src.take, _U64.unpack, []
    for _ in range(n):
        length = unpack(take(8, what))[0]
        if length > MAX_STRING_LEN:
            raise GGUFError(f"a string in {what} is {length} bytes, over {MAX_STRING_LEN}")
        out.append(take(length, what).decode(errors="replace"))
    return out, et


def parse_gguf_info(f: BinaryIO) -> GGUFInfo:
    """Read a GGUF header from a seekable binary file object, from offset 0 to its end."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    src = _Source(f, size)
    magic = src.take(4, "magic") if size >= 4 else f.read()
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: starts with {magic!r}, not {GGUF_MAGIC!r}")
    raw_version = src.take(4, "version")
    version = int(_U32.unpack(raw_version)[0])
    if version not in (2, 3):
        if version == 1:
            raise GGUFError("GGUF version 1 is not supported (only versions 2 and 3)")
        if int.from_bytes(raw_version, "big") in (1, 2, 3):
            raise GGUFError("big-endian GGUF files are not supported")
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors = src.u64("tensor count")
    n_kv = src.u64("metadata count")
    if n_tensors > MAX_TENSOR_COUNT:
        raise GGUFError(f"header declares {n_tensors} tensors, over the limit {MAX_TENSOR_COUNT}")
    if n_kv > MAX_KV_COUNT:
        raise GGUFError(f"header declares {n_kv} metadata entries, over the limit {MAX_KV_COUNT}")
    # Smallest possible entries: key length, type and a u8 value; name length, n_dims, type and
    # offset. A header declaring more than fits is truncated, whatever comes next.
    if n_kv * 13 + n_tensors * 24 > size - src.pos:
        raise GGUFError(
            f"truncated: header declares {n_kv} metadata entries and {n_tensors} tensors "
            f"but only {size - src.pos} bytes follow"
        )

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[ValueType, ValueType | None]] = {}
    for i in range(n_kv):
        key = src.name(f"metadata key {i}", MAX_KEY_LEN)
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key[:100]!r}")
        what = f"metadata {key[:100]!r}"
        vt = _value_type(src.u32(what), what)
        value, et = _read_value(src, vt, what)
        metadata[key], types[key] = value, (vt, et)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if (
            types["general.alignment"][0] != ValueType.UINT32
            or alignment & (alignment - 1)
            or (not alignment)
        ):
            raise GGUFError(f"general.alignment must be a uint32 power of two, not {alignment!r}")

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = src.name(f"tensor {i} name", MAX_TENSOR_NAME_LEN)
        if name in names:
            raise GGUFError(f"duplicate tensor name {name[:100]!r}")
        names.add(name)
        what = f"tensor {name[:100]!r}"
        n_dims = src.u32(f"{what} n_dims")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{what} has {n_dims} dimensions, over ggml's {MAX_DIMS}")
        shape = tuple(src.u64(f"{what} shape") for _ in range(n_dims))
        if any(d >= 1 << 63 for d in shape) or math.prod(shape) >= 1 << 63:
            raise GGUFError(f"{what} shape {shape} overflows int64")
        raw_type = src.u32(f"{what} type")
        if raw_type not in GGML_BLOCKS:
            raise GGUFError(f"{what} has unknown ggml type {raw_type}")
        ggml_type = GGMLType(raw_type)
        try:
            tensor_nbytes(shape, ggml_type)
        except ValueError as e:
            raise GGUFError(f"{what}: {e}") from None
        offset = src.u64(f"{what} offset")
        if offset % alignment:
            raise GGUFError(
                f"{what} offset {offset} is not a multiple of the alignment {alignment}"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, offset))

    data_offset = align_up(src.pos, alignment)
    for t in tensors:
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFError(
                f"truncated: tensor {t.name[:100]!r} ends at byte {end}, past the end of the "
                f"file at {size}"
            )
    return GGUFInfo(version, metadata, tensors, alignment, data_offset, size, types)


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's header, metadata and tensor infos (never its tensor data).

    Raises GGUFError, naming the file, for any malformed content; OSError if it cannot be read.
    """
    with open(path, "rb", buffering=1 << 16) as f:
        try:
            return parse_gguf_info(f)
        except GGUFError as e:
            raise GGUFError(f"{os.fspath(path)}: {e}") from None


# --- Ollama's view: /api/show details and model_info -----------------------------------------


def human_number(n: int) -> str:
    """A count the way Ollama's format.HumanNumber prints it: 8.0B, 134.52M, 1B, 15K, 999."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            x = n / scale
            return f"{x:.0f}{unit}" if x == math.floor(x) else f"{x:.{decimals}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def file_type_name(info: GGUFInfo) -> str:
    """details.quantization_level: Ollama reads general.file_type only as a uint32 above 0,
    so an all-F32 file (0) is "unknown" there too."""
    value = info.metadata.get("general.file_type")
    vt = info.types["general.file_type"][0] if "general.file_type" in info.types else None
    if vt != ValueType.UINT32 or not value:
        return "unknown"
    return FILE_TYPE_NAMES.get(value, "unknown")


def _architecture(info: GGUFInfo) -> str:
    arch = info.metadata.get("general.architecture")
    return arch if isinstance(arch, str) else "unknown"


def details(info: GGUFInfo) -> dict[str, Any]:
    """The ``details`` object of Ollama's /api/show and /api/tags for this model file."""
    arch = _architecture(info)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": human_number(info.parameter_count),
        "quantization_level": file_type_name(info),
    }


def _f32_json(x: float) -> float | int:
    # Go marshals a float32 in its shortest decimal form (1e-05, not 9.999999747378752e-06)
    # and whole numbers below 1e21 without a fraction (10000, not 10000.0).
    if not math.isfinite(x):
        return x
    if x == int(x) and abs(x) < 1e21:
        return int(x)
    packed = struct.pack("<f", x)
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return x


def model_info(info: GGUFInfo, *, verbose: bool = False) -> dict[str, Any]:
    """The ``model_info`` object of Ollama's /api/show: every metadata key except general.name
    and tokenizer.chat_template, general.parameter_count set to the tensors' element count,
    keys sorted. Unless verbose, non-empty arrays are None (JSON null) and empty ones [],
    as Ollama does."""
    out: dict[str, Any] = {}
    for key, value in info.metadata.items():
        if key in ("general.name", "tokenizer.chat_template"):
            continue
        vt, et = info.types.get(key, (None, None))
        if isinstance(value, list):
            if not verbose:
                value = [] if not value else None
            elif et == ValueType.FLOAT32:
                value = [_f32_json(v) for v in value]
        elif vt == ValueType.FLOAT32:
            value = _f32_json(value)
        out[key] = value
    out["general.parameter_count"] = info.parameter_count
    return dict(sorted(out.items()))


# --- writing ----------------------------------------------------------------------------------

BytesLike = bytes | bytearray | memoryview
TensorData = Callable[[TensorSpec], Iterable[BytesLike]]
"""Produces a tensor's bytes, in pieces of any size, exactly ``spec.nbytes`` in all."""

_WRITE_BATCH: Final = 4 << 20
_IOV_BATCH: Final = 512  # below every platform's IOV_MAX
_ZEROS: Final = bytes(1 << 20)


def _int_type(lo: int, hi: int) -> ValueType:
    if lo >= 0 and hi < 1 << 32:
        return ValueType.UINT32
    if lo >= -(1 << 31) and hi < 1 << 31:
        return ValueType.INT32
    if lo >= -(1 << 63) and hi < 1 << 63:
        return ValueType.INT64
    if lo >= 0 and hi < 1 << 64:
        return ValueType.UINT64
    raise ValueError(f"integer {hi if hi >= 1 << 64 else lo} does not fit 64 bits")


def _infer(key: str, value: Any) -> tuple[ValueType, ValueType | None]:
    if isinstance(value, bool):
        return ValueType.BOOL, None
    if isinstance(value, int):
        return _int_type(value, value), None
    if isinstance(value, float):
        return ValueType.FLOAT32, None
    if isinstance(value, str):
        return ValueType.STRING, None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"metadata {key!r}: give an empty array's element type with Typed")
        if all(isinstance(v, bool) for v in value):
            return ValueType.ARRAY, ValueType.BOOL
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ValueType.ARRAY, _int_type(min(value), max(value))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return ValueType.ARRAY, ValueType.FLOAT32
        if all(isinstance(v, str) for v in value):
            return ValueType.ARRAY, ValueType.STRING
        raise TypeError(f"metadata {key!r}: array elements must all be one scalar kind")
    raise TypeError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _encode_string(out: bytearray, s: Any, key: str) -> None:
    if not isinstance(s, str):
        raise TypeError(f"metadata {key!r}: expected str, got {type(s).__name__}")
    raw = s.encode()
    out += _U64.pack(len(raw))
    out += raw


def _encode_kv(out: bytearray, key: str, value: Any) -> None:
    if isinstance(value, Typed):
        vt, et, value = ValueType(value.type), value.element_type, value.value
        if (vt == ValueType.ARRAY) != (et is not None) or et == ValueType.ARRAY:
            raise ValueError(
                f"metadata {key!r}: element_type is required for, and only for, arrays"
            )
    else:
        vt, et = _infer(key, value)
    raw_key = key.encode()
    if not raw_key or len(raw_key) > MAX_KEY_LEN:
        raise ValueError(f"metadata key {key[:100]!r} must be 1 to {MAX_KEY_LEN} bytes")
    out += _U64.pack(len(raw_key)) + raw_key + _U32.pack(vt)
    try:
        if vt == ValueType.STRING:
            _encode_string(out, value, key)
        elif vt != ValueType.ARRAY:
            if vt == ValueType.BOOL and not isinstance(value, bool):
                raise TypeError(f"metadata {key!r}: expected bool, got {type(value).__name__}")
            out += _SCALARS[vt].pack(value)
        else:
            assert et is not None
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"metadata {key!r}: an array needs a list or tuple")
            out += _U32.pack(et) + _U64.pack(len(value))
            if et == ValueType.STRING:
                for s in value:
                    _encode_string(out, s, key)
            else:
                if et == ValueType.BOOL and not all(isinstance(v, bool) for v in value):
                    raise TypeError(f"metadata {key!r}: a bool array holds only bools")
                out += struct.pack(f"<{len(value)}{_SCALAR_CODES[et]}", *value)
    except (struct.error, OverflowError) as e:
        raise ValueError(f"metadata {key!r}: {value!r:.80} does not fit {vt.name}: {e}") from None


class _VectorWriter:
    """Collects buffers and writes them with writev once ≥4 MiB are pending: large writes
    without copying tensor data into a buffer first."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._bufs: list[BytesLike] = []
        self._pending = 0

    def add(self, buf: BytesLike) -> None:
        if len(buf):
            self._bufs.append(buf)
            self._pending += len(buf)
            if self._pending >= _WRITE_BATCH or len(self._bufs) >= _IOV_BATCH:
                self.flush()

    def zeros(self, n: int) -> None:
        while n > 0:
            step = min(n, len(_ZEROS))
            self.add(memoryview(_ZEROS)[:step])
            n -= step

    def flush(self) -> None:
        bufs = self._bufs
        while bufs:
            written = os.writev(self._fd, bufs)
            if written <= 0:
                raise OSError(f"writev wrote {written} bytes")
            i = 0
            while i < len(bufs) and written >= len(bufs[i]):
                written -= len(bufs[i])
                i += 1
            bufs = bufs[i:]
            if bufs and written:
                bufs[0] = memoryview(bufs[0])[written:]
        self._bufs, self._pending = [], 0


class _NoisePool:
    """Deterministic pseudo-random tensor bytes at disk speed.

    Hashing every byte (SHAKE-128) runs at ~250 MiB/s, and random.randbytes at ~150 MiB/s,
    too slow for multi-GiB files. Instead a fixed 64 MiB noise pool is hashed once per process,
    lazily by 128 KiB segment, and a tensor's bytes are pieces of 64-128 KiB of the pool at
    offsets drawn from a PRNG seeded by (seed, tensor name): written zero-copy with writev.
    Every 256 KiB window spans pieces at independent random offsets, so content-defined chunks
    never repeat within or across files. Not a secure stream; a compressor with a window over
    64 MiB could find the reuse.
    """

    SEGMENT: Final = 1 << 17  # small, so small files hash little of the pool
    SPAN: Final = 64 << 20
    PIECE_MIN: Final = 1 << 16  # pieces are shorter than a segment: they span at most two

    def __init__(self) -> None:
        self._segments: dict[int, memoryview] = {}
        self._lock = threading.Lock()

    def _segment(self, i: int) -> memoryview:
        seg = self._segments.get(i)
        if seg is None:
            with self._lock:
                seg = self._segments.get(i)
                if seg is None:
                    digest = hashlib.shake_128(b"dmm.gguf.noise:%d" % i).digest(self.SEGMENT)
                    seg = self._segments[i] = memoryview(digest)
        return seg

    def pieces(self, seed: int, name: str, nbytes: int) -> Iterator[memoryview]:
        """The first nbytes of the stream for (seed, name), in pieces."""
        key = hashlib.sha256(b"%d\x00%s" % (seed, name.encode())).digest()
        rng = random.Random(int.from_bytes(key, "little"))
        while nbytes > 0:
            length = min(nbytes, self.PIECE_MIN + rng.getrandbits(16))
            start = rng.getrandbits(26) % (self.SPAN - 2 * self.PIECE_MIN)
            i, off = divmod(start, self.SEGMENT)
            first = self._segment(i)[off : off + length]
            yield first
            if len(first) < length:
                yield self._segment(i + 1)[: length - len(first)]
            nbytes -= length


_noise = _NoisePool()  # a cache of derived bytes, identical in every process


def write_gguf_file(
    path: Path,
    metadata: Mapping[str, Any],
    tensors: Sequence[TensorSpec],
    alignment: int,
    data: int | TensorData,
    tail: int,
) -> GGUFInfo:
    if alignment < 8 or alignment & (alignment - 1) or alignment >= 1 << 32:
        raise ValueError(f"alignment must be a power of two, at least 8, not {alignment}")
    meta = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in meta:
        given = meta.setdefault("general.alignment", Typed(ValueType.UINT32, alignment))
        if (given.value if isinstance(given, Typed) else given) != alignment:
            raise ValueError(f"general.alignment {given!r} contradicts alignment={alignment}")
        meta["general.alignment"] = Typed(ValueType.UINT32, alignment)

    header = bytearray(GGUF_MAGIC)
    header += _U32.pack(GGUF_VERSION) + _U64.pack(len(tensors)) + _U64.pack(len(meta))
    for key, value in meta.items():
        _encode_kv(header, key, value)
    names: set[str] = set()
    offset = 0
    for spec in tensors:
        raw = spec.name.encode()
        if not raw or len(raw) > _WRITE_NAME_LEN or spec.name in names:
            raise ValueError(f"tensor name {spec.name!r} is empty, duplicate or over 63 bytes")
        names.add(spec.name)
        if not 1 <= len(spec.shape) <= MAX_DIMS or any(d < 0 for d in spec.shape):
            raise ValueError(f"tensor {spec.name!r}: shape {spec.shape} needs 1-4 sizes >= 0")
        try:
            nbytes = spec.nbytes
        except ValueError as e:
            raise ValueError(f"tensor {spec.name!r}: {e}") from None
        header += _U64.pack(len(raw)) + raw + _U32.pack(len(spec.shape))
        header += struct.pack(f"<{len(spec.shape)}Q", *spec.shape)
        header += _U32.pack(spec.ggml_type) + _U64.pack(offset)
        offset += align_up(nbytes, alignment)
    header += bytes(align_up(len(header), alignment) - len(header))

    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        out = _VectorWriter(fd)
        out.add(header)
        for spec in tensors:
            nbytes = spec.nbytes
            if isinstance(data, int):
                pieces: Iterable[BytesLike] = _noise.pieces(data, spec.name, nbytes)
            else:
                pieces = data(spec)
            written = 0
            for piece in pieces:
                view = memoryview(piece).cast("B")
                written += len(view)
                if written > nbytes:
                    break
                out.add(view)
            if written != nbytes:
                raise ValueError(f"tensor {spec.name!r}: data gave {written}+ bytes, not {nbytes}")
            out.zeros(align_up(nbytes, alignment) - nbytes)
        out.zeros(tail)
        out.flush()
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)  # readers never see a half-written file
    return read_gguf_info(path)


def write_gguf(
    path: Path,
    metadata: Mapping[str, Any],
    tensors: Sequence[TensorSpec],
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    data: int | TensorData = 0,
) -> GGUFInfo:
    """Write a GGUF v3 file (atomically: a temporary file renamed into place) and return its info.

    Metadata values are Python values or :class:`Typed`. Inferred types: bool → BOOL; int →
    UINT32, else INT32, INT64, UINT64, the first that fits; float → FLOAT32; str → STRING;
    list/tuple → ARRAY of the same rule applied to all elements (ints and floats mixed →
    FLOAT32). Arrays of arrays are not supported (neither does llama.cpp).

    ``data`` is a seed — each tensor's bytes are then a deterministic pseudo-random function of
    (seed, tensor name, size) only, so files differing in metadata share their tensor bytes —
    or a callable giving each tensor's bytes. Each tensor is padded to the alignment with zeros.
    """
    return write_gguf_file(Path(path), metadata, tensors, alignment, data, 0)
