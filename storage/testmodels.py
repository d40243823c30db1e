"""Synthetic GGUF models for tests, benchmarks and demos: real files with random weights.

``generate_model`` writes a consistent llama-like model (hyperparameters matching tensor
shapes, a vocabulary, a chat template) of a chosen size. Tensor bytes depend only on the seed
and the tensor's name, so two models that differ only in metadata share their weights, shifted:
the case delta sync is built for. ``python -m storage.testmodels --help`` is its command line
(``scripts/make-model``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from storage.gguf import (
    DEFAULT_ALIGNMENT,
    FILE_TYPE_NAMES,
    FILE_TYPE_WEIGHT_TYPE,
    GGML_BLOCKS,
    GGMLType,
    GGUFInfo,
    TensorSpec,
    Typed,
    ValueType,
    align_up,
    details,
    tensor_nbytes,
    write_gguf_file,
)

__all__ = ["DEFAULT_CHAT_TEMPLATE", "generate_model", "main", "parse_size"]

DEFAULT_CHAT_TEMPLATE: Final = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_EMBEDDINGS: Final = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 8192)


@dataclass(frozen=True, slots=True)
class _Shape:
    """Hyperparameters of a llama-like model, consistent with its tensor shapes."""

    embd: int
    layers: int
    vocab: int
    weight: GGMLType

    @property
    def head_dim(self) -> int:
        return min(128, max(8, self.embd // 16))

    @property
    def heads(self) -> int:
        return self.embd // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.heads // 4 if self.heads >= 8 else self.heads

    @property
    def ffn(self) -> int:
        # Quantized rows are whole blocks: ffn_down's first dimension is the ffn width.
        return align_up(self.embd * 8 // 3, max(32, GGML_BLOCKS[self.weight][0]))

    def tensors(self) -> list[TensorSpec]:
        e, kv, w, f32 = self.embd, self.kv_heads * self.head_dim, self.weight, GGMLType.F32
        out = [TensorSpec("token_embd.weight", (e, self.vocab), w)]
        for i in range(self.layers):
            out += [
                TensorSpec(f"blk.{i}.attn_norm.weight", (e,), f32),
                TensorSpec(f"blk.{i}.attn_q.weight", (e, e), w),
                TensorSpec(f"blk.{i}.attn_k.weight", (e, kv), w),
                TensorSpec(f"blk.{i}.attn_v.weight", (e, kv), w),
                TensorSpec(f"blk.{i}.attn_output.weight", (e, e), w),
                TensorSpec(f"blk.{i}.ffn_norm.weight", (e,), f32),
                TensorSpec(f"blk.{i}.ffn_gate.weight", (e, self.ffn), w),
                TensorSpec(f"blk.{i}.ffn_up.weight", (e, self.ffn), w),
                TensorSpec(f"blk.{i}.ffn_down.weight", (self.ffn, e), w),
            ]
        out.append(TensorSpec("output_norm.weight", (e,), f32))
        out.append(TensorSpec("output.weight", (e, self.vocab), w))
        return out

    def data_size(self) -> int:
        """Bytes of the data section, tensor padding included (alignment 32)."""
        e, kv, ff = self.embd, self.kv_heads * self.head_dim, self.ffn
        a, w = DEFAULT_ALIGNMENT, self.weight
        layer = 2 * align_up(4 * e, a) + 2 * align_up(tensor_nbytes((e, e), w), a)
        layer += 2 * align_up(tensor_nbytes((e, kv), w), a)
        layer += 2 * align_up(tensor_nbytes((e, ff), w), a) + align_up(tensor_nbytes((ff, e), w), a)
        vocab = align_up(tensor_nbytes((e, self.vocab), w), a)
        return 2 * vocab + align_up(4 * e, a) + self.layers * layer


def _base_vocab(embd: int) -> int:
    return 32000 if embd >= 1024 else max(320, 16 * embd)


def _plan(size: int, weight: GGMLType) -> _Shape | None:
    """The widest llama-like shape with at least min(16, embd/64) layers whose data fits in
    size, grown by layers then vocabulary rows to fill it; None if even the smallest won't."""
    block = max(32, GGML_BLOCKS[weight][0])
    best: _Shape | None = None
    for embd in (e for e in _EMBEDDINGS if e % block == 0):
        if best is None:  # the smallest width allowed: as small as a consistent model gets
            shape = _Shape(embd, 1, 320, weight)
        else:
            shape = _Shape(embd, min(16, max(1, embd // 64)), _base_vocab(embd), weight)
        if shape.data_size() > size:
            break
        best = shape
    if best is None:
        return None
    one = _Shape(best.embd, 1, best.vocab, weight)
    per_layer = _Shape(best.embd, 2, best.vocab, weight).data_size() - one.data_size()
    layers = 1 + (size - one.data_size()) // per_layer
    shape = _Shape(best.embd, layers, best.vocab, weight)
    row = tensor_nbytes((best.embd, 1), weight)
    vocab = best.vocab + (size - shape.data_size()) // (2 * row)
    # Padding makes the estimate off by a row or so either way; settle on the largest that fits.
    while _Shape(best.embd, layers, vocab, weight).data_size() > size:
        vocab -= 1
    while _Shape(best.embd, layers, vocab + 1, weight).data_size() <= size:
        vocab += 1
    return _Shape(best.embd, layers, vocab, weight)


def _vocabulary(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: unk/bos/eos, 256 byte tokens, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    kinds = [2, 3, 3] + [6] * 256  # unknown, control, byte (llama_token_type)
    i = 0
    while len(tokens) < n:
        word, j = "", (i >> 1) + 1
        while j:  # bijective base 26: a..z, aa, ab, ...
            j, r = divmod(j - 1, 26)
            word = chr(97 + r) + word
        tokens.append("\u2581" + word if i & 1 == 0 else word)
        i += 1
    kinds += [1] * (len(tokens) - len(kinds))
    scores = [0.0] * 259 + [-float(k) for k in range(1, len(tokens) - 258)]
    return tokens, scores[: len(tokens)], kinds


def generate_model(
    path: Path,
    size: int,
    *,
    arch: str = "llama",
    name: str = "test-model",
    chat_template: str | None = None,
    file_type: int = 2,
    seed: int = 0,
    extra_metadata: Mapping[str, Any] | None = None,
) -> GGUFInfo:
    """Write a realistic llama-like GGUF model whose data section is exactly max(size, 32) bytes.

    The data section runs from ``data_offset`` to the end of the file. Tensors fill it but for
    under two token-embedding rows plus 64 bytes of trailing zeros (a few KiB when quantized),
    which every GGUF reader ignores. From about 20 KB up the model is consistent, as llama.cpp
    expects: token_embd, blk.N.attn_{norm,q,k,v,output}, blk.N.ffn_{norm,gate,up,down},
    output_norm and output tensors, matching hyperparameters and a SentencePiece-style
    vocabulary. Smaller sizes give a single F32 token_embd.weight tensor.

    Weights use ``file_type``'s tensor type (2 = Q4_0), norms F32. Tensor bytes depend only on
    (seed, tensor name, tensor size), so models differing only in metadata (e.g. the chat
    template) share their tensor data. ``chat_template`` None writes a small default
    template; "" writes none. ``extra_metadata`` is added last and overrides.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    if file_type not in FILE_TYPE_WEIGHT_TYPE:
        supported = ", ".join(f"{t} ({FILE_TYPE_NAMES[t]})" for t in FILE_TYPE_WEIGHT_TYPE)
        raise ValueError(f"file_type {file_type} not supported here; use one of {supported}")
    size = max(size, DEFAULT_ALIGNMENT)
    shape = _plan(size, FILE_TYPE_WEIGHT_TYPE[file_type])
    if shape is None:
        rows = size // 32
        shape = _Shape(8, 0, 320, GGMLType.F32)
        tensors = [TensorSpec("token_embd.weight", (8, rows), GGMLType.F32)]
        tail = size - 32 * rows
    else:
        tensors = shape.tensors()
        tail = size - shape.data_size()
    tokens, scores, kinds = _vocabulary(shape.vocab)
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": name,
        "general.file_type": Typed(ValueType.UINT32, file_type),
        "general.quantization_version": Typed(ValueType.UINT32, 2),
        f"{arch}.vocab_size": shape.vocab,
        f"{arch}.context_length": 2048 if shape.embd < 1024 else 4096,
        f"{arch}.embedding_length": shape.embd,
        f"{arch}.block_count": shape.layers,
        f"{arch}.feed_forward_length": shape.ffn if shape.layers else 0,
        f"{arch}.attention.head_count": shape.heads,
        f"{arch}.attention.head_count_kv": shape.kv_heads,
        f"{arch}.rope.dimension_count": shape.head_dim,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": Typed(ValueType.ARRAY, scores, ValueType.FLOAT32),
        "tokenizer.ggml.token_type": Typed(ValueType.ARRAY, kinds, ValueType.INT32),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }
    template = DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template
    if template:
        meta["tokenizer.chat_template"] = template
    meta.update(extra_metadata or {})
    return write_gguf_file(Path(path), meta, tensors, DEFAULT_ALIGNMENT, seed, tail)


# --- command line: scripts/make-model ---------------------------------------------------------

_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(i)?)?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "1000000", "64MiB", "2GiB", "1.5G" (K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB
    powers of 1024, a trailing B is optional)."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 1000000, 64MiB or 2GiB)")
    number, unit, binary = m.groups()
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    scale = (1024 if binary else 1000) ** power
    return int(float(number) * scale) if "." in number else int(number) * scale


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _file_type_arg(text: str) -> int:
    by_name = {v: k for k, v in FILE_TYPE_NAMES.items() if k in FILE_TYPE_WEIGHT_TYPE}
    if text.upper() in by_name:
        return by_name[text.upper()]
    if text.isdigit() and int(text) in FILE_TYPE_WEIGHT_TYPE:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"unsupported file type {text!r}; use one of {sorted(by_name)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/make-model: write a synthetic GGUF model and say what was written."""
    parser = argparse.ArgumentParser(
        prog="make-model",
        description=(
            "Write a realistic llama-like GGUF v3 model with deterministic pseudo-random "
            "weights, for tests and benchmarks. Its tensor data section is exactly SIZE bytes "
            "(at least 32); the same --seed gives the same tensor bytes whatever the metadata."
        ),
        epilog=(
            "SIZE is bytes with an optional unit: K, M, G, T are powers of 1000; KiB, MiB, GiB, "
            "TiB powers of 1024 (e.g. 1000000, 64MiB, 2GiB). Exit status: 0 written, 1 failed, "
            "2 bad usage."
        ),
    )
    parser.add_argument("out", type=Path, metavar="OUT.gguf", help="file to write (replaced)")
    parser.add_argument(
        "--size", required=True, type=_size_arg, help="tensor data size, e.g. 64MiB"
    )
    parser.add_argument(
        "--template",
        metavar="TEXT",
        help='tokenizer.chat_template (default: a small built-in one; "" for none)',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the tensor bytes (default 0)")
    parser.add_argument("--name", default="test-model", help="general.name (default test-model)")
    parser.add_argument("--arch", default="llama", help="general.architecture (default llama)")
    parser.add_argument(
        "--file-type",
        type=_file_type_arg,
        default=2,
        metavar="TYPE",
        help="quantization, e.g. Q4_0 (default), Q8_0, F16, F32, Q4_K_M",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        info = generate_model(
            args.out,
            args.size,
            arch=args.arch,
            name=args.name,
            chat_template=args.template,
            file_type=args.file_type,
            seed=args.seed,
        )
    except (OSError, ValueError) as e:
        print(f"make-model: error: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    d = details(info)
    print(
        f"wrote {args.out}: {info.file_size} bytes in {elapsed:.2f}s; data section "
        f"{info.file_size - info.data_offset} bytes at offset {info.data_offset}; "
        f"{len(info.tensors)} tensors; {d['family']} {d['parameter_size']} "
        f"{d['quantization_level']}; seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
