"""Metrics and the status view: figures that match what really moved, bounded labels,
``/metrics`` in Prometheus' format, ``dmm status`` live data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from node.activity import Activity
from node.metrics import MAX_PEER_LABELS, OTHER_PEER, PeerLabels
from node.p2p import verified_records
from node.status_view import render
from node.testing import open_swarm
from tests.conftest import MakeModel

MiB = 1024 * 1024
OUTCOMES = {"verified": "misses", "cached": "hits"}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _quiet(event: dict[str, Any]) -> None:
    pass


async def test_metrics_count_what_a_pull_moved(tmp_path: Path, make_model: MakeModel) -> None:
    # The cache of checked peer records is process-wide: count from here.
    checked_before = {o: getattr(verified_records, a) for o, a in OUTCOMES.items()}
    async with open_swarm(tmp_path, 2) as (a, b):
        path = make_model("metered.gguf", size=6 * MiB)
        await trio.to_thread.run_sync(lambda: a.store.add_model("metered:v1", path))
        await a.refresh()
        with trio.fail_after(60):
            result = await b.pull("metered:v1", _quiet)
        fetched = result["bytes_fetched"]
        assert fetched > 5 * MiB
        chunks = len(b.store.db.blob_chunks(b.store.get("metered:v1").manifest.layers[0].digest))
        await b.metrics.sample()
        async with httpx.AsyncClient(timeout=30) as client:
            got_b = await client.get(f"{b.api_urls[0]}/metrics")
            got_a = await client.get(f"{a.api_urls[0]}/metrics")
        assert got_b.status_code == 200
        assert got_b.headers["content-type"].startswith("text/plain")
        sb, sa = _samples(got_b.text), _samples(got_a.text)
        assert sb[("dmm_received_bytes_total", (("peer", a.peer_id),))] == fetched
        assert sa[("dmm_sent_bytes_total", (("peer", b.peer_id),))] == fetched
        # One latency sample per chunk that crossed the network (config/template are tiny
        # blobs of one chunk each).
        assert sb[("dmm_chunk_seconds_count", ())] >= chunks
        assert sb[("dmm_pulls_total", (("outcome", "ok"),))] == 1
        assert sb[("dmm_fetched_bytes_total", ())] == fetched
        assert sb[("dmm_dht_query_seconds_count", (("op", "find_providers"),))] >= 1
        assert sb[("dmm_models", ())] == 1
        assert sb[("dmm_storage_bytes", ())] == sum(
            layer.size for layer in b.store.get("metered:v1").manifest.all_layers()
        )
        assert sb[("dmm_peers_connected", ())] >= 1
        # Both nodes sent signed peer records (identify, DHT answers): each was checked
        # once in this process, and each time it came again it was a cache hit.
        checks = {o: sb[("dmm_peer_record_checks_total", (("outcome", o),))] for o in OUTCOMES}
        assert checks["verified"] >= checked_before["verified"] + 2
        assert checks["cached"] > checked_before["cached"]
        published = (("direction", "out"), ("outcome", "published"))
        assert sa[("dmm_gossip_messages_total", published)] == a.announcer.stats.published
        # The same figures, as (name, value, unit) tuples.
        figures = {name: (value, unit) for name, value, unit in b.metrics.get_performance_metrics()}
        assert figures[f'dmm_received_bytes_total{{peer="{a.peer_id}"}}'] == (fetched, "bytes")
        assert figures["dmm_dedup_ratio"][1] == "ratio"
        # A second pull of a complete model is counted as such and moves nothing.
        await b.pull("metered:v1", _quiet)
        again = {n: v for n, v, _ in b.metrics.get_performance_metrics()}
        assert again['dmm_pulls_total{outcome="already-complete"}'] == 1
        assert again[f'dmm_received_bytes_total{{peer="{a.peer_id}"}}'] == fetched


async def test_transfer_rate_is_measured_over_the_interval(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        path = make_model("rated.gguf", size=4 * MiB)
        await trio.to_thread.run_sync(lambda: a.store.add_model("rated:v1", path))
        await a.refresh()
        await b.metrics.sample()
        with trio.fail_after(60):
            result = await b.pull("rated:v1", _quiet)
        await b.metrics.sample()
        assert b.metrics.rates["in"] > 0
        await a.metrics.sample()
        assert a.metrics.rates["out"] > 0
        # Nothing moves between two samples: the rate falls back to zero.
        await b.metrics.sample()
        assert b.metrics.rates["in"] == 0
        assert result["bytes_fetched"] > 0


async def test_custom_metrics(tmp_path: Path) -> None:
    async with open_swarm(tmp_path, 1) as (a,):
        a.metrics.add_metric("queue_depth", lambda: 7, unit="jobs", help="jobs waiting")

        def broken() -> float:
            raise RuntimeError("sensor gone")

        a.metrics.add_metric("broken_sensor", broken)
        with pytest.raises(ValueError, match="already exists"):
            a.metrics.add_metric("queue_depth", lambda: 1)
        with pytest.raises(ValueError, match="must match"):
            a.metrics.add_metric("bad name!", lambda: 1)
        with pytest.raises(ValueError, match="already exists"):
            a.metrics.add_metric("dmm_models", lambda: 1)
        figures = {n: (v, u) for n, v, u in a.metrics.get_performance_metrics()}
        assert figures["queue_depth"] == (7.0, "jobs")
        assert "broken_sensor" not in figures  # left out, the rest still scraped
        text, _ = a.metrics.exposition()
        assert b"queue_depth 7.0" in text


async def test_metrics_off_answers_404(tmp_path: Path) -> None:
    from node.daemon import open_node
    from node.testing import node_config

    config = node_config(tmp_path, "quiet", extra="[metrics]\nenabled = false\n")
    async with open_node(config) as node, httpx.AsyncClient(timeout=30) as client:
        got = await client.get(f"{node.api_urls[0]}/metrics")
    assert got.status_code == 404
    assert "enabled = true" in got.json()["error"]


def test_peer_labels_are_bounded() -> None:
    labels = PeerLabels()
    per_peer = [(f"peer{i}", 1.0) for i in range(MAX_PEER_LABELS + 50)]
    folded = labels.fold(per_peer)
    assert len(folded) == MAX_PEER_LABELS + 1
    assert folded[OTHER_PEER] == 50
    assert sum(folded.values()) == len(per_peer)
    # A peer named once keeps its label; a new one lands in "other".
    assert labels("peer0") == "peer0"
    assert labels("newcomer") == OTHER_PEER


async def test_activity_tracks_a_transfer_from_its_events() -> None:
    activity = Activity(max_events=3)
    seen: list[dict[str, Any]] = []

    async def emit(event: dict[str, Any]) -> None:
        seen.append(event)

    tid, tracked = activity.track("m:v1", emit)
    await tracked({"status": "pulling manifest"})
    await tracked(
        {"status": "pulling abc", "digest": "sha256:abc", "total": 100, "completed": 40, "peers": 2}
    )
    snap = activity.snapshot()["transfers"]
    assert snap[0]["model"] == "m:v1" and snap[0]["completed"] == 40 and snap[0]["total"] == 100
    assert snap[0]["peers"] == 2 and len(seen) == 2  # events still reach the caller
    activity.finish(tid)
    assert activity.snapshot()["transfers"] == []
    for i in range(5):
        activity.event("peer", f"event {i}")
    events = activity.snapshot()["events"]
    assert [e["text"] for e in events] == ["event 4", "event 3", "event 2"]  # newest first


def test_status_view_renders_a_snapshot() -> None:
    snapshot = {
        "status": {
            "peer_id": "12D3KooWTest",
            "name": "box",
            "listen": ["/ip4/127.0.0.1/tcp/4001"],
            "api": ["http://127.0.0.1:11435"],
            "peers": 1,
            "dht_routing_table": 1,
            "models": 2,
            "published": 2,
            "dht_provides_in_flight": 3,
            "uptime": 75,
            "metrics": {
                "rate_in": 2_000_000,
                "rate_out": 0,
                "storage_bytes": 5_000_000,
                "dedup_ratio": 1.5,
            },
            "transfers": [
                {
                    "model": "llama:8b",
                    "status": "pulling",
                    "completed": 50,
                    "total": 100,
                    "peers": 3,
                    "rate": 1e6,
                    "eta": 12,
                }
            ],
            "events": [
                {
                    "at": 1000.0,
                    "kind": "announced",
                    "text": "version abc",
                    "model": "llama:8b",
                    "peer": "12D3KooWPeer",
                }
            ],
        },
        "peers": [{"peer_id": "12D3KooWPeer", "connected": True}],
        "replicas": None,
    }
    console = Console(record=True, width=140)
    console.print(render(snapshot, now=1030.0))
    out = console.export_text()
    for text in (
        "12D3KooWTest",
        "transfers: 1",
        "llama:8b",
        "2.0 MB/s",
        "12s",
        "30s ago",
        "announced",
        "dedup x1.50",
        "2 provided (3 provide walks under way)",
        "replication is not running",
        "1m15s",
    ):
        assert text in out, text


async def test_dmm_status_once_and_json(tmp_path: Path, make_model: MakeModel) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        path = make_model("shown.gguf", size=1 * MiB)
        await trio.to_thread.run_sync(lambda: a.store.add_model("shown:v1", path))
        await a.refresh()
        config = a.config.path
        assert config is not None
        # The CLI reads [api] listen: point a copy of the config at the bound port.
        port = a.api_urls[0].rsplit(":", 1)[1]
        cli_config = tmp_path / "cli.toml"
        cli_config.write_text(
            config.read_text()
            .replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
            .replace('data_dir = "data"', f'data_dir = "{config.parent / "data"}"')
            .replace('models_dir = "models"', f'models_dir = "{config.parent / "models"}"')
        )

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "node.cli", "status", *args, "--config", str(cli_config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        with trio.fail_after(120):
            as_json = await trio.to_thread.run_sync(run, "--json")
            once = await trio.to_thread.run_sync(run, "--once")
        assert as_json.returncode == 0, as_json.stderr
        data = json.loads(as_json.stdout)
        assert data["status"]["peer_id"] == a.peer_id
        assert [p["peer_id"] for p in data["peers"]] == [b.peer_id]
        assert any(
            e["kind"] == "published" and e["model"].endswith("shown:v1")
            for e in data["status"]["events"]
        )
        assert once.returncode == 0, once.stderr
        assert a.peer_id in once.stdout and "recent events" in once.stdout


def test_dmm_status_without_a_node_says_how_to_start_one(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[api]\nlisten = "127.0.0.1:9"\n[node]\ndata_dir = "d"\n[storage]\nmodels_dir = "m"\n'
    )
    got = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert got.returncode == 1
    assert "dmm node start" in got.stderr


def test_status_view_shows_replica_health() -> None:
    from node.status_view import replicas_panel

    entry = {
        "model": "llama:8b",
        "healthy": 2,
        "status": "under-replicated",
        "replicas": [
            {"peer_id": "12D3KooWAAAAAAAA11111111", "health": "healthy"},
            {"peer_id": "12D3KooWBBBBBBBB22222222", "health": "healthy"},
            {"peer_id": "12D3KooWCCCCCCCC33333333", "health": "unreachable"},
        ],
    }
    console = Console(record=True, width=140)
    console.print(replicas_panel([entry]))
    out = console.export_text()
    for text in ("llama:8b", "2 / 3", "under-replicated", "33333333 unreachable"):
        assert text in out, text
    assert "22222222" not in out  # healthy holders are not listed
