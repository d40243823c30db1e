"""Pulling a model from the swarm: versions, manifest, then each missing blob, manifest last.

When no reachable peer has the model, ``node/upstream.py`` pulls it from the upstream OCI
registry instead (``[api] upstream_registry``).

Progress is reported as Ollama's ``/api/pull`` stream reports it (``pulling manifest``,
``pulling <12 hex>`` with ``digest``/``total``/``completed``, ``verifying sha256 digest``,
``writing manifest``, ``success``), plus ``peers`` — so ``ollama pull`` against the node
and ``dmm pull`` draw the same bars.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import trio

from node.blob_fetches import SharedFetch
from node.catalog_service import CatalogError, open_catalog_client
from node.exc_groups import first_leaf, only
from node.p2p import P2PError
from node.transfer import FetchResult, TransferError, fetch_blob
from protocols.dag import VersionDag
from protocols.records import VersionRecord
from storage.fsutil import StoreFullError
from storage.manifest import Layer, Manifest, ManifestError, parse_manifest
from storage.names import ModelName, parse_model_name

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("dmm.pull")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
# Errors that mean "this peer could not help", never "the pull is impossible".
PEER_ERRORS = (CatalogError, P2PError, trio.BrokenResourceError, trio.TooSlowError, OSError)


# Looking up or announcing more providers during a fetch: a bounded extra, never a wait.
DHT_STEP_TIMEOUT = 5.0
# Connected peers asked directly when neither the DHT nor gossip names a holder.
MAX_NEIGHBOURS_ASKED = 32


class PullError(RuntimeError):
    """The model could not be pulled; the message says why and what to try."""


class PullDiskFull(PullError):
    """The store's disk is full. What was fetched stays (the partial blob, hidden), so the
    pull resumes from there once space is freed; no manifest was written."""


@contextlib.contextmanager
def plain_pull_errors() -> Iterator[None]:
    """Re-raise a nursery's group of nothing but PullErrors as its first PullError.

    Trio wraps whatever leaves a nursery in an ExceptionGroup; callers of a pull catch
    PullError, so a failure inside a nursery must reach them as one.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        # Siblings' Cancelled (an outer scope is being cancelled) do not hide the error.
        matched = group.split(PullError)[0]
        if matched is None or not only(group, (PullError,)):
            raise
        raise first_leaf(matched) from None


async def find_holders(node: Node, name: ModelName) -> list[str]:
    """Peers holding any version of ``name``: DHT providers and peers that gossiped it;
    failing both, the peers we are connected to (each is asked, as a LAN neighbour would
    be: a DHT walk can run out of time on a busy swarm, and gossip only tells of models
    announced after we joined)."""
    found = await node.holders_of(name)
    if found:
        return found
    neighbours = [p for p in node.host.connected_peers() if p != node.peer_id]
    if neighbours:
        log.info(
            "pull %s: no provider found in the DHT or gossip; asking %d connected peer(s)",
            name.display,
            min(len(neighbours), MAX_NEIGHBOURS_ASKED),
        )
    return neighbours[:MAX_NEIGHBOURS_ASKED]


async def newest_record(
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
    # A record whose author may not publish this model ([[access]]) is not a candidate.
    candidates = [r for r in records.values() if has.get(r.version_id) and node.acl.may_publish(r)]
    if not candidates:
        raise PullError(f"no reachable peer has {name.display}; try `dmm find '{name.model}*'`")
    await trio.to_thread.run_sync(node.book.accept_many, candidates)
    parents = {p for r in records.values() for p in r.parents}
    heads = [r for r in candidates if r.version_id not in parents] or candidates
    # A merge ranks as the version it chose (protocols/dag.py), as the sync's `newest` does.
    dag = VersionDag(records.values())
    newest = max(heads, key=lambda r: (dag.rank(r), r.version_id))
    # Anyone holding the same manifest can serve its blobs, whichever version names it.
    serving = {
        peer
        for r in candidates
        if r.manifest_digest == newest.manifest_digest
        for peer in has[r.version_id]
    }
    return newest, sorted(serving)


async def fetch_manifest(node: Node, digest: str, peers: list[str]) -> tuple[bytes, Manifest]:
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
    holders = list(peers) if peers else await find_holders(node, name)
    local = await trio.to_thread.run_sync(node.store.layout.read, name)
    complete = local is not None and all(
        node.store.cas.location(d) == "file" for d in local.manifest.blob_digests()
    )
    try:
        record, serving = await newest_record(node, name, holders)
    except PullError as exc:
        if not complete and not peers:
            # No peer has it: the upstream registry is the last resort (it raises
            # this same error when no upstream is configured).
            from node.upstream import pull_upstream

            return await pull_upstream(node, name, emit, no_peer=str(exc))
        if not complete:
            raise  # the named peers (a replication request) could not serve it
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
        version = None if record is None else record.version_id.hex()
        return {
            "model": name.display,
            "version": version,
            "already_complete": True,
            "bytes_fetched": 0,
        }
    assert record is not None
    raw, manifest = await fetch_manifest(node, record.manifest_digest, serving)
    try:
        return await _pull_layers(
            node, name, record, raw, manifest, serving, emit, pinned=pinned, lookup=not peers
        )
    except* StoreFullError as group:
        # Raised in a worker thread, maybe alongside the cancellation of other fetches:
        # one line that says what to do, not a traceback and not "run it again".
        full = _first_leaf(group)
        raise PullDiskFull(
            f"{full.strerror or full}; free space under {node.store.models_dir} and pull "
            "again to resume"
        ) from None


async def _pull_layers(
    node: Node,
    name: ModelName,
    record: VersionRecord,
    raw: bytes,
    manifest: Manifest,
    serving: list[str],
    emit: Emit,
    *,
    pinned: bool,
    lookup: bool,
) -> dict[str, Any]:
    """Every missing blob, then the manifest last. ``lookup=False``: only ``serving``
    is asked, never the DHT. Layers are fetched side by side, as Ollama does: the small
    ones (config, template, params) do not wait behind the weights."""
    fetched = local_bytes = 0
    peers_used: set[str] = set()

    async def one(layer: Layer) -> None:
        nonlocal fetched, local_bytes
        if node.store.cas.location(layer.digest) == "file":
            await emit(layer_event(layer.digest, layer.size, layer.size, 0))
            return
        result = await fetch_layer(node, name, layer, serving, emit, lookup=lookup)
        fetched += result.bytes_fetched
        local_bytes += result.bytes_local
        peers_used.update(result.peers_used)

    with plain_pull_errors():
        async with trio.open_nursery() as nursery:
            for layer in dict((layer.digest, layer) for layer in manifest.all_layers()).values():
                nursery.start_soon(one, layer)
    await emit({"status": "verifying sha256 digest"})
    await emit({"status": "writing manifest"})
    await trio.to_thread.run_sync(write_manifest, node, name, raw, manifest, pinned)
    # Announcing and providing it (DHT walks) goes on after the pull reports success.
    node.refresh_soon()
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
        "version": record.version_id.hex(),
        "already_complete": False,
        "bytes_fetched": fetched,
        "bytes_local": local_bytes,
        "peers": sorted(peers_used),
    }


async def fetch_layer(
    node: Node,
    name: ModelName,
    layer: Layer,
    serving: list[str],
    emit: Emit,
    *,
    reuse_local: bool = True,
    lookup: bool = True,
) -> FetchResult:
    """One blob from the swarm, reporting progress four times a second.

    A blob this node is already fetching for another pull is not fetched twice: this
    call follows that fetch (its result moved no bytes of its own) and takes over if the
    other pull is cancelled.
    """
    while (shared := node.blob_fetches.get(layer.digest)) is not None:
        result = await _follow(shared, layer, emit)
        if result is not None:
            return result
    with node.blob_fetches.lead(layer.digest) as shared:
        try:
            result = await _fetch_layer(
                node, name, layer, serving, emit, shared, reuse_local=reuse_local, lookup=lookup
            )
        except PullError as exc:
            shared.error = str(exc)
            raise
        shared.path = result.path
        return result


async def _follow(shared: SharedFetch, layer: Layer, emit: Emit) -> FetchResult | None:
    """Wait for another pull's fetch of ``layer``; None if it was cancelled meanwhile."""
    log.info("blob %s: another pull is fetching it; waiting for that", layer.digest[:19])
    while not shared.finished.is_set():
        await emit(layer_event(layer.digest, layer.size, min(shared.done_bytes, layer.size), 0))
        with trio.move_on_after(0.25):
            await shared.finished.wait()
    if shared.error is not None:
        raise PullError(shared.error)
    if shared.path is None:
        return None
    await emit(layer_event(layer.digest, layer.size, layer.size, 0))
    return FetchResult(shared.path, 0, 0, {}, ())


async def _fetch_layer(
    node: Node,
    name: ModelName,
    layer: Layer,
    serving: list[str],
    emit: Emit,
    shared: SharedFetch,
    *,
    reuse_local: bool,
    lookup: bool,
) -> FetchResult:
    # The holders already found serve from the start; the DHT's other providers (other
    # pullers among them) join through `discover` while the fetch runs.
    sources = serving or (await _blob_sources(node, layer.digest) if lookup else [])
    size, chunks = await _chunk_list(node, layer.digest, sources)
    if size != layer.size:
        raise PullError(
            f"peers describe blob {layer.digest} as {size} bytes, the manifest says {layer.size}"
        )
    # A blob of one chunk (a config) has nothing to trade before it is whole: the DHT
    # walks that join a swarm would cost more than fetching it.
    swarm = lookup and len({c.digest for c in chunks}) > 1
    done = 0
    finished = trio.Event()

    def on_progress(n: int) -> None:
        nonlocal done
        done += n
        shared.progress(n)

    async def report() -> None:
        while not finished.is_set():
            await emit(layer_event(layer.digest, size, min(done, size), len(sources)))
            with trio.move_on_after(0.25):
                await finished.wait()

    from node.daemon import blob_key

    key = blob_key(layer.digest)

    async def discover() -> list[str]:
        return [
            info.peer_id for info in await node.dht.find_providers(key, timeout=DHT_STEP_TIMEOUT)
        ]

    async def provide() -> None:
        # Others fetching this blob find us, and the chunks we hold so far, this way.
        with trio.move_on_after(DHT_STEP_TIMEOUT):
            try:
                await node.dht.provide(key)
            except Exception as exc:  # an extra: the fetch works without it
                log.info("blob %s: not provided while fetching (%s)", layer.digest[:19], exc)

    with plain_pull_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            if swarm:
                nursery.start_soon(provide)
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
                    live=node.live_chunks,
                    discover=discover if swarm else None,
                    reuse_local=reuse_local,
                )
            except TransferError as exc:
                raise PullError(str(exc)) from None
            finally:
                finished.set()
    await emit(layer_event(layer.digest, size, size, len(sources)))
    return result


def _first_leaf(group: BaseExceptionGroup[StoreFullError]) -> StoreFullError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, StoreFullError)
    return exc


def layer_event(digest: str, total: int, completed: int, peers: int) -> dict[str, Any]:
    return {
        "status": f"pulling {digest[7:19]}",
        "digest": digest,
        "total": total,
        "completed": completed,
        "peers": peers,
    }


async def _blob_sources(node: Node, digest: str) -> list[str]:
    from node.daemon import blob_key

    sources: dict[str, None] = {}
    for info in await node.dht.find_providers(blob_key(digest), timeout=10):
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


def write_manifest(
    node: Node, name: ModelName, raw: bytes, manifest: Manifest, pinned: bool = True
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


async def _no_progress(event: dict[str, Any]) -> None:
    pass


async def fetch_version_data(
    node: Node,
    name: ModelName,
    manifest_digest: str,
    peers: list[str],
    *,
    reuse_local: bool = True,
    emit: Emit = _no_progress,
) -> tuple[bytes, Manifest, int]:
    """Manifest ``manifest_digest`` and every blob it names, in the local store.

    No name is written: the caller decides which tag gets the manifest (``write_model``).
    Taken from the store when it already holds them all; otherwise the manifest comes from
    the first of ``peers`` that has it and each missing blob from them and the blob's DHT
    providers. Returns ``(raw manifest, manifest, bytes fetched)``; raises ``PullError``.
    """
    from node.catalog_service import StoreCatalogSource

    source = StoreCatalogSource(node.store, node.book)
    held = await trio.to_thread.run_sync(source.manifest, manifest_digest)
    if held is not None:
        raw = held[1]
        manifest = parse_manifest(raw)
    else:
        raw, manifest = await fetch_manifest(node, manifest_digest, peers)
    fetched = 0
    for layer in manifest.all_layers():
        if node.store.cas.location(layer.digest) == "file":
            continue
        result = await fetch_layer(node, name, layer, peers, emit, reuse_local=reuse_local)
        fetched += result.bytes_fetched
    return raw, manifest, fetched


def write_model(node: Node, name: ModelName, raw: bytes, manifest: Manifest) -> None:
    """Point ``name`` at a manifest whose blobs are all in place (blocking; run in a thread)."""
    write_manifest(node, name, raw, manifest)
