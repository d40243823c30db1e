"""Pulling a model from the upstream OCI registry when no reachable peer has it.

``[api] upstream_registry`` names the registry (``registry.ollama.ai`` by default, i.e.
https; ``http://host:port`` for a plain-http one; ``""`` for none). The pull speaks OCI
distribution as ``ollama pull`` does: the manifest (Accepting the docker v2 manifest
type), then each missing blob in up to ``PARTS`` ranged requests at once, written into a
``RangedDownload`` (``storage/download.py``) whose progress survives a crash or a
cancel, so a restarted pull asks only for the bytes it lacks. A blob gets its name only
once its sha256 matches; the manifest is written last, and the node then publishes the
model (``node.refresh()``) so the swarm can find it. Progress events have the shape of
``node/pull.py``'s (Ollama's ``/api/pull`` stream).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import trio

from node.pull import Emit, PullError, layer_event, plain_pull_errors, write_manifest
from storage.cas import BlobMismatchError
from storage.chunks import MiB
from storage.download import Part, RangedDownload
from storage.manifest import (
    MANIFEST_MEDIA_TYPE,
    MAX_MANIFEST_BYTES,
    Layer,
    Manifest,
    ManifestError,
    parse_manifest,
)
from storage.names import DEFAULT_HOST, ModelName
from storage.partial import PartialBusy

if TYPE_CHECKING:
    from node.daemon import Node

__all__ = [
    "PARTS",
    "download_blob",
    "fetch_manifest",
    "open_client",
    "pull_upstream",
    "registry_url",
]

log = logging.getLogger("dmm.upstream")

# A blob is cut into at most this many parts, fetched at once, none under MIN_PART.
PARTS = 4
MIN_PART = 8 * MiB
# Bytes handed to the disk at a time, and how often progress is made durable.
PIECE = 1 * MiB
FLUSH_BYTES = 16 * MiB
FLUSH_INTERVAL = 1.0  # seconds: a slow registry loses at most this much to a crash
# Attempts per part (a dropped connection resumes where it stopped).
MAX_TRIES = 4
ACCEPT = ", ".join(
    (MANIFEST_MEDIA_TYPE, "application/vnd.oci.image.manifest.v1+json", "application/json")
)
TIMEOUT = httpx.Timeout(30.0, read=60.0)


class _PartFailed(Exception):
    """One request for a part went wrong in a way worth retrying."""


@dataclass(slots=True)
class _Counter:
    fetched: int = 0
    unflushed: int = 0
    flushed_at: float = 0.0


def registry_url(node: Node, name: ModelName) -> str | None:
    """The base URL to pull ``name`` from: the configured registry for library names
    (and for names on the configured registry's own host), else ``https://<host>``."""
    configured = node.config.api.upstream_registry_url
    if name.host == DEFAULT_HOST:
        return configured
    if configured is not None and httpx.URL(configured).netloc.decode() == name.host:
        return configured
    return f"https://{name.host}"


async def pull_upstream(
    node: Node,
    name: ModelName,
    emit: Emit,
    *,
    no_peer: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Pull ``name`` from the upstream registry; ``no_peer`` says why the swarm could not.

    Raises PullError naming the registry and what went wrong. ``transport`` replaces
    httpx's network transport (tests put a faulty network between us and a registry).
    """
    base = registry_url(node, name)
    if base is None:
        raise PullError(f"{no_peer} (and no [api] upstream_registry is set)")
    started = trio.current_time()
    async with open_client(transport) as client:
        raw, manifest = await fetch_manifest(client, base, name)
        log.info(
            "pull %s: no peer has it; pulling %d bytes from %s",
            name.display,
            manifest.total_size,
            base,
        )
        fetched = resumed = 0
        for layer in manifest.all_layers():
            if node.store.cas.location(layer.digest) == "file":
                await emit(layer_event(layer.digest, layer.size, layer.size, 0))
                continue
            got, had = await download_blob(node, client, base, name, layer, emit)
            fetched += got
            resumed += had
    await emit({"status": "verifying sha256 digest"})
    await emit({"status": "writing manifest"})
    await trio.to_thread.run_sync(write_manifest, node, name, raw, manifest)
    await node.refresh()
    summary = {
        "model": name.display,
        "already_complete": False,
        "bytes_fetched": fetched,
        "bytes_resumed": resumed,
        "bytes_local": 0,
        "peers": [],
        "registry": base,
    }
    await emit({"status": "success", **{k: summary[k] for k in ("bytes_fetched", "registry")}})
    log.info(
        "pulled %s from %s: %d bytes fetched, %d resumed, in %.1f s",
        name.display,
        base,
        fetched,
        resumed,
        trio.current_time() - started,
    )
    return summary


def open_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """An HTTP client for registries; ``transport`` replaces the network (tests)."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=TIMEOUT,
        follow_redirects=True,  # registry.ollama.ai sends blobs from a CDN
        headers={"User-Agent": "dmm"},
    )


async def fetch_manifest(
    client: httpx.AsyncClient, base: str, name: ModelName
) -> tuple[bytes, Manifest]:
    """``name``'s manifest from the registry at ``base``: raw bytes, parsed; or PullError."""
    url = f"{base}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"
    what = f"{name.display} is on no reachable peer"
    try:
        async with client.stream("GET", url, headers={"Accept": ACCEPT}) as resp:
            if resp.status_code == 404:
                raise PullError(f"no reachable peer has {name.display}, and {base} does not either")
            if resp.status_code in (401, 403):
                raise PullError(
                    f"{what}, and {base} refused the manifest ({resp.status_code}); "
                    "dmm does not log in to registries"
                )
            if resp.status_code != 200:
                raise PullError(f"{what}, and {base} answered {resp.status_code} for its manifest")
            body = bytearray()
            async for piece in resp.aiter_bytes():
                body += piece
                if len(body) > MAX_MANIFEST_BYTES:
                    raise PullError(f"{base} sent a manifest over {MAX_MANIFEST_BYTES} bytes")
            claimed = resp.headers.get("Docker-Content-Digest")
    except httpx.HTTPError as exc:
        raise PullError(f"{what}, and {base} could not be reached: {exc}") from None
    raw = bytes(body)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if claimed and claimed != digest:
        raise PullError(f"{base} sent a manifest that hashes to {digest}, not {claimed}")
    try:
        return raw, parse_manifest(raw)
    except ManifestError as exc:
        raise PullError(f"{base} sent an unusable manifest for {name.display}: {exc}") from None


async def download_blob(
    node: Node,
    client: httpx.AsyncClient,
    base: str,
    name: ModelName,
    layer: Layer,
    emit: Emit,
) -> tuple[int, int]:
    """One blob into the store; returns (bytes fetched now, bytes resumed from disk)."""
    url = f"{base}/v2/{name.namespace}/{name.model}/blobs/{layer.digest}"
    part_size = max(MIN_PART, math.ceil(layer.size / PARTS))
    cas = node.store.cas
    try:
        download = await trio.to_thread.run_sync(
            RangedDownload.open, cas, layer.digest, layer.size, part_size
        )
    except PartialBusy as exc:
        raise PullError(f"{exc}; try again when that pull ends") from None
    counter = _Counter(flushed_at=trio.current_time())
    resumed = download.resumed
    finished = trio.Event()
    try:
        if resumed:
            log.info("blob %s of %s: resuming with %d bytes", layer.digest, name.display, resumed)

        async def report() -> None:
            while not finished.is_set():
                done = min(resumed + counter.fetched, layer.size)
                await emit(layer_event(layer.digest, layer.size, done, 0))
                with trio.move_on_after(0.25):
                    await finished.wait()

        with plain_pull_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report)
                try:
                    async with trio.open_nursery() as parts:
                        for part in download.parts():
                            if part.remaining:
                                parts.start_soon(
                                    _download_part, client, url, download, part, counter
                                )
                finally:
                    finished.set()
        try:
            await trio.to_thread.run_sync(partial(download.finish, node.store.params))
        except BlobMismatchError as exc:
            raise PullError(str(exc)) from None
        index = download.index
        assert index is not None  # finish() sets it
        path = cas.path(layer.digest)
        await trio.to_thread.run_sync(
            lambda: node.store.db.put_blob_index(index, path.stat().st_mtime_ns)
        )
    finally:
        # After finish or discard this does nothing; otherwise it saves progress.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(download.close)
    await emit(layer_event(layer.digest, layer.size, layer.size, 0))
    return counter.fetched, resumed


async def _download_part(
    client: httpx.AsyncClient,
    url: str,
    download: RangedDownload,
    part: Part,
    counter: _Counter,
) -> None:
    end = part.end
    for attempt in range(1, MAX_TRIES + 1):
        # A failed attempt keeps what it wrote: the next asks only for the rest.
        offset = download.parts()[part.index].next_offset
        try:
            await _request_range(client, url, download, part.index, offset, end, counter)
            return
        except (_PartFailed, httpx.TransportError) as exc:
            if attempt == MAX_TRIES:
                raise PullError(
                    f"blob {download.digest}: bytes {offset}-{end - 1} failed {MAX_TRIES} times "
                    f"from {url} ({exc}); the download is kept for a later pull"
                ) from None
            log.info("blob %s: part %d failed (%s); retrying", download.digest, part.index, exc)
            await trio.sleep(0.5 * 2**attempt)


async def _request_range(
    client: httpx.AsyncClient,
    url: str,
    download: RangedDownload,
    index: int,
    offset: int,
    end: int,
    counter: _Counter,
) -> None:
    """GET ``[offset, end)`` into part ``index``; _PartFailed if the body ends early."""
    headers = {"Range": f"bytes={offset}-{end - 1}"}
    async with client.stream("GET", url, headers=headers) as resp:
        _check_range(resp, url, offset, download.size)
        write: Callable[[int, int, bytes], None] = download.write
        async for piece in resp.aiter_bytes(PIECE):
            piece = piece[: end - offset]  # a server that ignored Range sends more
            await trio.to_thread.run_sync(write, index, offset, piece)
            offset += len(piece)
            counter.fetched += len(piece)
            counter.unflushed += len(piece)
            now = trio.current_time()
            if counter.unflushed >= FLUSH_BYTES or now - counter.flushed_at >= FLUSH_INTERVAL:
                counter.unflushed, counter.flushed_at = 0, now
                await trio.to_thread.run_sync(download.flush)
            if offset >= end:
                return
    raise _PartFailed(f"the response ended at byte {offset}, before {end}")


def _check_range(resp: httpx.Response, url: str, offset: int, size: int) -> None:
    if resp.status_code == 404:
        raise PullError(f"the registry has no blob at {url} (404)")
    if resp.status_code == 206:
        unit, _, spec = resp.headers.get("Content-Range", "").partition(" ")
        start, _, rest = spec.partition("-")
        total = rest.partition("/")[2]
        if unit != "bytes" or start != str(offset) or total not in ("*", str(size)):
            raise PullError(
                f"{url} answered Range bytes={offset}- with Content-Range "
                f"{resp.headers.get('Content-Range')!r} for a {size}-byte blob"
            )
        return
    if resp.status_code == 200 and offset == 0:
        return  # the whole blob from the start: as good for this part
    if resp.status_code == 200:
        raise PullError(f"{url} ignores Range requests, so a pull cannot resume there")
    if resp.status_code >= 500 or resp.status_code == 429:
        raise _PartFailed(f"status {resp.status_code}")
    raise PullError(f"{url} answered {resp.status_code}")
