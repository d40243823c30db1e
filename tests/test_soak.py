"""Churn soak, CI variant: 300 connect/disconnect cycles against a node process (past
py-libp2p's 250-connection lifetime cap), then a fresh peer still connects and pulls.
The full 1000 cycles, with cycles/s, run in `scripts/bench soak`."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from bench.soak import MODEL, churn, fresh_peer_pulls, rss_of, start_target
from node.config import load_config

CYCLES = int(os.environ.get("DMM_SOAK_CYCLES", "300"))
# Generous: a leak of even a few KiB per connection shows at 1000 cycles; this bound
# only catches a node that keeps whole connections, streams or buffers.
MAX_RSS_GROWTH_MIB = 64
# How long the node may take to notice the churned connections closing. None may be left:
# one that was (a connection the node dialed to a churning peer while that peer's host
# was closing, which the peer never closed) was a leak, fixed in open_host.
DRAIN_SECONDS = 20


@pytest.mark.slow
async def test_node_survives_churn_and_a_fresh_peer_still_pulls(tmp_path: Path) -> None:
    node, gguf = await trio.to_thread.run_sync(start_target, tmp_path)
    try:
        with trio.fail_after(600):
            report = await churn(node.p2p, CYCLES, seed=11, rss=rss_of(node.pid))
            print(
                f"{report.cycles} cycles in {report.seconds:.1f}s ({report.rate:.0f}/s) "
                f"{dict(report.kinds)}; node RSS {report.rss_start_mib:.0f} -> "
                f"{report.rss_warm_mib:.0f} (after warm-up) -> {report.rss_end_mib:.0f} MiB, "
                f"growth {report.growth_mib:+.1f} MiB"
            )
            assert report.cycles == CYCLES and report.failed_dials == 0
            assert set(report.kinds) == {
                "hang-up",
                "half-catalog",
                "half-blocks",
                "unread-reply",
                "reset",
            }
            assert report.growth_mib < MAX_RSS_GROWTH_MIB
            # Every churned connection is gone from the node, not just from the dialers.
            url = f"http://{load_config(node.config).api.listen}/api/peers"
            left: list[object] = []
            async with httpx.AsyncClient(timeout=10) as http:
                # No event says a peer's connection is gone: poll, bounded.
                with trio.move_on_after(DRAIN_SECONDS):
                    while left := (await http.get(url)).json()["peers"]:
                        await trio.sleep(0.1)
            if left:
                print(f"still connected {DRAIN_SECONDS} s after the churn: {left}")
            assert not left, f"{len(left)} churned peers still connected: {left}"
            with trio.fail_after(120):
                result = await fresh_peer_pulls(tmp_path, node.p2p, MODEL)
        assert result["already_complete"] is False
        assert isinstance(result["bytes_fetched"], int)
        assert result["bytes_fetched"] >= gguf.stat().st_size
        assert node.proc.poll() is None
    finally:
        await trio.to_thread.run_sync(node.stop)
