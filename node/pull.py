"""Pulling a model from the swarm: versions, manifest, then each missing blob, manifest last.

Progress is reported as Ollama's ``/api/pull`` stream reports it (``pulling manifest``,
``pulling <12 hex>`` with ``digest``/``total``/``completed``, ``verifying sha256 digest``,
``writing manifest``, ``success``), plus ``peers`` — so ``ollama pull`` against the node
and ``dmm pull`` draw the same bars.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from node.catalog_service import CatalogError, open_catalog_client
from node.p2p import P2PError
from node.transfer import FetchResult, TransferError, fetch_blob
from protocols.records import VersionRecord
from storage.manifest import Layer, Manifest, ManifestError, parse_manifest
from storage.names import ModelName, parse_model_name

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("dmm.pull")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
# Errors that mean "this peer could not help", never "the pull is impossible".
PEER_ERRORS = (CatalogError, P2PError, trio.BrokenResourceError, trio.TooSlowError, OSError)


class PullError(RuntimeError):
    """The model could not be pulled; the message says why and what to try."""


async def _holders(node: Node, name: ModelName) -> list[str]:
    """Peers holding any version of ``name``: DHT providers and peers that gossiped it."""
    from node.daemon import model_key

    found: dict[str, None] = {}
    with trio.move_on_after(10):
        for info in await node.dht.find_providers(model_key(name)):
            found[info.peer_id] = None
    for (full, _), holders in node.gossip_holders().items():
        if full == name.full:
            found.update(dict.fromkeys(holders))
    found.pop(node.peer_id, None)
    return list(found)


async def _newest_record(
    node: Node, name: ModelName, holders: list[str]
) -> tuple[VersionRecord, list[str]]:
    """The newest version any holder knows, and the holders that have it."""
    records: dict[bytes, VersionRecord] = {r.version_id: r for r in node.book.records(name)}
    has: dict[bytes, set[str]] = {}

    async def ask(peer: str) -> None:
        try:
            async with open_catalog_client(node.host, peer, timeout=15) as client:
                for record in await client.get_versions(name.full):
                    records[record.version_id] = record
                    has.setdefault(record.version_id, set()).add(peer)
        except PEER_ERRORS as exc:
            log.info("pull %s: peer %s did not answer (%s)", name.display, peer, exc)

    async with trio.open_nursery() as nursery:
        for peer in holders:
            nursery.start_soon(ask, peer)
    candidates = [r for r in records.values() if has.get(r.version_id)]
    if not candidates:
        raise PullError(f"no reachable peer has {name.display}; try `dmm find '{name.model}*'`")
    await trio.to_thread.run_sync(node.book.accept_many, candidates)
    parents = {p for r in records.values() for p in r.parents}
    heads = [r for r in candidates if r.version_id not in parents] or candidates
    newest = max(heads, key=lambda r: (r.hlc, r.version_id))
    # Anyone holding the same manifest can serve its blobs, whichever version names it.
    serving = {
        peer
        for r in candidates
        if r.manifest_digest == newest.manifest_digest
        for peer in has[r.version_id]
    }
    return newest, sorted(serving)


async def _manifest(node: Node, digest: str, peers: list[str]) -> tuple[bytes, Manifest]:
    for peer in peers:
        try:
            async with open_catalog_client(node.host, peer, timeout=15) as client:
                _, raw = await client.get_manifest(digest)
            return raw, parse_manifest(raw)
        except (*PEER_ERRORS, ManifestError) as exc:
            log.info("manifest %s: peer %s failed (%s)", digest[:19], peer, exc)
    raise PullError(f"no peer sent manifest {digest}")


async def pull_model(
    node: Node,
    name_text: str,
    emit: Emit,
    *,
    pinned: bool = True,
    peers: Sequence[str] = (),
) -> dict[str, Any]:
    """Bring ``name_text`` into the local store; returns a summary of what moved.

    ``pinned=False`` marks a replica-only copy (replication may release it later); a copy
    that was pinned stays pinned. ``peers``, when given, are the holders to fetch from
    (no DHT lookups).
    """
    name = parse_model_name(name_text)
    await emit({"status": "pulling manifest"})
    # Named peers (a replication request's sender) hold the model: no DHT lookup needed.
    holders = list(peers) if peers else await _holders(node, name)
    local = await trio.to_thread.run_sync(node.store.layout.read, name)
    complete = local is not None and all(
        node.store.cas.location(d) == "file" for d in local.manifest.blob_digests()
    )
    try:
        record, serving = await _newest_record(node, name, holders)
    except PullError:
        if not complete:
            raise
        record, serving = None, []  # nobody to ask; what we hold is the newest we know
    if complete and (
        record is None or (local is not None and local.digest == record.manifest_digest)
    ):
        if pinned and local is not None:
            # A user pulling a replica-only copy makes it theirs: never released after.
            await trio.to_thread.run_sync(
                node.store.db.upsert_model, name.full, local.digest, local.manifest.total_size
            )
        await emit({"status": "success", "already_complete": True})
        return {"model": name.display, "already_complete": True, "bytes_fetched": 0}
    assert record is not None
    raw, manifest = await _manifest(node, record.manifest_digest, serving)
    fetched = local_bytes = 0
    peers_used: set[str] = set()
    for layer in manifest.all_layers():
        if node.store.cas.location(layer.digest) == "file":
            await emit(_layer_event(layer.digest, layer.size, layer.size, 0))
            continue
        result = await _fetch_layer(node, name, layer, serving, emit, discover=not peers)
        fetched += result.bytes_fetched
        local_bytes += result.bytes_local
        peers_used.update(result.peers_used)
    await emit({"status": "verifying sha256 digest"})
    await emit({"status": "writing manifest"})
    await trio.to_thread.run_sync(_write_manifest, node, name, raw, manifest, pinned)
    await node.refresh()
    await emit(
        {
            "status": "success",
            "bytes_fetched": fetched,
            "bytes_local": local_bytes,
            "peers": sorted(peers_used),
        }
    )
    log.info(
        "pulled %s (%s): %d bytes fetched from %d peer(s), %d copied locally",
        name.display,
        record.manifest_digest[:19],
        fetched,
        len(peers_used),
        local_bytes,
    )
    return {
        "model": name.display,
        "already_complete": False,
        "bytes_fetched": fetched,
        "bytes_local": local_bytes,
        "peers": sorted(peers_used),
    }


async def _fetch_layer(
    node: Node, name: ModelName, layer: Layer, serving: list[str], emit: Emit, *, discover: bool
) -> FetchResult:
    """One blob from the swarm, reporting progress four times a second."""
    sources = await _blob_sources(node, layer.digest, serving) if discover else serving
    size, chunks = await _chunk_list(node, layer.digest, sources)
    if size != layer.size:
        raise PullError(
            f"peers describe blob {layer.digest} as {size} bytes, the manifest says {layer.size}"
        )
    done = 0
    finished = trio.Event()

    def on_progress(n: int) -> None:
        nonlocal done
        done += n

    async def report() -> None:
        while not finished.is_set():
            await emit(_layer_event(layer.digest, size, min(done, size), len(sources)))
            with trio.move_on_after(0.25):
                await finished.wait()

    failure: TransferError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        try:
            result = await fetch_blob(
                node.host,
                node.store,
                node.scores,
                model=name.full,
                digest=layer.digest,
                size=size,
                chunks=chunks,
                providers=sources,
                on_progress=on_progress,
            )
        except TransferError as exc:
            # Raised after the nursery: from inside it, trio would wrap the PullError in an
            # ExceptionGroup that no caller's `except PullError` catches.
            failure = exc
        finally:
            finished.set()
    if failure is not None:
        raise PullError(str(failure)) from None
    await emit(_layer_event(layer.digest, size, size, len(sources)))
    return result


def _layer_event(digest: str, total: int, completed: int, peers: int) -> dict[str, Any]:
    return {
        "status": f"pulling {digest[7:19]}",
        "digest": digest,
        "total": total,
        "completed": completed,
        "peers": peers,
    }


async def _blob_sources(node: Node, digest: str, serving: list[str]) -> list[str]:
    from node.daemon import blob_key

    sources = dict.fromkeys(serving)
    with trio.move_on_after(10):
        for info in await node.dht.find_providers(blob_key(digest)):
            if info.peer_id != node.peer_id:
                sources[info.peer_id] = None
    return list(sources)


async def _chunk_list(node: Node, digest: str, peers: list[str]) -> tuple[int, list[Any]]:
    for peer in peers:
        try:
            async with open_catalog_client(node.host, peer, timeout=30) as client:
                return await client.get_chunks(digest)
        except PEER_ERRORS as exc:
            log.info("blob %s: peer %s sent no chunk list (%s)", digest[:19], peer, exc)
    raise PullError(f"no peer sent the chunk list of blob {digest}")


def _write_manifest(
    node: Node, name: ModelName, raw: bytes, manifest: Manifest, pinned: bool
) -> None:
    """Last step: the manifest appears only once every blob it names is in place."""
    with node.store.cas.commit_lock():
        missing = [d for d in manifest.blob_digests() if node.store.cas.location(d) != "file"]
        if missing:
            raise PullError(f"blob {missing[0]} vanished before the manifest was written")
        node.store.layout.write_raw(name, raw)
    node.store.db.upsert_model(
        name.full, "sha256:" + hashlib.sha256(raw).hexdigest(), manifest.total_size, pinned
    )
