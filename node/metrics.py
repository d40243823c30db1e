"""PerformanceMonitor: the node's Prometheus metrics, ``/metrics`` and ``get_performance_metrics``.

Two kinds of figures. Events are counted as they happen (chunk latency and bytes per peer
from ``PeerScores``, DHT query latency from ``Dht``, pulls from the node). State is read
when a scrape asks (gossip counters, peers, replica health, upload bytes per peer), except
what costs disk reads — storage used and the dedup ratio — which a sampler refreshes every
``[metrics] interval`` in a worker thread, together with the transfer rates over that
interval. Each node has its own registry, so several nodes in one process never mix.

Per-peer series are bounded: past ``MAX_PEER_LABELS`` peers, the rest are summed under
``peer="other"``, so a swarm of throwaway peer ids cannot grow the exposition without bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from node.p2p import verified_records

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("dmm.metrics")

MAX_PEER_LABELS = 256
OTHER_PEER = "other"
# Chunk round trips: a 1 MiB chunk on a LAN is milliseconds, on a slow link seconds.
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DHT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

MetricFn = Callable[[], float]


@dataclass(slots=True)
class StorageSample:
    """What the sampler read from disk last."""

    models: int = 0
    blob_bytes: int = 0  # bytes of distinct blobs the models reference
    referenced_chunk_bytes: int = 0  # chunk bytes counted once per reference
    distinct_chunk_bytes: int = 0  # chunk bytes counted once
    taken_at: float = 0.0

    @property
    def dedup_ratio(self) -> float:
        """Referenced / distinct chunk bytes: 1.0 = nothing shared, 2.0 = half saved."""
        if self.distinct_chunk_bytes == 0:
            return 1.0
        return self.referenced_chunk_bytes / self.distinct_chunk_bytes


@dataclass(frozen=True, slots=True)
class CustomMetric:
    name: str
    fn: MetricFn
    unit: str
    help: str


class PeerLabels:
    """Maps peer ids to label values, the first ``limit`` peers by name, then ``other``."""

    def __init__(self, limit: int = MAX_PEER_LABELS) -> None:
        self.limit = limit
        self._named: set[str] = set()

    def __call__(self, peer: str) -> str:
        if peer in self._named:
            return peer
        if len(self._named) < self.limit:
            self._named.add(peer)
            return peer
        return OTHER_PEER

    def fold(self, per_peer: Iterable[tuple[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for peer, value in per_peer:
            label = self(peer)
            out[label] = out.get(label, 0.0) + value
        return out


class PerformanceMonitor:
    """The node's metrics; ``node.metrics``. Start ``run`` in the node's nursery."""

    def __init__(self, node: Node, *, interval: float = 15.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.node = node
        self.interval = interval
        self.registry = CollectorRegistry(auto_describe=True)
        self.peer_label = PeerLabels()
        self.storage = StorageSample()
        self.rates = {"in": 0.0, "out": 0.0}
        self._custom: dict[str, CustomMetric] = {}
        self._last_totals: tuple[float, int, int] | None = None

        self.chunk_seconds = Histogram(
            "dmm_chunk_seconds",
            "Time from asking a peer for a chunk to holding it verified",
            buckets=CHUNK_BUCKETS,
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "dmm_received_bytes",
            "Verified chunk bytes fetched from each peer",
            ["peer"],
            registry=self.registry,
        )
        self.dht_query_seconds = Histogram(
            "dmm_dht_query_seconds",
            "DHT lookups by operation",
            ["op"],
            buckets=DHT_BUCKETS,
            registry=self.registry,
        )
        self.pulls = Counter(
            "dmm_pulls", "Model pulls by outcome", ["outcome"], registry=self.registry
        )
        self.local_bytes = Counter(
            "dmm_local_chunk_bytes",
            "Bytes a pull found in blobs already on disk instead of fetching (cache hits)",
            registry=self.registry,
        )
        self.fetched_bytes = Counter(
            "dmm_fetched_bytes",
            "Bytes pulls fetched over the network",
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self))

        node.scores.chunk_listeners.append(self._on_chunk)
        node.dht.query_listeners.append(self._on_dht_query)

    # --- events ------------------------------------------------------------------------

    def _on_chunk(self, peer: str, nbytes: int, seconds: float) -> None:
        self.chunk_seconds.observe(seconds)
        self.received_bytes.labels(self.peer_label(peer)).inc(nbytes)

    def _on_dht_query(self, op: str, seconds: float) -> None:
        self.dht_query_seconds.labels(op).observe(seconds)

    def pull_done(self, outcome: str, *, fetched: int = 0, local: int = 0) -> None:
        """Called by the node when a pull ends: ``ok``, ``already-complete`` or ``failed``."""
        self.pulls.labels(outcome).inc()
        if fetched:
            self.fetched_bytes.inc(fetched)
        if local:
            self.local_bytes.inc(local)

    # --- custom metrics ----------------------------------------------------------------

    def add_metric(self, name: str, fn: MetricFn, unit: str = "", help: str = "") -> None:
        """Expose ``fn()`` as the gauge ``name``, read at every scrape.

        ``name`` must be a valid Prometheus name not already used; a raising ``fn`` is
        logged and its sample left out, never failing the scrape.
        """
        if not _valid_name(name):
            raise ValueError(f"metric name {name!r} must match [a-zA-Z_:][a-zA-Z0-9_:]*")
        taken = {m.name for m in self.registry.collect()} | set(self._custom)
        if name in taken:
            raise ValueError(f"metric {name!r} already exists")
        self._custom[name] = CustomMetric(name, fn, unit, help or f"custom metric {name}")

    def custom_metrics(self) -> list[CustomMetric]:
        return list(self._custom.values())

    # --- reading -----------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def get_performance_metrics(self) -> list[tuple[str, float, str]]:
        """Every sample as (name with labels, value, unit)."""
        out: list[tuple[str, float, str]] = []
        for family in self.registry.collect():
            unit = _unit_of(family, self._custom)
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # prometheus_client's creation timestamps, not figures
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                name = f"{sample.name}{{{labels}}}" if labels else sample.name
                out.append((name, float(sample.value), unit))
        return out

    def summary(self) -> dict[str, Any]:
        """A few headline figures for ``/api/status`` and ``dmm status``."""
        return {
            "rate_in": round(self.rates["in"], 1),
            "rate_out": round(self.rates["out"], 1),
            "storage_bytes": self.storage.blob_bytes,
            "dedup_ratio": round(self.storage.dedup_ratio, 4),
            "sampled_at": self.storage.taken_at,
        }

    # --- sampling ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sample()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.sample()
            except Exception as exc:  # a failed sample must never stop the node
                log.warning("metrics sample failed: %s", exc)

    async def sample(self) -> None:
        """Refresh storage figures (in a thread) and the transfer rates since last time."""
        self.storage = await trio.to_thread.run_sync(_read_storage, self.node)
        now = time.monotonic()
        totals = (now, self._bytes_in_total(), self._bytes_out_total())
        if self._last_totals is not None:
            then, was_in, was_out = self._last_totals
            span = max(now - then, 1e-6)
            self.rates = {"in": (totals[1] - was_in) / span, "out": (totals[2] - was_out) / span}
        self._last_totals = totals

    def _bytes_in_total(self) -> int:
        return sum(score.bytes_in for _, score in self.node.scores.items())

    def _bytes_out_total(self) -> int:
        return sum(self.node.provider.stats.bytes_out.values())


def _read_storage(node: Node) -> StorageSample:
    entries = node.store.list_models()
    digests: dict[str, int] = {}
    for entry in entries:
        for layer in entry.manifest.all_layers():
            digests[layer.digest] = layer.size
    _, _, referenced, distinct = node.store.db.chunk_stats()
    return StorageSample(
        models=len(entries),
        blob_bytes=sum(digests.values()),
        referenced_chunk_bytes=referenced,
        distinct_chunk_bytes=distinct,
        taken_at=time.time(),
    )


class _StateCollector(Collector):
    """Figures read from the node's state at scrape time."""

    def __init__(self, monitor: PerformanceMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        # Described lazily: the families depend on custom metrics added later.
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        node = m.node
        sent = CounterMetricFamily(
            "dmm_sent_bytes", "Block bytes served to each peer", labels=["peer"]
        )
        for peer, value in m.peer_label.fold(node.provider.stats.bytes_out.items()).items():
            sent.add_metric([peer], value)
        yield sent
        served = CounterMetricFamily(
            "dmm_blocks", "Block requests answered, by outcome", labels=["outcome"]
        )
        served.add_metric(["served"], node.provider.stats.blocks_served)
        served.add_metric(["missing"], node.provider.stats.blocks_missing)
        # Sent to peers that got the chunk from us a moment ago (super-seeding).
        served.add_metric(["elsewhere"], node.provider.stats.blocks_redirected)
        served.add_metric(["corrupt_on_disk"], node.provider.stats.corrupt_reads)
        served.add_metric(["refused"], node.provider.stats.streams_refused)
        yield served

        stats = node.announcer.stats
        gossip = CounterMetricFamily(
            "dmm_gossip_messages",
            "Announcements by direction and outcome",
            labels=["direction", "outcome"],
        )
        gossip.add_metric(["out", "published"], stats.published)
        gossip.add_metric(["out", "dropped_overflow"], stats.dropped_overflow)
        gossip.add_metric(["in", "accepted"], stats.received)
        gossip.add_metric(["in", "dropped_bad"], stats.dropped_bad)
        gossip.add_metric(["in", "dropped_backlog"], stats.dropped_backlog)
        yield gossip

        # Process-wide: every host in this process shares the one cache of checked records.
        records = CounterMetricFamily(
            "dmm_peer_record_checks",
            "Signed peer records received (DHT, identify, gossip), by whether the signature"
            " was checked or the record was known already (cache hit)",
            labels=["outcome"],
        )
        records.add_metric(["verified"], verified_records.misses)
        records.add_metric(["cached"], verified_records.hits)
        yield records

        yield GaugeMetricFamily(
            "dmm_peers_connected",
            "Peers with an open connection",
            value=len(node.host.connected_peers()),
        )
        yield GaugeMetricFamily(
            "dmm_dht_routing_table_peers",
            "Peers in the DHT routing table",
            value=node.dht.routing_table_size(),
        )
        yield GaugeMetricFamily(
            "dmm_dht_provides_in_flight",
            "Provide walks started and not yet done (first provides and re-provides)",
            value=node.dht.provides_in_flight,
        )
        health = GaugeMetricFamily(
            "dmm_replicas", "Replica holders of this node's models, by health", labels=["health"]
        )
        for state, count in sorted(_replica_health(node).items()):
            health.add_metric([state], count)
        yield health

        storage = m.storage
        yield GaugeMetricFamily(
            "dmm_storage_bytes",
            "Bytes of the blobs the store's models reference",
            value=storage.blob_bytes,
            unit="bytes",
        )
        yield GaugeMetricFamily("dmm_models", "Models in the store", value=storage.models)
        yield GaugeMetricFamily(
            "dmm_dedup_ratio",
            "Chunk bytes referenced / chunk bytes stored (higher = more shared)",
            value=storage.dedup_ratio,
        )
        rate = GaugeMetricFamily(
            "dmm_transfer_rate_bytes_per_second",
            "Transfer rate over the last sampling interval",
            labels=["direction"],
        )
        rate.add_metric(["in"], m.rates["in"])
        rate.add_metric(["out"], m.rates["out"])
        yield rate

        for custom in m.custom_metrics():
            try:
                value = float(custom.fn())
            except Exception as exc:  # a user's metric must not break the scrape
                log.warning("custom metric %s failed: %s", custom.name, exc)
                continue
            yield GaugeMetricFamily(custom.name, custom.help, value=value)


def _replica_health(node: Node) -> dict[str, int]:
    """Counts by health from the replication manager, when the node runs one."""
    replication = getattr(node, "replication", None)
    counts = getattr(replication, "health_counts", None)
    if counts is None:
        return {}
    result: dict[str, int] = counts()
    return result


_UNITS = {
    "dmm_chunk_seconds": "seconds",
    "dmm_dht_query_seconds": "seconds",
    "dmm_received_bytes": "bytes",
    "dmm_sent_bytes": "bytes",
    "dmm_local_chunk_bytes": "bytes",
    "dmm_fetched_bytes": "bytes",
    "dmm_storage_bytes": "bytes",
    "dmm_transfer_rate_bytes_per_second": "bytes/s",
    "dmm_dedup_ratio": "ratio",
}


def _unit_of(family: Metric, custom: dict[str, CustomMetric]) -> str:
    if family.name in custom:
        return custom[family.name].unit
    if family.unit:
        return str(family.unit)
    return _UNITS.get(family.name, "")


def _valid_name(name: str) -> bool:
    if not name or not (name[0].isalpha() or name[0] in "_:"):
        return False
    return all(c.isalnum() or c in "_:" for c in name) and name.isascii()
