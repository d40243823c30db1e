"""The running node: libp2p host, DHT, gossip, catalog, HTTP API, over the local store.

``open_node(config)`` yields a running ``Node``; leaving the block shuts everything down.
The node provides every model in its store when it starts, publishes signed version
records (DHT values and gossip), keeps reconnecting to its bootstrap peers, and answers
``find`` by asking the providers of the glob's index key for their matching models.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from node.announce import Announcer
from node.api import build_router
from node.catalog_service import (
    CATALOG_PROTOCOL,
    CatalogServer,
    StoreCatalogSource,
    open_catalog_client,
)
from node.config import Config
from node.dht import Dht
from node.http import serve_http
from node.identity import Identity, load_or_create_identity
from node.local import open_store
from node.mdns import MdnsDiscovery
from node.p2p import P2PError, P2PHost, open_host
from node.peerscore import PeerScores
from node.provider import BLOCKS_PROTOCOL, BlockProvider
from node.pull import Emit, PullError, pull_model
from node.replication import ReplicationManager
from node.versions import VersionBook
from protocols.catalog import display_name, glob_matches, index_key_for_glob, index_keys_for_name
from protocols.records import Announcement, VersionRecord
from storage.names import ModelName, parse_model_name
from storage.store import ModelStore

log = logging.getLogger("dmm.node")

BOOTSTRAP_BACKOFF_MAX = 60.0
BOOTSTRAP_CHECK_INTERVAL = 10.0


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
        self, config: Config, identity: Identity, store: ModelStore, host: P2PHost
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.host = host
        self.book = VersionBook(store.db, identity)
        self.dht = Dht(host)
        self.announcer = Announcer(host, self._on_announcement)
        self.catalog = CatalogServer(StoreCatalogSource(store, self.book))
        self.scores = PeerScores()
        self.provider = BlockProvider(
            store,
            self.scores,
            upload_slots=config.storage.upload_slots,
            rate_limit=config.storage.upload_rate_limit,
        )
        self._nursery: trio.Nursery | None = None
        self._pulling: set[str] = set()
        self.started_at = trio.current_time()
        self.api_urls: list[str] = []
        self.shutdown = trio.Event()
        # What gossip told us: (model:tag full name, version id hex) -> holders.
        self._gossip: dict[tuple[str, str], dict[str, Holder]] = {}
        self._gossip_records: dict[str, VersionRecord] = {}
        self._published: dict[str, str] = {}  # full name:tag -> manifest digest provided
        self._publish_lock = trio.Lock()
        self.replication = ReplicationManager(self)

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.dht.run)
            await nursery.start(self.announcer.run)
            self.host.set_stream_handler(CATALOG_PROTOCOL, self.catalog.handle)
            self.host.set_stream_handler(BLOCKS_PROTOCOL, self.provider.handle)
            self._nursery = nursery
            api = self.config.api
            self.api_urls = await nursery.start(
                functools.partial(
                    serve_http, build_router(self), api.host, api.port, shutdown=self.shutdown
                )
            )
            for addr in self.config.network.bootstrap:
                nursery.start_soon(self._keep_connected, addr)
            if self.config.network.mdns:
                await nursery.start(MdnsDiscovery(self.host, self._on_lan_peer).run)
            nursery.start_soon(self._publish_store_at_start)
            await nursery.start(self.replication.run)
            log.info(
                "node %s up: p2p %s, api %s",
                self.peer_id,
                " ".join(self.host.listen_addrs),
                " ".join(self.api_urls),
            )
            task_status.started()
            await self.shutdown.wait()
            nursery.cancel_scope.cancel()

    async def _keep_connected(self, addr: str) -> None:
        """Dial a bootstrap peer, and again whenever the connection is lost, with backoff."""
        peer = addr.rsplit("/p2p/", 1)[-1]
        delay = 1.0
        while True:
            if peer not in self.host.connected_peers():
                try:
                    with trio.fail_after(10):
                        await self.host.connect(addr)
                    await self.dht.add_peer(peer)
                    await self.dht.refresh()
                    log.info("connected to bootstrap peer %s", peer)
                    delay = 1.0
                except (
                    OSError,
                    trio.TooSlowError,
                    P2PError,
                    trio.BrokenResourceError,
                ) as exc:  # dial errors vary
                    log.info(
                        "bootstrap peer %s unreachable (%s); retrying in %.0fs", peer, exc, delay
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, BOOTSTRAP_BACKOFF_MAX)
                    continue
            await trio.sleep(BOOTSTRAP_CHECK_INTERVAL)

    async def _on_lan_peer(self, peer_id: str, addrs: list[str]) -> None:
        await self.dht.add_peer(peer_id)
        await self.dht.refresh()
        log.info("found LAN peer %s by mDNS", peer_id)

    # --- publishing ---------------------------------------------------------------------

    async def _publish_store_at_start(self) -> None:
        result = await self.refresh()
        log.info("providing %d model(s) from the store", result["published"])

    async def refresh(self) -> dict[str, Any]:
        """Re-read the store; publish new or changed models, stop providing removed ones."""
        async with self._publish_lock:
            entries = await trio.to_thread.run_sync(self.store.list_models)
            current = {e.name.full: e for e in entries}
            changed = [e for e in entries if self._published.get(e.name.full) != e.digest]
            records: list[VersionRecord] = []
            for entry in changed:
                record = await trio.to_thread.run_sync(
                    self.book.record_local, entry.name, entry.digest, entry.size
                )
                records.append(record)
                await self._provide(entry.name, entry.manifest.blob_digests())
                try:
                    await self.dht.put_version(record)
                except Exception as exc:  # a DHT with no peers yet fails puts
                    log.info(
                        "model %s: version record not stored in the DHT yet (%s)",
                        entry.name.display,
                        exc,
                    )
                self._published[entry.name.full] = entry.digest
            removed = [name for name in self._published if name not in current]
            for name in removed:
                del self._published[name]
                model = parse_model_name(name)
                if not any(
                    e.name.model == model.model and e.name.namespace == model.namespace
                    for e in entries
                ):
                    self.dht.unprovide(model_key(model))
            if records:
                self.announcer.announce_nowait(records, self.host.listen_addrs)
            return {"published": len(changed), "removed": len(removed), "models": len(entries)}

    async def _provide(self, name: ModelName, digests: list[str]) -> None:
        keys = [model_key(name), *index_keys_for_name(name.full), *(blob_key(d) for d in digests)]
        for key in keys:
            await self.dht.provide(key)

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
            self._follow(record)

    def _follow(self, record: VersionRecord) -> None:
        """Pull on our own when ``[sync] follow`` names an announced model."""
        name = f"{display_name(record.model)}:{record.tag}"
        follows = any(glob_matches(glob, name) for glob in self.config.sync.follow)
        if not follows or record.name in self._pulling or self._nursery is None:
            return
        self._pulling.add(record.name)
        self._nursery.start_soon(self._pull_followed, record.name)

    async def _pull_followed(self, full_name: str) -> None:
        async def quiet(event: dict[str, Any]) -> None:
            pass

        try:
            result = await self.pull(full_name, quiet)
            if not result["already_complete"]:
                log.info(
                    "followed model %s pulled: %d bytes fetched", full_name, result["bytes_fetched"]
                )
        except PullError as exc:
            log.warning("followed model %s not pulled: %s", full_name, exc)
        finally:
            self._pulling.discard(full_name)

    async def pull(self, name: str, emit: Emit) -> dict[str, Any]:
        return await pull_model(self, name, emit)

    def published(self) -> dict[str, str]:
        """Models this node provides: full name:tag -> manifest digest (a copy)."""
        return dict(self._published)

    def gossip_holders(self) -> dict[tuple[str, str], set[str]]:
        """(model:tag full name, version id hex) -> peers that announced it."""
        return {key: set(holders) for key, holders in self._gossip.items()}

    # --- queries ------------------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        return [{"peer_id": p, "connected": True} for p in sorted(self.host.connected_peers())]

    async def status(self) -> dict[str, Any]:
        models = await trio.to_thread.run_sync(self.store.list_models)
        return {
            "peer_id": self.peer_id,
            "name": self.config.node.name,
            "listen": self.host.listen_addrs,
            "api": self.api_urls,
            "peers": len(self.host.connected_peers()),
            "dht_routing_table": self.dht.routing_table_size(),
            "models": len(models),
            "published": len(self._published),
            "uptime": round(trio.current_time() - self.started_at, 3),
            "gossip": {
                "published": self.announcer.stats.published,
                "received": self.announcer.stats.received,
                "dropped_bad": self.announcer.stats.dropped_bad,
            },
        }

    async def find(self, glob: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Models matching ``glob`` anywhere: DHT providers of the index key, asked directly.

        Peers that gossiped a matching version count as holders too and are asked as well;
        a holder that does not answer in time stays listed but not reachable.
        """
        started = time.monotonic()
        entries: dict[tuple[str, str], FindEntry] = {}
        providers: set[str] = {self.peer_id}
        with trio.move_on_after(timeout / 2):
            for info in await self.dht.find_providers(index_key_for_glob(glob)):
                providers.add(info.peer_id)
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
                providers.update(holders)
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
            for s in summaries:
                entry = _entry(
                    entries, s.name, s.tag, s.version_id.hex(), s.manifest_digest, s.size, s.hlc
                )
                entry.holders.add(peer)
                entry.reachable.add(peer)

        with trio.move_on_after(max(timeout - (time.monotonic() - started), 0.1)):
            async with trio.open_nursery() as nursery:
                for peer in providers:
                    nursery.start_soon(ask, peer)
        results = sorted(entries.values(), key=lambda e: (e.name, -e.hlc))
        return {
            "glob": glob,
            "models": [e.to_json() for e in results],
            "providers_asked": len(providers),
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
    try:
        allowlist = frozenset(config.network.allowlist) or None
        async with (
            open_host(identity.key_pair, list(config.network.listen), allowlist=allowlist) as host,
            trio.open_nursery() as nursery,
        ):
            node = Node(config, identity, store, host)
            await nursery.start(node.run)
            try:
                yield node
            finally:
                node.shutdown.set()
    finally:
        store.close()


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
