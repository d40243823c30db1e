"""Churn soak: peers connect and hang up a thousand times, some mid-message; then a fresh
peer must still connect and pull, and the node's memory must not have grown with the churn.

The node is a real ``dmm node start`` process (so its RSS is its own); the churning peers
are bare libp2p hosts (``node.p2p.open_host``) in this process. Each cycle dials the node
and then, by a seeded draw: hangs up at once; opens a ``/dmm/catalog/1`` or
``/dmm/blocks/1`` stream, writes half a message and hangs up; sends a whole request and
hangs up without reading the reply; or resets a fresh stream. py-libp2p refuses every
inbound connection after its 250th unless ``node/p2p.py``'s workaround (defect 3) holds,
so any run past 250 cycles checks it. ``tests/test_soak.py`` runs a shorter variant.
"""

from __future__ import annotations

import random
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from bench import Figure, progress, register
from bench.transfer import NodeProcess, _status_mib
from node.config import load_config
from node.daemon import open_node
from node.local import open_store
from node.p2p import P2PError, P2PHost, open_host
from node.testing import node_config
from protocols import blocks, catalog
from protocols.framing import encode_frame
from storage.testmodels import generate_model

FULL_CYCLES = 1000
QUICK_CYCLES = 100
# Peers churning at once, and how many cycles one identity lasts before a new one.
WORKERS = 8
CYCLES_PER_IDENTITY = 25
# Cycles before the RSS baseline is taken: the first connections warm caches and pools.
WARMUP_CYCLES = 50
MODEL = "soak-model:latest"
MODEL_SIZE = 4 * 1024 * 1024
CYCLE_TIMEOUT = 30.0
RSS_KEY = "VmRSS"

_CATALOG_REQUEST = encode_frame(
    catalog.encode_message(catalog.ListModels(0, "*", 10)), catalog.MAX_REQUEST_FRAME
)
_WANT_HAVE = b"".join(
    bytes(part) for part in blocks.encode_message(blocks.WantHave(0, (bytes(32),)))
)
KINDS = ("hang-up", "half-catalog", "half-blocks", "unread-reply", "reset")


@dataclass
class ChurnReport:
    cycles: int = 0
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    failed_dials: int = 0
    rss_start_mib: float = 0.0
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds if self.seconds else 0.0

    @property
    def growth_mib(self) -> float:
        """RSS growth from after the warm-up to the end."""
        return self.rss_end_mib - self.rss_warm_mib


async def _cycle(host: P2PHost, target_addr: str, kind: str) -> None:
    target = await host.connect(target_addr)
    try:
        if kind == "hang-up":
            return
        protocol = blocks.PROTOCOL_ID if kind == "half-blocks" else catalog.PROTOCOL_ID
        stream = await host.open_stream(target, protocol)
        if kind == "reset":
            await stream.reset()
        elif kind == "half-catalog":
            await stream.send_all(_CATALOG_REQUEST[: len(_CATALOG_REQUEST) // 2])
            await stream.flush()
        elif kind == "half-blocks":
            await stream.send_all(_WANT_HAVE[: len(_WANT_HAVE) // 2])
            await stream.flush()
        else:
            await stream.send_all(_CATALOG_REQUEST)
            await stream.flush()
        # Hang up with the stream open: the node must notice, and forget it.
    finally:
        await host.disconnect(target)


async def churn(
    target_addr: str,
    cycles: int,
    *,
    seed: int,
    rss: Callable[[], float],
    on_progress: Callable[[int], None] | None = None,
) -> ChurnReport:
    """``cycles`` connect/disconnect cycles against ``target_addr`` by ``WORKERS`` peers."""
    rng = random.Random(seed)
    plan = [rng.choice(KINDS) for _ in range(cycles)]
    report = ChurnReport(rss_start_mib=rss())
    next_cycle = 0
    warm = trio.Event()

    async def worker() -> None:
        nonlocal next_cycle
        done_here = 0
        async with AsyncExitStack() as stack:
            host: P2PHost | None = None
            while next_cycle < cycles:
                index, next_cycle = next_cycle, next_cycle + 1
                if host is None or done_here % CYCLES_PER_IDENTITY == 0:
                    # A new identity: a peer the node has never seen.
                    await stack.aclose()
                    host = await stack.enter_async_context(
                        open_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"])
                    )
                done_here += 1
                try:
                    with trio.fail_after(CYCLE_TIMEOUT):
                        await _cycle(host, target_addr, plan[index])
                except P2PError:
                    report.failed_dials += 1
                report.kinds[plan[index]] += 1
                report.cycles += 1
                if report.cycles == min(WARMUP_CYCLES, cycles):
                    warm.set()
                if on_progress is not None:
                    on_progress(report.cycles)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(WORKERS):
            nursery.start_soon(worker)
        await warm.wait()
        report.rss_warm_mib = rss()
    report.seconds = time.monotonic() - started
    report.rss_end_mib = rss()
    return report


async def fresh_peer_pulls(root: Path, target_addr: str, name: str) -> dict[str, object]:
    """A node that never saw the churn connects to the target and pulls ``name``."""
    async with open_node(node_config(root, "fresh", [target_addr])) as fresh:
        # Bootstrapping runs in the background; no event marks its end, so poll for it.
        while not fresh.dht.routing_table_size():
            await trio.sleep(0.05)

        async def quiet(event: dict[str, object]) -> None:
            pass

        result = await fresh.pull(name, quiet)
        report = await trio.to_thread.run_sync(fresh.store.verify)
        if not report.ok:
            raise RuntimeError(f"the fresh peer's pull did not verify: {report.bad}")
        return result


def start_target(root: Path) -> tuple[NodeProcess, Path]:
    """A node process holding a small model; (the process, the model file)."""
    gguf = root / "soak.gguf"
    generate_model(gguf, MODEL_SIZE)
    node = NodeProcess(root, "target", [])
    try:
        # As `dmm add` does with a node running: add to the store, then tell the node.
        with open_store(load_config(node.config)) as store:
            store.add_model(MODEL, gguf)
        url = f"http://{load_config(node.config).api.listen}/api/dmm/refresh"
        with urllib.request.urlopen(urllib.request.Request(url, b"", method="POST"), timeout=30):
            pass
    except BaseException:
        node.stop()
        raise
    return node, gguf


def rss_of(pid: int) -> Callable[[], float]:
    return lambda: _status_mib(pid, RSS_KEY)


@register("soak")
def run(quick: bool) -> list[Figure]:
    """Churn soak: 1000 connect/disconnect cycles (some mid-message), then a fresh pull."""
    cycles = QUICK_CYCLES if quick else FULL_CYCLES
    with tempfile.TemporaryDirectory(prefix="dmm-bench-soak-") as tmp:
        root = Path(tmp)
        node, _ = start_target(root)
        try:
            report = trio.run(_soak, root, node, cycles)
        finally:
            node.stop()
    return [
        Figure(
            "soak", f"churn, {report.cycles} connect/disconnect cycles", report.rate, "cycles/s"
        ),
        Figure(
            "soak",
            f"node RSS growth over the churn (from {report.rss_warm_mib:.0f} MiB)",
            report.growth_mib,
            "MiB",
            better="lower",
        ),
    ]


async def _soak(root: Path, node: NodeProcess, cycles: int) -> ChurnReport:
    def show(done: int) -> None:
        if done % 100 == 0:
            progress(f"soak: {done}/{cycles} cycles")

    report = await churn(node.p2p, cycles, seed=7, rss=rss_of(node.pid), on_progress=show)
    progress(
        f"soak: {report.cycles} cycles in {report.seconds:.1f}s ({report.rate:.0f}/s), "
        f"{report.failed_dials} failed; RSS {report.rss_start_mib:.0f} -> "
        f"{report.rss_warm_mib:.0f} (warm) -> {report.rss_end_mib:.0f} MiB"
    )
    with trio.fail_after(120):
        await fresh_peer_pulls(root, node.p2p, MODEL)
    progress("soak: a fresh peer connected and pulled the model after the churn")
    return report
