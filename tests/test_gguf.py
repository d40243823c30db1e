"""storage/gguf.py: our reader and writer against each other and against the `gguf` package."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, LlamaFileType
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.gguf import (
    FILE_TYPE_NAMES,
    GGMLType,
    GGUFError,
    GGUFInfo,
    TensorSpec,
    Typed,
    ValueType,
    details,
    human_number,
    model_info,
    parse_gguf_info,
    read_gguf_info,
    tensor_nbytes,
    write_gguf,
)
from storage.testmodels import generate_model, main, parse_size

REPO = Path(__file__).resolve().parent.parent
T = ValueType


def assert_agrees_with_gguf_package(path: Path, info: GGUFInfo) -> GGUFReader:
    """Our reading of `path` is what the reference reader sees."""
    ref = GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(info.metadata)
    for key, f in fields.items():
        assert f.contents() == info.metadata[key], key
        vt, et = info.types[key]
        # The gguf package reports no element type for an empty array.
        expected = [vt, et] if et is not None and info.metadata[key] else [vt]
        assert [int(t) for t in f.types] == expected, key
    assert ref.alignment == info.alignment
    assert ref.data_offset == info.data_offset
    assert [t.name for t in ref.tensors] == [t.name for t in info.tensors]
    for r, t in zip(ref.tensors, info.tensors, strict=True):
        assert tuple(int(d) for d in r.shape) == t.shape
        assert int(r.tensor_type) == t.ggml_type
        assert r.data_offset == info.data_offset + t.offset
        assert r.n_bytes == t.nbytes
        assert r.data_offset % info.alignment == 0
    return ref


# --- generated models -----------------------------------------------------------------------

# Around the 32-byte minimum, the single-tensor tiny models and the smallest consistent llama
# (~20 KB); a few MiB is the module's `model` fixture.
SIZES = [0, 1, 31, 32, 33, 1000, 20_000, 30_000]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GGUFInfo, GGUFReader]:
    """A 3 MiB model (several layers, thousands of tokens), read by us and the gguf package."""
    path = tmp_path_factory.mktemp("model") / "m.gguf"
    info = generate_model(path, 3 << 20, name="tiny-llama", chat_template="{{ .Prompt }}")
    return path, info, assert_agrees_with_gguf_package(path, info)


@pytest.mark.parametrize("size", SIZES)
def test_generated_model_size_and_agreement(tmp_path: Path, size: int) -> None:
    path = tmp_path / "m.gguf"
    info = generate_model(path, size)
    assert info == read_gguf_info(path)
    assert path.stat().st_size == info.file_size
    assert info.file_size - info.data_offset == max(size, 32)  # the documented size semantics
    assert info.tensors
    ref = assert_agrees_with_gguf_package(path, info)
    last_end = max(r.data_offset + r.n_bytes for r in ref.tensors)
    assert last_end <= info.file_size
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("file_type", [0, 1, 7, 12, 15, 18, 32])
def test_generated_model_quantizations(tmp_path: Path, file_type: int) -> None:
    path = tmp_path / "m.gguf"
    info = generate_model(path, 1 << 20, file_type=file_type)
    assert info.file_size - info.data_offset == 1 << 20
    assert_agrees_with_gguf_package(path, info)
    weights = {t.ggml_type for t in info.tensors if len(t.shape) == 2}
    assert len(weights) == 1 and {t.ggml_type for t in info.tensors if len(t.shape) == 1} == {0}


def test_generated_model_of_a_few_mib(model: tuple[Path, GGUFInfo, GGUFReader]) -> None:
    path, info, ref = model
    assert info == read_gguf_info(path)
    assert info.file_size - info.data_offset == 3 << 20
    end = max(r.data_offset + r.n_bytes for r in ref.tensors)
    row = info.metadata["llama.embedding_length"] // 32 * 18  # Q4_0
    assert 0 <= info.file_size - end < 2 * row + 64  # the documented trailing zeros


def test_generated_model_is_consistent_llama(model: tuple[Path, GGUFInfo, GGUFReader]) -> None:
    info = model[1]
    m = info.metadata
    embd, layers, vocab = m["llama.embedding_length"], m["llama.block_count"], m["llama.vocab_size"]
    shapes = {t.name: t.shape for t in info.tensors}
    assert layers >= 2
    assert shapes["token_embd.weight"] == shapes["output.weight"] == (embd, vocab)
    assert len(m["tokenizer.ggml.tokens"]) == len(set(m["tokenizer.ggml.tokens"])) == vocab
    assert len(m["tokenizer.ggml.scores"]) == len(m["tokenizer.ggml.token_type"]) == vocab
    kv = m["llama.attention.head_count_kv"] * m["llama.rope.dimension_count"]
    for i in range(layers):
        assert shapes[f"blk.{i}.attn_q.weight"] == (embd, embd)
        assert shapes[f"blk.{i}.attn_k.weight"] == (embd, kv)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (m["llama.feed_forward_length"], embd)
    assert f"blk.{layers}.attn_q.weight" not in shapes
    assert m["tokenizer.chat_template"]
    assert len(info.tensors) == 2 + 9 * layers + 1


def test_generation_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    generate_model(a, 100_000, seed=1)
    generate_model(b, 100_000, seed=1)
    info = generate_model(c, 100_000, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[: info.data_offset] == c.read_bytes()[: info.data_offset]
    assert a.read_bytes()[info.data_offset :] != c.read_bytes()[info.data_offset :]


def test_tensor_bytes_are_pinned(tmp_path: Path) -> None:
    # Benchmarks compare runs across machines: the seeded stream must never change silently.
    info = write_gguf(tmp_path / "t.gguf", {}, [TensorSpec("w", (8, 4096))], data=7)
    data = (tmp_path / "t.gguf").read_bytes()[info.data_offset :]
    assert len(data) == 8 * 4096 * 4
    assert hashlib.sha256(data).hexdigest()[:16] == "6ced9ad6cf79a2d5"


def test_metadata_edit_shifts_identical_tensor_data(tmp_path: Path) -> None:
    short, long = tmp_path / "short.gguf", tmp_path / "long.gguf"
    a = generate_model(short, 1 << 20, chat_template="{{ prompt }}")
    b = generate_model(long, 1 << 20, chat_template="{{ prompt }}" + " " * 5000)
    assert b.data_offset > a.data_offset
    assert [(t.name, t.offset) for t in a.tensors] == [(t.name, t.offset) for t in b.tensors]
    data_a = short.read_bytes()[a.data_offset :]
    data_b = long.read_bytes()[b.data_offset :]
    assert len(data_a) == 1 << 20 and data_a == data_b


def test_reader_never_reads_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    info = generate_model(path, 2 << 20)

    class Watched(io.BytesIO):
        furthest = 0

        def read(self, n: int | None = -1, /) -> bytes:
            out = super().read(n)
            Watched.furthest = max(Watched.furthest, self.tell())
            return out

    assert parse_gguf_info(Watched(path.read_bytes())) == info
    assert Watched.furthest <= info.data_offset


# --- Ollama's /api/show view -----------------------------------------------------------------


def test_details_and_model_info(model: tuple[Path, GGUFInfo, GGUFReader]) -> None:
    _, info, ref = model
    params = sum(t.n_elements for t in ref.tensors)
    assert details(info) == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": human_number(params),
        "quantization_level": "Q4_0",
    }
    assert details(info)["parameter_size"].endswith("M")
    mi = model_info(info)
    assert list(mi) == sorted(mi)
    assert mi["general.architecture"] == "llama"
    assert mi["general.parameter_count"] == params
    assert mi["general.file_type"] == 2
    assert mi["llama.context_length"] == info.metadata["llama.context_length"]
    assert mi["llama.embedding_length"] == info.metadata["llama.embedding_length"]
    assert mi["llama.attention.layer_norm_rms_epsilon"] == 1e-05  # Go's float32 formatting
    assert json.dumps(mi["llama.rope.freq_base"]) == "10000"
    assert mi["tokenizer.ggml.tokens"] is None and mi["tokenizer.ggml.scores"] is None
    assert "general.name" not in mi and "tokenizer.chat_template" not in mi
    verbose = model_info(info, verbose=True)
    assert len(verbose["tokenizer.ggml.tokens"]) == info.metadata["llama.vocab_size"]
    assert verbose["tokenizer.ggml.scores"][259] == -1.0


@pytest.mark.parametrize(
    ("file_type", "level"), [(1, "F16"), (7, "Q8_0"), (15, "Q4_K_M"), (32, "BF16"), (0, "unknown")]
)
def test_quantization_level(tmp_path: Path, file_type: int, level: str) -> None:
    # Ollama reads general.file_type 0 as unset, so an all-F32 model is "unknown" there too.
    info = generate_model(tmp_path / "m.gguf", 40_000, file_type=file_type, arch="qwen2")
    assert details(info)["quantization_level"] == level
    assert details(info)["families"] == ["qwen2"]
    assert "qwen2.context_length" in model_info(info)


def test_model_info_of_empty_array_and_missing_keys(tmp_path: Path) -> None:
    meta = {"general.file_type": Typed(T.UINT64, 2), "a": Typed(T.ARRAY, [], T.INT32)}
    info = write_gguf(tmp_path / "x.gguf", meta, [TensorSpec("w", (8,))])
    assert model_info(info) == {
        "a": [],
        "general.file_type": 2,
        "general.parameter_count": 8,
    }
    assert details(info)["family"] == "unknown"
    assert details(info)["quantization_level"] == "unknown"  # Ollama wants a uint32


@pytest.mark.parametrize(
    ("n", "text"),
    [
        # format/format_test.go in Ollama, and two real models
        (0, "0"), (999, "999"), (1000, "1K"), (1001, "1K"), (1_000_000, "1M"),
        (125_000_000, "125M"), (500_500_000, "500.50M"), (500_550_000, "500.55M"),
        (1_000_000_000, "1B"), (2_800_000_000, "2.8B"), (2_850_000_000, "2.9B"),
        (1_000_000_000_000, "1000B"), (8_030_261_248, "8.0B"), (134_515_008, "134.52M"),
    ],
)  # fmt: skip
def test_human_number(n: int, text: str) -> None:
    assert human_number(n) == text


def test_type_tables_match_ggml() -> None:
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        assert tensor_nbytes((block, 3), int(qtype)) == 3 * size, qtype.name
        assert GGMLType(int(qtype)).name == qtype.name
    for ftype in LlamaFileType:
        if ftype.name.startswith("MOSTLY_"):
            assert FILE_TYPE_NAMES[int(ftype)] == ftype.name.removeprefix("MOSTLY_")


# --- writing ---------------------------------------------------------------------------------

# key, value to write, value read back, (type, element type)
ROUND_TRIP: list[tuple[str, Any, Any, tuple[ValueType, ValueType | None]]] = [
    ("u8", Typed(T.UINT8, 255), 255, (T.UINT8, None)),
    ("i8", Typed(T.INT8, -128), -128, (T.INT8, None)),
    ("u16", Typed(T.UINT16, 65535), 65535, (T.UINT16, None)),
    ("i16", Typed(T.INT16, -32768), -32768, (T.INT16, None)),
    ("u32", 4_294_967_295, 4_294_967_295, (T.UINT32, None)),
    ("i32", -5, -5, (T.INT32, None)),
    ("i64", -(2**40), -(2**40), (T.INT64, None)),
    ("i64.max", 2**63 - 1, 2**63 - 1, (T.INT64, None)),
    ("u64", 2**64 - 1, 2**64 - 1, (T.UINT64, None)),
    ("u64.small", Typed(T.UINT64, 7), 7, (T.UINT64, None)),
    ("f32", 0.5, 0.5, (T.FLOAT32, None)),
    ("f32.rounded", 0.1, struct.unpack("<f", struct.pack("<f", 0.1))[0], (T.FLOAT32, None)),
    ("f64", Typed(T.FLOAT64, 0.1), 0.1, (T.FLOAT64, None)),
    ("bool", True, True, (T.BOOL, None)),
    ("bool.false", False, False, (T.BOOL, None)),
    ("str", "héllo ✓ {{ .Prompt }}\n", "héllo ✓ {{ .Prompt }}\n", (T.STRING, None)),
    ("str.empty", "", "", (T.STRING, None)),
    ("arr.u8", Typed(T.ARRAY, [0, 255], T.UINT8), [0, 255], (T.ARRAY, T.UINT8)),
    ("arr.i16", Typed(T.ARRAY, (-1, 1), T.INT16), [-1, 1], (T.ARRAY, T.INT16)),
    ("arr.u32", [1, 2, 3], [1, 2, 3], (T.ARRAY, T.UINT32)),
    ("arr.i32", [-1, 2, 3], [-1, 2, 3], (T.ARRAY, T.INT32)),
    ("arr.u64", [2**63], [2**63], (T.ARRAY, T.UINT64)),
    ("arr.i64", Typed(T.ARRAY, [-(2**63)], T.INT64), [-(2**63)], (T.ARRAY, T.INT64)),
    ("arr.f32", [0.25, -1.5, 3], [0.25, -1.5, 3.0], (T.ARRAY, T.FLOAT32)),
    ("arr.f64", Typed(T.ARRAY, [0.1], T.FLOAT64), [0.1], (T.ARRAY, T.FLOAT64)),
    ("arr.bool", [True, False], [True, False], (T.ARRAY, T.BOOL)),
    ("arr.str", ["a", "", "ü"], ["a", "", "ü"], (T.ARRAY, T.STRING)),
    ("arr.empty", Typed(T.ARRAY, [], T.STRING), [], (T.ARRAY, T.STRING)),
]


def test_metadata_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rt.gguf"
    meta = {key: value for key, value, _, _ in ROUND_TRIP}
    info = write_gguf(path, meta, [TensorSpec("w", (32, 2), GGMLType.Q8_0)])
    for key, _, expected, types in ROUND_TRIP:
        assert info.metadata[key] == expected, key
        assert type(info.metadata[key]) is type(expected), key
        assert info.types[key] == types, key
    assert_agrees_with_gguf_package(path, info)
    again = tmp_path / "again.gguf"
    assert write_gguf(again, info.typed_metadata(), [TensorSpec("w", (32, 2), GGMLType.Q8_0)])
    assert again.read_bytes() == path.read_bytes()


def test_write_with_data_callable_and_alignment(tmp_path: Path) -> None:
    specs = [
        TensorSpec("a", (5,), GGMLType.F32),
        TensorSpec("b", (64, 3), GGMLType.Q4_0),
        TensorSpec("c", (3, 2), GGMLType.I8),
    ]

    def data(spec: TensorSpec) -> list[bytes]:
        return [bytes([ord(spec.name)]) * (spec.nbytes - 1), b"!"]

    path = tmp_path / "x.gguf"
    info = write_gguf(path, {"general.architecture": "test"}, specs, alignment=64, data=data)
    assert info.alignment == 64 and info.metadata["general.alignment"] == 64
    assert info.types["general.alignment"] == (T.UINT32, None)
    ref = assert_agrees_with_gguf_package(path, info)
    for r in ref.tensors:
        raw = bytes(r.data.tobytes())
        assert raw == bytes([ord(r.name)]) * (r.n_bytes - 1) + b"!"
    assert info.data_offset % 64 == 0 and all(t.offset % 64 == 0 for t in info.tensors)


@pytest.mark.parametrize(
    ("meta", "tensors", "kwargs", "error"),
    [
        ({"k": []}, [], {}, ValueError),
        ({"k": 2**64}, [], {}, ValueError),
        ({"k": Typed(T.UINT8, 256)}, [], {}, ValueError),
        ({"k": Typed(T.ARRAY, [1])}, [], {}, ValueError),
        ({"k": Typed(T.ARRAY, [[1]], T.ARRAY)}, [], {}, ValueError),
        ({"k": Typed(T.BOOL, 1)}, [], {}, TypeError),
        ({"k": {"a": 1}}, [], {}, TypeError),
        ({"k": [1, "a"]}, [], {}, TypeError),
        ({"k": [[1]]}, [], {}, TypeError),
        ({"": 1}, [], {}, ValueError),
        ({"general.alignment": 64}, [], {}, ValueError),
        ({}, [TensorSpec("x" * 64, (8,))], {}, ValueError),
        ({}, [TensorSpec("w", (8,)), TensorSpec("w", (8,))], {}, ValueError),
        ({}, [TensorSpec("w", (30, 2), GGMLType.Q4_0)], {}, ValueError),
        ({}, [TensorSpec("w", (8,), 5)], {}, ValueError),
        ({}, [TensorSpec("w", (1, 1, 1, 1, 1))], {}, ValueError),
        ({}, [], {"alignment": 12}, ValueError),
        ({}, [TensorSpec("w", (8,))], {"data": lambda spec: [b"short"]}, ValueError),
        ({}, [TensorSpec("w", (1,))], {"data": lambda spec: [b"too long"]}, ValueError),
    ],
)
def test_write_rejects_bad_input(
    tmp_path: Path, meta: dict[str, Any], tensors: list[TensorSpec], kwargs: Any, error: type
) -> None:
    with pytest.raises(error):
        write_gguf(tmp_path / "bad.gguf", meta, tensors, **kwargs)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind


# --- malformed input --------------------------------------------------------------------------


def _s(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _file(kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_t: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv) + kvs + tensors


def _kv(key: bytes, vt: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vt) + payload


def _tensor(name: bytes, shape: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    dims = struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
    return _s(name) + dims + struct.pack("<IQ", ggml_type, offset)


_BIG = 2**60
_ALIGN64 = _kv(b"general.alignment", 4, struct.pack("<I", 64))
MALFORMED: list[tuple[bytes, str]] = [
    (b"", "not a GGUF file"),
    (b"GGU", "not a GGUF file"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (b"GGUF", "truncated: version"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1 is not supported"),
    (b"GGUF" + struct.pack("<IQQ", 4, 0, 0), "unsupported GGUF version 4"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (b"GGUF" + struct.pack("<IQQ", 3, _BIG, 0), "tensors, over the limit"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, _BIG), "metadata entries, over the limit"),
    (_file(n_kv=1000), "truncated: header declares 1000"),
    (_file(struct.pack("<Q", _BIG) + bytes(8), 1), "over the limit"),
    (_file(_kv(b"k", 13, bytes(8)), 1), "unknown value type 13"),
    (_file(_kv(b"k", 8, struct.pack("<Q", _BIG)), 1), "is 1152921504606846976 bytes long"),
    (_file(_kv(b"k", 8, struct.pack("<Q", 100) + b"abc"), 1), "truncated"),
    (_file(_kv(b"k", 9, struct.pack("<IQ", 4, _BIG)), 1), "array has 1152921504606846976"),
    (_file(_kv(b"k", 9, struct.pack("<IQ", 8, 1000)), 1), "truncated"),
    (_file(_kv(b"k", 9, struct.pack("<IQ", 4, 10) + bytes(8)), 1), "truncated"),
    (_file(_kv(b"k", 9, struct.pack("<IQ", 9, 1) + bytes(12)), 1), "array of arrays"),
    (_file(_kv(b"k", 9, struct.pack("<IQ", 99, 1) + bytes(12)), 1), "unknown value type 99"),
    (_file(_kv(b"\xff\xfe", 0, b"\x00"), 1), "not valid UTF-8"),
    (_file(_kv(b"k", 0, b"\x00") * 2, 2), "duplicate metadata key 'k'"),
    (_file(_kv(b"general.alignment", 10, bytes(8)), 1), "power of two"),
    (_file(_kv(b"general.alignment", 4, struct.pack("<I", 48)), 1), "power of two"),
    (_file(_kv(b"general.alignment", 4, bytes(4)), 1), "power of two"),
    (_file(tensors=_tensor(b"t", (1,) * 5), n_t=1), "5 dimensions"),
    (_file(tensors=_tensor(b"t", (2**62, 4)), n_t=1), "overflows int64"),
    (_file(tensors=_tensor(b"t", (32,), 4), n_t=1), "unknown ggml type 4"),
    (_file(tensors=_tensor(b"t", (33,), 2), n_t=1), "not a multiple of Q4_0's 32"),
    (_file(tensors=_tensor(b"t", (8,), 0, 16) + bytes(64), n_t=1), "not a multiple of the"),
    (_file(tensors=_tensor(b"t", (8,)) + bytes(30), n_t=1), "past the end of the file"),
    (_file(tensors=_tensor(b"t", (8,)) * 2 + bytes(96), n_t=2), "duplicate tensor name"),
    (_file(tensors=_tensor(b"\xc3", (8,)), n_t=1), "not valid UTF-8"),
    (_file(_ALIGN64, 1, _tensor(b"t", (8,), 0, 32) + bytes(200), 1), "multiple of the alignm"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_input_raises_gguf_error(data: bytes, message: str) -> None:
    with pytest.raises(GGUFError, match=message) as caught:
        parse_gguf_info(io.BytesIO(data))
    assert "\n" not in str(caught.value)


def test_valid_handmade_files_parse() -> None:
    # The same builders as MALFORMED make valid files, so those cases fail for their stated reason.
    valid = _file(_ALIGN64, 1, _tensor(b"t", (8,), 0, 0) + bytes(128), 1)
    info = parse_gguf_info(io.BytesIO(valid))
    assert info.alignment == 64 and info.data_offset % 64 == 0
    assert parse_gguf_info(io.BytesIO(b"GGUF" + struct.pack("<IQQ", 2, 0, 0))).version == 2


def test_read_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03")
    with pytest.raises(GGUFError, match=f"^{path}: truncated: version"):
        read_gguf_info(path)
    with pytest.raises(FileNotFoundError):
        read_gguf_info(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    meta = {key: value for key, value, _, _ in ROUND_TRIP[::3]}
    specs = [TensorSpec("a", (8, 2)), TensorSpec("b", (32, 1), GGMLType.Q4_0)]
    write_gguf(path, meta, specs, data=3)
    return path.read_bytes()


def test_truncation_at_every_offset_is_gguf_error(small_file: bytes) -> None:
    info = parse_gguf_info(io.BytesIO(small_file))
    end = max(info.data_offset + t.offset + t.nbytes for t in info.tensors)
    for cut in range(end):
        with pytest.raises(GGUFError):
            parse_gguf_info(io.BytesIO(small_file[:cut]))


def test_truncated_generated_model_is_gguf_error(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    info = generate_model(path, 30_000)
    data = path.read_bytes()
    end = max(info.data_offset + t.offset + t.nbytes for t in info.tensors)
    for cut in [*range(0, 300), *range(300, end, 97), end - 1]:
        with pytest.raises(GGUFError):
            parse_gguf_info(io.BytesIO(data[:cut]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.sampled_from([b"", b"GGUF\x03\x00\x00\x00", b"GGUF\x02\0\0\0"]))
def test_random_bytes_give_only_gguf_error(data: bytes, prefix: bytes) -> None:
    with contextlib.suppress(GGUFError):
        parse_gguf_info(io.BytesIO(prefix + data))


@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_corrupted_file_gives_only_gguf_error(small_file: bytes, data: st.DataObject) -> None:
    corrupt = bytearray(small_file)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(corrupt) - 1))
        corrupt[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(corrupt)))
    with contextlib.suppress(GGUFError):
        parse_gguf_info(io.BytesIO(bytes(corrupt[:cut])))


# --- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000000", 1_000_000), ("0", 0), ("64MiB", 64 << 20), ("2GiB", 2 << 30),
        ("2gib", 2 << 30), ("10K", 10_000), ("10KB", 10_000), ("10KiB", 10_240),
        ("1.5GiB", 3 << 29), ("3 MB", 3_000_000), ("1T", 10**12), ("512B", 512),
    ],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.2.3", "12XB", "1e6"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_main_writes_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    argv = [str(out), "--size", "64KiB", "--template", "T", "--seed", "5", "--name", "cli"]
    assert main([*argv, "--file-type", "Q8_0"]) == 0
    info = read_gguf_info(out)
    assert info.file_size - info.data_offset == 64 << 10
    assert info.metadata["general.name"] == "cli"
    assert info.metadata["tokenizer.chat_template"] == "T"
    assert details(info)["quantization_level"] == "Q8_0"
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: {info.file_size} bytes") and "Q8_0" in printed


def test_main_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["x.gguf"],
        ["x.gguf", "--size", "lots"],
        ["x", "--size", "1", "--file-type", "Q9"],
    ):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert main([str(tmp_path / "missing" / "x.gguf"), "--size", "1"]) == 1
    assert "make-model: error:" in capsys.readouterr().err


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    shown = capsys.readouterr().out
    for option in ("OUT.gguf", "--size", "--template", "--seed", "--name", "--file-type", "GiB"):
        assert option in shown


def test_make_model_script(tmp_path: Path) -> None:
    script = REPO / "scripts" / "make-model"
    assert os.access(script, os.X_OK)
    out = tmp_path / "s.gguf"
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [script, out, "--size", "100000"], capture_output=True, text=True, env=env, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    info = read_gguf_info(out)
    assert info.file_size - info.data_offset == 100_000
