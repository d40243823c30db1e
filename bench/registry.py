"""The node as a registry client and as a registry, against a real one (docker-registry).

- upstream: a node with no peers pulls a model from a local ``docker-registry`` (its
  fallback when no peer has a model): 4 ranged requests at once per blob into a
  resumable download, the whole-blob sha256 and chunk index, manifest last. The
  baseline is what a plain client pays for the same blob from the same registry:
  ``curl -s -o FILE`` then ``sha256sum``.
- serve: the Ollama client's download of a model the node holds, through ``/v2/``
  (HEAD, the redirect, 4 ranged GETs at once into one file, then its sha256), against
  the same client downloading the same blob from ``docker-registry`` itself.

Both run in this one process on loopback (the node's trio loop and the client share a
core on a 2-core machine), so the absolute rates are pessimistic; each baseline is
measured in the same run on the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import Figure, progress, register
from node.daemon import open_node
from node.testing import node_config
from node.testregistry import OciRegistry, run_oci_registry
from storage.chunks import MiB
from storage.manifest import MODEL_MEDIA_TYPE, Layer
from storage.testmodels import generate_model

BENCH = "registry"
FULL_SIZE = 512 * MiB
QUICK_SIZE = 32 * MiB
ROUNDS = 2
PARTS = 4
GOAL = 0.8
REPO = "library/bench-registry"
TAG = "latest"


async def _ollama_download(base: str, repo: str, layer: Layer, out: Path) -> None:
    """As ``ollama pull`` downloads a blob: HEAD, the redirect, parts in parallel, sha256."""
    url = f"/v2/{repo}/blobs/{layer.digest}"
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        size = int((await client.head(url)).headers["Content-Length"])
        where = await client.get(url)
        direct = where.headers.get("Location", url) if where.status_code == 307 else url
        part = max(1, math.ceil(size / PARTS))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)

            async def fetch(start: int) -> None:
                end = min(size, start + part) - 1
                headers = {"Range": f"bytes={start}-{end}"}
                async with client.stream("GET", direct, headers=headers) as r:
                    offset = start
                    async for piece in r.aiter_bytes(1 * MiB):
                        await trio.to_thread.run_sync(os.pwrite, fd, piece, offset)
                        offset += len(piece)

            async with trio.open_nursery() as nursery:
                for start in range(0, size, part):
                    nursery.start_soon(fetch, start)
        finally:
            os.close(fd)
    digest = await trio.to_thread.run_sync(_sha256, out)
    if digest != layer.digest:
        raise RuntimeError(f"downloaded {out} hashes to {digest}, not {layer.digest}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _curl_and_sha256sum(registry: OciRegistry, layer: Layer, out: Path) -> float:
    started = time.perf_counter()
    url = f"{registry.url}/v2/{REPO}/blobs/{layer.digest}"
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    done = subprocess.run(["sha256sum", str(out)], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.stdout.split()[0] != layer.digest[7:]:
        raise RuntimeError("curl fetched the wrong bytes")
    return seconds


async def _measure(
    registry: OciRegistry, layer: Layer, total: int, root: Path
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"pull": [], "curl": [], "serve": [], "direct": []}

    async def quiet(event: dict[str, Any]) -> None:
        pass

    for round_ in range(ROUNDS):
        folder = root / f"round{round_}"
        config = node_config(folder, "node", upstream_registry=registry.url)
        async with open_node(config) as node:
            started = time.perf_counter()
            await node.pull(f"bench-registry:{TAG}", quiet)
            times["pull"].append(time.perf_counter() - started)
            progress(f"{BENCH}: upstream pull of {total / MiB:.0f} MiB: {times['pull'][-1]:.2f}s")
            out = folder / "blob"
            times["curl"].append(
                await trio.to_thread.run_sync(_curl_and_sha256sum, registry, layer, out)
            )
            for label, base in (("serve", node.api_urls[0]), ("direct", registry.url)):
                started = time.perf_counter()
                await _ollama_download(base, REPO, layer, out)
                times[label].append(time.perf_counter() - started)
            progress(
                f"{BENCH}: /v2/ {times['serve'][-1]:.2f}s, docker-registry "
                f"{times['direct'][-1]:.2f}s, curl+sha256sum {times['curl'][-1]:.2f}s"
            )
            out.unlink()
    return times


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """Upstream-registry pull and /v2/ serving, against docker-registry and curl."""
    for tool in ("curl", "sha256sum"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"the {BENCH} benchmark needs {tool}")
    size = QUICK_SIZE if quick else FULL_SIZE
    with tempfile.TemporaryDirectory(prefix="dmm-bench-registry-") as tmp:
        root = Path(tmp)
        progress(f"{BENCH}: generating a {size / MiB:.0f} MiB model")
        generate_model(root / "model.gguf", size, seed=9)
        with run_oci_registry(root / "registry") as registry:
            manifest = registry.push_model(root / "model.gguf", REPO, TAG)
            layer = manifest.layer_of_type(MODEL_MEDIA_TYPE)
            assert layer is not None
            times = trio.run(_measure, registry, layer, manifest.total_size, root)
    mb = layer.size / 1e6
    best = {k: min(v) for k, v in times.items()}
    return [
        Figure.against(
            BENCH,
            f"upstream pull, {layer.size / MiB:.0f} MiB, no peers",
            mb / best["pull"],
            "MB/s",
            "curl + sha256sum of the blob from the same registry",
            mb / best["curl"],
            goal=GOAL,
        ),
        Figure.against(
            BENCH,
            f"/v2/ download as ollama pull does, {layer.size / MiB:.0f} MiB",
            mb / best["serve"],
            "MB/s",
            "the same client against docker-registry",
            mb / best["direct"],
            goal=GOAL,
        ),
    ]
