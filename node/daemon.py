"""The running node: libp2p host, DHT, gossip, catalog, HTTP API, over the local store.

``open_node(config)`` yields a running ``Node``; leaving the block shuts everything down.
The node provides every model in its store when it starts, publishes signed version
records (DHT values and gossip), dials its bootstrap peers whenever it is short of
connections (node/bootstrap.py), and answers ``find`` by asking the providers of the
glob's index key for their matching models.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from node.acl import Acl, StoreAccess
from node.activity import Activity
from node.announce import Announcer
from node.api import build_router
from node.audit import AuditLog
from node.blob_fetches import BlobFetches
from node.bootstrap import Bootstrapper
from node.catalog_service import (
    CATALOG_PROTOCOL,
    CatalogServer,
    StoreCatalogSource,
    open_catalog_client,
)
from node.config import Config
from node.dht import Dht
from node.hooks import HookFn, Hooks
from node.http import serve_http
from node.identity import Identity, load_or_create_identity
from node.limits import Limits
from node.live_chunks import LiveChunks
from node.local import open_store
from node.mdns import MdnsDiscovery
from node.metrics import PerformanceMonitor
from node.p2p import P2PHost, open_host
from node.peerscore import PeerScores
from node.provider import BLOCKS_PROTOCOL, BlockProvider
from node.pull import Emit, PullError, pull_model
from node.replication import ReplicationManager
from node.seeding import SuperSeeder
from node.sync import SyncManager
from node.versions import VersionBook
from protocols.catalog import display_name, glob_matches, index_key_for_glob, index_keys_for_name
from protocols.records import VERSION_KEY_PREFIX, Announcement, VersionRecord
from storage.manifest import Manifest
from storage.names import ModelName, parse_model_name
from storage.store import ModelStore

log = logging.getLogger("dmm.node")

# A node just started looks up holders only once it has joined through its bootstrap
# peers, waiting at most this long (a lookup before then asks no one).
JOIN_WAIT = 10.0
# A find lists every holder of a match, and each provides the glob's index key: the
# lookup must not stop at the 20 providers an exact-name lookup needs.
FIND_MAX_PROVIDERS = 1000


def model_key(name: ModelName) -> str:
    return f"/dmm/model/{display_name(name.full)}"


def blob_key(digest: str) -> str:
    return f"/dmm/blob/{digest}"


@dataclass(slots=True)
class Holder:
    """What this node knows of one peer holding one version of one model."""

    peer_id: str
    addrs: tuple[str, ...] = ()
    seen_at: float = 0.0


@dataclass(slots=True)
class FindEntry:
    name: str  # display name:tag
    full: str
    version: str
    manifest_digest: str
    size: int
    hlc: int
    holders: set[str] = field(default_factory=set)
    reachable: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.full,
            "version": self.version,
            "digest": self.manifest_digest,
            "size": self.size,
            "hlc": self.hlc,
            "peers": sorted(self.holders),
            "reachable": sorted(self.reachable),
            "availability": f"{len(self.reachable)}/{len(self.holders)}",
        }


class Node:
    def __init__(
        self,
        config: Config,
        identity: Identity,
        store: ModelStore,
        host: P2PHost,
        *,
        audit: AuditLog | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.host = host
        # Connections, manifests, announcements and replication health notify this;
        # `wait_until` waits on it (node/changes.py).
        self.changes = host.changes
        store.layout.on_change = self.changes.notify
        # Security (README "Security"): `audit.record(...)` for anything worth an audit
        # line; `acl.allowed(peer, role, model)` for access decisions; `limits.guard` for
        # every inbound dmm protocol handler.
        self.audit = audit if audit is not None else AuditLog(None)
        self.limits = limits if limits is not None else Limits(config.limits, audit=self.audit)
        self.limits.on_change = self.changes.notify
        self.acl = Acl(config.access.rules, self_peer=host.peer_id)
        self.access = None if self.acl.open else StoreAccess(self.acl, store, self.audit)
        host.meter = self.limits
        self.book = VersionBook(store.db, identity, self.acl)
        self.book.on_change = self.changes.notify
        self.dht = Dht(host, acl=self.acl, on_rejected=self._dht_record_rejected)
        self.bootstrap = Bootstrapper(
            host,
            self.dht,
            config.network.bootstrap,
            self._on_bootstrap_peer,
            shunned=lambda peer: self.scores.is_banned(peer),
        )
        self.announcer = Announcer(
            host, self._on_announcement, acl=self.acl, on_rejected=self._gossip_record_rejected
        )
        self.catalog = CatalogServer(
            StoreCatalogSource(store, self.book), limits=self.limits, access=self.access
        )
        self.scores = PeerScores()
        self.live_chunks = LiveChunks()
        self.blob_fetches = BlobFetches()
        self.provider = BlockProvider(
            store,
            self.scores,
            upload_slots=config.storage.upload_slots,
            rate_limit=config.storage.upload_rate_limit,
            live=self.live_chunks,
            max_wantlist=config.limits.max_wantlist,
            limits=self.limits,
            access=self.access,
            seeder=SuperSeeder(host.is_connected),
        )
        self.metrics = PerformanceMonitor(self, interval=config.metrics.interval)
        self.activity = Activity()
        self._nursery: trio.Nursery | None = None
        self.started_at = trio.current_time()
        self.api_urls: list[str] = []
        self.shutdown = trio.Event()
        # What gossip told us: (model:tag full name, version id hex) -> holders.
        self._gossip: dict[tuple[str, str], dict[str, Holder]] = {}
        self._gossip_records: dict[str, VersionRecord] = {}
        self._published: dict[str, str] = {}  # full name:tag -> manifest digest provided
        self._publish_lock = trio.Lock()
        self._refresh_scheduled = False
        # Pre-hooks may refuse pull, push, delete; sync and replication fire their own events.
        self.hooks = Hooks(config.hooks.commands, timeout=config.hooks.timeout)
        self.hooks.setup_default_hooks()
        self.sync = SyncManager(self)
        self.replication = ReplicationManager(self)

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.dht.run)
            await nursery.start(self.announcer.run)
            await nursery.start(self.sync.run)
            guard = self.limits.guard
            self.host.set_stream_handler(
                CATALOG_PROTOCOL, guard(CATALOG_PROTOCOL, self.catalog.handle)
            )
            self.host.set_stream_handler(
                BLOCKS_PROTOCOL, guard(BLOCKS_PROTOCOL, self.provider.handle)
            )
            self._nursery = nursery
            api = self.config.api
            router = build_router(self)
            router.require_token(api.token, self._api_refused)
            self.api_urls = await nursery.start(
                functools.partial(serve_http, router, api.host, api.port, shutdown=self.shutdown)
            )
            nursery.start_soon(self.bootstrap.run)
            if self.config.network.mdns:
                await nursery.start(MdnsDiscovery(self.host, self._on_lan_peer).run)
            nursery.start_soon(self._publish_store_at_start)
            await nursery.start(self.replication.run)
            if self.config.metrics.enabled:
                await nursery.start(self.metrics.run)
            log.info(
                "node %s up: p2p %s, api %s",
                self.peer_id,
                " ".join(self.host.listen_addrs),
                " ".join(self.api_urls),
            )
            task_status.started()
            await self.shutdown.wait()
            nursery.cancel_scope.cancel()

    def _on_bootstrap_peer(self, peer: str) -> None:
        self.activity.event("peer", "connected (bootstrap)", peer=peer)

    async def _on_lan_peer(self, peer_id: str, addrs: list[str]) -> None:
        await self.dht.add_peer(peer_id)
        await self.dht.refresh()
        log.info("found LAN peer %s by mDNS", peer_id)
        self.activity.event("peer", "found on the LAN by mDNS", peer=peer_id)

    # --- publishing ---------------------------------------------------------------------

    async def _publish_store_at_start(self) -> None:
        result = await self.refresh()
        log.info("providing %d model(s) from the store", result["published"])

    def refresh_soon(self) -> None:
        """``refresh`` in the background: a pull that is done need not wait for the DHT.

        Calls that come while one is scheduled but not started share it; one that comes
        while a refresh runs schedules another, so no change is missed.
        """
        if self._nursery is None or self._refresh_scheduled:
            return
        self._refresh_scheduled = True
        self._nursery.start_soon(self._refresh_in_background)

    async def _refresh_in_background(self) -> None:
        self._refresh_scheduled = False
        try:
            await self.refresh()
        except Exception as exc:  # publishing retries at the next refresh or re-provide
            log.warning("publishing the store's changes failed: %s", exc)

    async def refresh(self) -> dict[str, Any]:
        """Re-read the store; publish new or changed models, stop providing removed ones.

        New versions are announced over gossip as soon as they are signed, then provided
        and put in the DHT: at 200 nodes those walks took minutes, and the announcement
        waited for them.
        """
        async with self._publish_lock:
            entries = await trio.to_thread.run_sync(self.store.list_models)
            current = {e.name.full: e for e in entries}
            changed = [e for e in entries if self._published.get(e.name.full) != e.digest]
            records: list[VersionRecord] = []
            for entry in changed:
                records.append(
                    await self._sign(entry.name, entry.digest, entry.manifest, held=True)
                )
            if records:
                self.announcer.announce_nowait(records, self.host.listen_addrs)
                for record in records:
                    self.activity.event("published", "version record signed", model=record.name)
            async with trio.open_nursery() as nursery:
                for entry, record in zip(changed, records, strict=True):
                    nursery.start_soon(self._spread, entry.name, entry.manifest, record)
            removed = [name for name in self._published if name not in current]
            for name in removed:
                self.audit.record("delete", model=name, version=self._published[name])
                del self._published[name]
                model = parse_model_name(name)
                if not any(
                    e.name.model == model.model and e.name.namespace == model.namespace
                    for e in entries
                ):
                    self.dht.unprovide(model_key(model))
            return {"published": len(changed), "removed": len(removed), "models": len(entries)}

    async def _sign(
        self, name: ModelName, digest: str, manifest: Manifest, *, held: bool = False
    ) -> VersionRecord:
        """Record one model version as published; the caller announces and spreads it.

        ``held``: what the store holds is taken as the known version naming its manifest,
        if there is one (``VersionBook.record_held``), rather than made the newest.
        """
        sign = self.book.record_held if held else self.book.record_local
        record = await trio.to_thread.run_sync(sign, name, digest, manifest.total_size)
        self._published[name.full] = digest
        return record

    async def _spread(self, name: ModelName, manifest: Manifest, record: VersionRecord) -> None:
        """Provide the version's keys and put its record in the DHT, all at once (each
        ``provide`` is paced, and is kept for re-providing even if no peer answers)."""
        keys = [
            model_key(name),
            *index_keys_for_name(name.full),
            *(blob_key(d) for d in manifest.blob_digests()),
        ]
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(self.dht.provide, key)
            nursery.start_soon(self._put_version, name, record)

    async def _put_version(self, name: ModelName, record: VersionRecord) -> None:
        try:
            await self.dht.put_version(record)
        except Exception as exc:  # a DHT with no peers yet fails puts
            log.info("model %s: version record not stored in the DHT yet (%s)", name.display, exc)

    # --- gossip -------------------------------------------------------------------------

    async def _on_announcement(self, peer_id: str, announcement: Announcement) -> None:
        now = time.time()
        for record in announcement.records:
            try:
                await trio.to_thread.run_sync(self.book.accept, record)
            except Exception as exc:  # e.g. a clock too far ahead
                log.info("model %s from %s: record refused: %s", record.name, peer_id, exc)
                continue
            vid = record.version_id.hex()
            self._gossip_records[vid] = record
            holders = self._gossip.setdefault((record.name, vid), {})
            holders[peer_id] = Holder(peer_id, tuple(announcement.listen_addrs), now)
            log.info("model %s version %s announced by %s", record.name, vid[:12], peer_id)
            self.activity.event("announced", f"version {vid[:12]}", model=record.name, peer=peer_id)
            # A followed model syncs with the announcer at once (node/sync.py).
            self.sync.on_announced(peer_id, record)
        self.changes.notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, re-checked at each change of the node's
        connections, manifests, gossip tables or replica health (no polling)."""
        await self.changes.wait_until(predicate)

    def add_model_hook(self, event: str, fn: HookFn) -> None:
        """Run ``fn(HookEvent)`` on ``event`` (see node/hooks.py); sync or async."""
        self.hooks.add(event, fn)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in the node's nursery: work that must outlive the request
        that started it (a blob fetch several HTTP requests wait on)."""
        if self._nursery is None:
            raise RuntimeError("the node is not running")
        self._nursery.start_soon(fn, *args)

    async def pull(self, name: str, emit: Emit) -> dict[str, Any]:
        """Pull through the hooks: a failing pre-pull hook raises HookError, nothing moves."""
        model = parse_model_name(name)
        await self.hooks.fire("pre-pull", model.display)
        tid, tracked = self.activity.track(name, emit)
        try:
            result = await pull_model(self, name, tracked)
        except Exception as exc:  # whatever ended it, the audit says so; the caller handles it
            self.audit.record("pull", model=name, outcome="failed", reason=str(exc) or repr(exc))
            if isinstance(exc, PullError):
                self.metrics.pull_done("failed")
                self.activity.event("pull-failed", str(exc), model=name)
                await self.hooks.fire("post-pull", model.display, status="error", error=str(exc))
            raise
        finally:
            self.activity.finish(tid)
        self.audit.record(
            "pull",
            peer=",".join(result.get("peers", [])) or None,
            model=result["model"],
            version=result.get("version"),
            reason="already complete" if result["already_complete"] else None,
        )
        if result.get("already_complete"):
            self.metrics.pull_done("already-complete")
        else:
            fetched = result.get("bytes_fetched", 0)
            self.metrics.pull_done("ok", fetched=fetched, local=result.get("bytes_local", 0))
            peers = len(result.get("peers", ()))
            self.activity.event(
                "pulled", f"{fetched:,} bytes fetched from {peers} peer(s)", model=name
            )
        stored = await trio.to_thread.run_sync(self.store.layout.read, model)
        await self.hooks.fire(
            "post-pull",
            model.display,
            status="success",
            digest=stored.digest if stored else "",
            bytes_fetched=result["bytes_fetched"],
            already_complete=result["already_complete"],
        )
        return result

    async def push(self, name: str) -> dict[str, Any]:
        """Publish a local model to the swarm now: a signed version record, DHT provide,
        gossip. Raises ModelNotFound, or HookError when a pre-push hook refuses."""
        stored = await trio.to_thread.run_sync(self.store.get, name)
        display = stored.name.display
        await self.hooks.fire("pre-push", display, digest=stored.digest)
        async with self._publish_lock:
            record = await self._sign(stored.name, stored.digest, stored.manifest)
            self.announcer.announce_nowait([record], self.host.listen_addrs)
            await self._spread(stored.name, stored.manifest, record)
        self.audit.record("push", model=display, version=record.version_id.hex())
        log.info("model %s pushed: version %s", display, record.version_id.hex()[:12])
        await self.hooks.fire(
            "post-push", display, digest=stored.digest, version=record.version_id.hex()
        )
        return {"model": display, "digest": stored.digest, "version": record.version_id.hex()}

    async def delete(self, name: str) -> str:
        """Delete a model's manifest (blobs stay until gc) and withdraw it; its digest."""
        stored = await trio.to_thread.run_sync(self.store.get, name)
        display = stored.name.display
        await self.hooks.fire("pre-delete", display, digest=stored.digest)
        await trio.to_thread.run_sync(self.store.remove, name)
        await self.refresh()
        log.info("model %s deleted", display)
        await self.hooks.fire("post-delete", display, digest=stored.digest)
        return stored.digest

    # --- security callbacks -------------------------------------------------------------

    def _dht_record_rejected(self, key: str, record: VersionRecord | None, reason: str) -> None:
        # The validator does not know which peer sent the value: the author stands in.
        log.info("DHT value for %s refused: %s", key[:100], reason)
        self.audit.record(
            "record",
            peer=None if record is None else record.author,
            model=key.removeprefix(VERSION_KEY_PREFIX)[:255] if record is None else record.name,
            version=None if record is None else record.version_id.hex(),
            outcome="refused",
            reason=f"dht: {reason}",
        )

    def _gossip_record_rejected(
        self, origin: str, record: VersionRecord | None, reason: str
    ) -> None:
        self.audit.record(
            "record",
            peer=origin,
            model=None if record is None else record.name,
            version=None if record is None else record.version_id.hex(),
            outcome="refused",
            reason=f"gossip: {reason}",
        )
        self.changes.notify()

    def _api_refused(self, client: str, method: str, path: str) -> None:
        log.info("API request %s %s from %s refused: no valid token", method, path, client)
        self.audit.record(
            "api", peer=client, outcome="refused", reason=f"{method} {path}: no valid token"
        )

    def published(self) -> dict[str, str]:
        """Models this node provides: full name:tag -> manifest digest (a copy)."""
        return dict(self._published)

    def gossip_holders(self) -> dict[tuple[str, str], set[str]]:
        """(model:tag full name, version id hex) -> peers that announced it."""
        return {key: set(holders) for key, holders in self._gossip.items()}

    async def holders_of(self, name: ModelName) -> list[str]:
        """Other peers holding any version of ``name``: DHT providers (what a 10 s lookup
        found, once the node has joined the network) and peers that gossiped it."""
        found: dict[str, None] = {}
        await self.bootstrap.wait_joined(JOIN_WAIT)
        for info in await self.dht.find_providers(model_key(name), timeout=10):
            found[info.peer_id] = None
        for (full, _), peers in self._gossip.items():
            if full == name.full:
                found.update(dict.fromkeys(peers))
        found.pop(self.peer_id, None)
        return list(found)

    # --- queries ------------------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        return [{"peer_id": p, "connected": True} for p in sorted(self.host.connected_peers())]

    def refused_peers(self) -> list[dict[str, Any]]:
        """Peers whose connections or streams were refused: count, first, last, reason."""
        return self.limits.refusals()

    async def status(self) -> dict[str, Any]:
        models = await trio.to_thread.run_sync(self.store.list_models)
        return {
            "peer_id": self.peer_id,
            "name": self.config.node.name,
            "listen": self.host.listen_addrs,
            "api": self.api_urls,
            "peers": len(self.host.connected_peers()),
            "dht_routing_table": self.dht.routing_table_size(),
            "dht_provides_in_flight": self.dht.provides_in_flight,
            "models": len(models),
            "published": len(self._published),
            "uptime": round(trio.current_time() - self.started_at, 3),
            "gossip": {
                "published": self.announcer.stats.published,
                "received": self.announcer.stats.received,
                "dropped_bad": self.announcer.stats.dropped_bad,
            },
            "hooks": self.hooks.status(),
            "metrics": self.metrics.summary(),
            **self.activity.snapshot(),
        }

    async def find(self, glob: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Models matching ``glob`` anywhere: DHT providers of the index key, asked directly.

        Each provider is asked the moment the DHT walk finds it, while the walk goes on,
        so the first answers do not wait for the slowest step of the lookup. Peers that
        gossiped a matching version count as holders too and are asked as well; a holder
        that does not answer in time stays listed but not reachable, and every peer asked
        that did not answer is in ``providers_silent``.
        """
        started = time.monotonic()
        entries: dict[tuple[str, str], FindEntry] = {}
        asked: set[str] = set()
        answered: set[str] = set()
        source = StoreCatalogSource(self.store, self.book)

        async def ask(peer: str) -> None:
            try:
                if peer == self.peer_id:
                    summaries, _ = await trio.to_thread.run_sync(source.list_models, glob, 1000)
                else:
                    async with open_catalog_client(self.host, peer) as client:
                        summaries = list((await client.list_models(glob, limit=1000)).models)
            except Exception as exc:  # one unreachable peer must not fail find
                log.info("find %r: peer %s did not answer (%s)", glob, peer, exc)
                return
            answered.add(peer)
            for s in summaries:
                entry = _entry(
                    entries, s.name, s.tag, s.version_id.hex(), s.manifest_digest, s.size, s.hlc
                )
                entry.holders.add(peer)
                entry.reachable.add(peer)

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:

                def ask_once(peer: str) -> None:
                    if peer not in asked:
                        asked.add(peer)
                        nursery.start_soon(ask, peer)

                ask_once(self.peer_id)
                for (_, vid), holders in self._gossip.items():
                    record = self._gossip_records[vid]
                    if glob_matches(glob, f"{display_name(record.model)}:{record.tag}"):
                        entry = _entry(
                            entries,
                            record.model,
                            record.tag,
                            vid,
                            record.manifest_digest,
                            record.size,
                            record.hlc,
                        )
                        entry.holders.update(holders)
                        for holder in holders:
                            ask_once(holder)
                # Every holder of a match provides the index key, so the walk may not stop
                # at the first few; it stops at half the time so the last found are asked.
                await self.dht.find_providers(
                    index_key_for_glob(glob),
                    FIND_MAX_PROVIDERS,
                    timeout=timeout / 2,
                    on_found=lambda info: ask_once(info.peer_id),
                )
        results = sorted(entries.values(), key=lambda e: (e.name, -e.hlc))
        return {
            "glob": glob,
            "models": [e.to_json() for e in results],
            "providers_asked": len(asked),
            # Their models, if any match, are missing from the list: say so.
            "providers_silent": sorted(asked - answered),
            "seconds": round(time.monotonic() - started, 3),
        }


def _entry(
    entries: dict[tuple[str, str], FindEntry],
    model: str,
    tag: str,
    version: str,
    manifest_digest: str,
    size: int,
    hlc: int,
) -> FindEntry:
    key = (f"{model}:{tag}", version)
    if key not in entries:
        entries[key] = FindEntry(
            name=f"{display_name(model)}:{tag}",
            full=f"{model}:{tag}",
            version=version,
            manifest_digest=manifest_digest,
            size=size,
            hlc=hlc,
        )
    return entries[key]


@asynccontextmanager
async def open_node(config: Config, *, identity: Identity | None = None) -> AsyncIterator[Node]:
    """A running node for ``config``; everything stops when the block ends."""
    if identity is None:
        identity = await trio.to_thread.run_sync(load_or_create_identity, config.node.data_dir)
    store = await trio.to_thread.run_sync(open_store, config)
    audit_config = config.audit
    audit = AuditLog(
        audit_config.path if audit_config.enabled else None,
        max_size=audit_config.max_size,
        keep=audit_config.keep,
    )
    limits = Limits(config.limits, audit=audit)
    try:
        allowlist = frozenset(config.network.allowlist) or None
        async with trio.open_nursery() as outer:
            # Started first and stopped last, so every refusal on the way down is written.
            await outer.start(audit.run)
            async with (
                open_host(
                    identity.key_pair,
                    list(config.network.listen),
                    allowlist=allowlist,
                    gate=limits.ban_reason,
                    on_refused=limits.refused,
                ) as host,
                trio.open_nursery() as nursery,
            ):
                limits.disconnect = _disconnector(host)
                await nursery.start(limits.run)
                node = Node(config, identity, store, host, audit=audit, limits=limits)
                await nursery.start(node.run)
                try:
                    yield node
                finally:
                    node.shutdown.set()
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        store.close()


def _disconnector(host: P2PHost) -> Callable[[str], Awaitable[None]]:
    async def disconnect(peer: str) -> None:
        try:
            await host.disconnect(peer)
        except Exception as exc:  # already gone, or the library failing: either way, done
            log.debug("disconnecting %s: %r", peer, exc)

    return disconnect


__all__ = ["FindEntry", "Node", "open_node"]


async def run_until_signalled(config: Config) -> None:
    """``dmm node start``: run until SIGINT or SIGTERM, then shut down cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config) as node:
            print(
                f"dmm node {node.peer_id}\n"
                f"  p2p  {' '.join(node.host.listen_addrs)}\n"
                f"  api  {' '.join(node.api_urls)}",
                flush=True,
            )
            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                break
