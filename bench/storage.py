"""Indexing and import throughput against one plain sha256 pass over the same file.

A blob must be hashed anyway before it gets its name, so one sha256 pass is the floor
every import pays; ``index_file`` adds FastCDC and per-chunk hashes on the other core,
and the goal is that this costs at most a fifth of the throughput (ratio >= 0.8).
Everything reads from the page cache: the disk is not what is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import Figure, progress, register
from storage.chunks import BlobIndex, MiB, index_file
from storage.manifest import CONFIG_MEDIA_TYPE, MODEL_MEDIA_TYPE, Layer, Manifest
from storage.names import blob_filename, parse_model_name
from storage.ollama_store import OllamaLayout
from storage.store import ModelStore
from storage.testmodels import generate_model

BENCH = "storage"
FULL_SIZE = 2048 * MiB
QUICK_SIZE = 128 * MiB
FULL_ROUNDS = 5
QUICK_ROUNDS = 3
BLOCK = 16 * MiB
GOAL = 0.8
BASELINE = "sha256, readinto 16 MiB"
MODEL_NAME = "bench-model:latest"

T = TypeVar("T")


def sha256_file(path: Path) -> str:
    """The baseline: one plain pass, reusing one buffer so nothing is allocated per block."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _ollama_source(root: Path, model: Path, digest: str) -> None:
    """Lay ``model`` out as an Ollama store under ``root`` (hard-linked, no bytes copied)."""
    layout = OllamaLayout(root)
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    os.link(model, blobs / blob_filename(digest))
    model_layer = Layer(MODEL_MEDIA_TYPE, digest, model.stat().st_size)
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    (blobs / blob_filename(config_digest)).write_bytes(config)
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, config_digest, len(config)), (model_layer,))
    layout.write(parse_model_name(MODEL_NAME), manifest)


def _import_once(source: Path, target: Path, total: int) -> float:
    """Import ``source`` into a fresh store at ``target``; return the seconds import took."""
    with ModelStore(target / "models", target / "dmm.db", target / "cas") as store:
        seconds, report = _timed(lambda: store.import_models(source))
    if report.errors or report.models_new != [MODEL_NAME]:
        raise RuntimeError(f"benchmark import failed: {report.errors or report}")
    if report.blobs_linked < 2:
        # A copy would measure the disk, not indexing: the figure would mean something else.
        raise RuntimeError(f"benchmark import copied instead of hard-linking: {report}")
    if report.bytes_indexed < total:
        raise RuntimeError(f"import indexed {report.bytes_indexed} bytes of a {total}-byte model")
    return seconds


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """index_file and import_models throughput vs one sha256 pass (2 GiB model; goal >= 0.8)"""
    size = QUICK_SIZE if quick else FULL_SIZE
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    with tempfile.TemporaryDirectory(prefix="dmm-bench-") as tmp:
        work = Path(tmp)
        model = work / "model.gguf"
        progress(f"{BENCH}: generating a {size // MiB} MiB GGUF model in {work}")
        generate_model(model, size, seed=1)
        # Flush it now so kernel writeback of dirty pages does not land inside a timed round.
        with open(model, "rb") as f:
            os.fsync(f.fileno())
        total = model.stat().st_size
        # This pass warms the page cache (all rounds then read from memory) and names the blob.
        digest = sha256_file(model)
        source = work / "ollama"
        _ollama_source(source, model, digest)

        best_sha = best_index = best_import = float("inf")
        index: BlobIndex | None = None
        for i in range(rounds):
            progress(f"{BENCH}: round {i + 1}/{rounds}")
            # Alternating the three within each round spreads the machine's noise over all.
            seconds, got = _timed(lambda: sha256_file(model))
            if got != digest:
                raise RuntimeError(f"sha256 of {model} changed between passes")
            best_sha = min(best_sha, seconds)
            seconds, index = _timed(lambda: index_file(model))
            best_index = min(best_index, seconds)
            # A fresh store each round: a second import into the same one is a no-op.
            target = work / f"import-{i}"
            best_import = min(best_import, _import_once(source, target, total))
            shutil.rmtree(target)

    if index is None or index.digest != digest:
        raise RuntimeError(f"index_file named the blob {index and index.digest}, not {digest}")
    chunks = index.chunks
    baseline = total / 1e6 / best_sha
    return [
        Figure.against(
            BENCH, "index_file", total / 1e6 / best_index, "MB/s", BASELINE, baseline, goal=GOAL
        ),
        Figure.against(
            BENCH, "import_models", total / 1e6 / best_import, "MB/s", BASELINE, baseline, goal=GOAL
        ),
        # Context for the throughput: more, smaller chunks cost more hashing calls and rows.
        Figure(BENCH, "chunks", len(chunks), "chunks", better="lower"),
        Figure(BENCH, "mean chunk size", round(total / len(chunks)), "bytes", better="higher"),
    ]
