"""Finding models across a swarm of real nodes, and how fast an announcement reaches all.

50 nodes (8 with ``--quick``) run in this one process on loopback, each a full
``open_node``. A few of them add small models; then, from many asking nodes:

- ``Node.find(glob)`` for globs with a literal prefix (``llama*``, ``mis*``: one
  ``/dmm/index/<p>`` key) and without (``*:q4``: the ``/dmm/index/`` key every holder
  provides), against one exact-key ``find_providers("/dmm/model/<name>")`` lookup from
  the same asker, run back to back with it. The exact-key lookup is the least any DHT
  discovery pays; ``find`` adds the index walk and asking each provider's catalog.
- propagation: one node adds a model and ``refresh()``es, which announces it over
  gossipsub; the figure is the time until every other node's ``_on_announcement`` has
  taken that version in, against the time the same announcement takes to reach one
  direct gossip-mesh neighbour (1 hop).

One Python process runs every node, so the machine's one busy core is shared by all of
them: absolute times are pessimistic, which is why each figure has a baseline from the
same moment of the same run.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench import Figure, progress, register
from node.config import Config
from node.daemon import Node, model_key, open_node
from node.testing import node_config
from protocols.catalog import glob_matches
from protocols.records import Announcement
from storage.names import parse_model_name
from storage.testmodels import generate_model

BENCH = "discovery"
FULL_NODES = 50
QUICK_NODES = 8
# One seed: every node refreshes its routing table once per bootstrap peer when it
# connects, and that storm of refreshes is most of the set-up time at 50 nodes; with
# one seed each node does it once, and the explicit refresh below fills the tables.
SEEDS = int(__import__("os").environ.get("XSEEDS", "1"))
XREFRESH = __import__("os").environ.get("XREFRESH", "1") == "1"
START_BATCH = 10
MiB = 1024 * 1024
MODEL_SIZE = 1 * MiB
FIND_TIMEOUT = 5.0
FULL_SAMPLES_PER_GLOB = 20
QUICK_SAMPLES_PER_GLOB = 4
FULL_ROUNDS = 5
QUICK_ROUNDS = 2
# A node not reached by then counts as a propagation miss.
PROPAGATION_DEADLINE = 15.0
GOAL_FIND_P95 = 1.0  # seconds, absolute
GOAL_PROPAGATION = 2.0  # seconds to reach every node, absolute
# Below this share of one core the swarm counts as settled (its idle background work
# measured ~5-10%); waiting for it keeps the set-up storm out of the measured times.
QUIET_CPU = 0.3
QUIET_MAX_WAIT = 150.0

# Different first letters, and two pairs sharing a prefix ("llama", "mis").
FIND_MODELS = ("llama-a:q4", "mistral-b:q4", "qwen-c:q4", "llama-d:q8", "mis-e:q4", "phi-f:q4")
# Each glob, and the model whose exact /dmm/model/<name> key is looked up beside it.
GLOBS = {"llama*": "llama-a:q4", "mis*": "mistral-b:q4", "*:q4": "qwen-c:q4"}
NO_PREFIX = "*:q4"
EXACT = "exact-key find_providers"
ONE_HOP = "1 hop (mesh neighbour)"


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """find(glob) vs an exact-key DHT lookup; announcement to all vs 1 hop (50 nodes)"""
    global _run_started
    started = _run_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmm-bench-") as tmp, _tally_logs() as tally:
        figures = trio.run(_run, Path(tmp), quick)
    seconds = time.perf_counter() - started
    _say(f"whole run {seconds:.1f} s (set-up and teardown included)")
    for (level, gist), count in tally.most_common(6):
        _say(f"node log {level} x{count}: {gist}")
    for figure in figures:
        if figure.name in ("find p95", "propagation max to all"):
            goal = GOAL_FIND_P95 if figure.name == "find p95" else GOAL_PROPAGATION
            met = "met" if figure.value <= goal else "MISSED"
            progress(f"goal {BENCH}/{figure.name} <= {goal:g} s: {met} ({figure.value:.3f} s)")
    return [*figures, Figure(BENCH, "run time", round(seconds, 1), "s", better="lower")]


async def _run(root: Path, quick: bool) -> list[Figure]:
    count = QUICK_NODES if quick else FULL_NODES
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    per_glob = QUICK_SAMPLES_PER_GLOB if quick else FULL_SAMPLES_PER_GLOB
    rng = random.Random(1)
    models = root / "gguf"
    models.mkdir()
    prop_names = [f"zeta{i}:v1" for i in range(rounds)]
    paths = await trio.to_thread.run_sync(_make_models, models, [*FIND_MODELS, *prop_names])

    setup_started = time.perf_counter()
    _say(f"starting {count} nodes ({SEEDS} seed, batches of {START_BATCH})")
    async with _open_swarm(root / "nodes", count, SEEDS) as nodes:
        await _bootstrap(nodes)
        setup = time.perf_counter() - setup_started
        watcher = _Watcher(nodes)

        # Holders are spread over the non-seed nodes; a seed, connected to everyone from
        # the start, would make every lookup one hop shorter than it is elsewhere.
        others = nodes[SEEDS:]
        holders = {
            name: others[i * len(others) // len(FIND_MODELS)] for i, name in enumerate(FIND_MODELS)
        }
        _say(f"{len(holders)} nodes add a model and refresh")
        async with trio.open_nursery() as nursery:
            for name, holder in holders.items():
                nursery.start_soon(_add, holder, name, paths[name])
        await _quiet()

        find = await _measure_find(nodes, holders, per_glob, rng)
        propagation = await _measure_propagation(nodes, watcher, prop_names, paths, rng)
        _say(f"measured; stopping {count} nodes")
        stopping = time.perf_counter()
    _say(f"{count} nodes stopped in {time.perf_counter() - stopping:.0f} s")

    return [
        *find,
        *propagation,
        Figure(BENCH, "swarm set-up", round(setup, 1), "s", better="lower"),
    ]


# --------------------------------------------------------------------------- swarm


@asynccontextmanager
async def _open_swarm(root: Path, count: int, seeds: int) -> AsyncIterator[list[Node]]:
    """Like ``node.testing.open_swarm``, but the non-seed nodes start in concurrent
    batches and all stop at once: one after the other, 50 nodes take minutes to stop,
    each departure setting off the others' reconnects."""
    stop = trio.Event()
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        try:
            for i in range(seeds):
                boot = [n.host.listen_addrs[0] for n in nodes]
                config = node_config(root, f"n{i}", boot)
                nodes.append(await nursery.start(_hold_node, config, stop))
            boot = [n.host.listen_addrs[0] for n in nodes]
            for first in range(seeds, count, START_BATCH):
                batch: dict[int, Node] = {}

                async def start(i: int, batch: dict[int, Node] = batch) -> None:
                    config = node_config(root, f"n{i}", boot)
                    batch[i] = await nursery.start(_hold_node, config, stop)

                async with trio.open_nursery() as starting:
                    for i in range(first, min(first + START_BATCH, count)):
                        starting.start_soon(start, i)
                nodes.extend(batch[i] for i in sorted(batch))
            yield nodes
        finally:
            stop.set()


async def _hold_node(
    config: Config, stop: trio.Event, *, task_status: trio.TaskStatus[Node]
) -> None:
    async with open_node(config) as node:
        task_status.started(node)
        await stop.wait()


async def _bootstrap(nodes: list[Node]) -> None:
    """Wait for every node to reach its seed, then refresh each routing table in turn.

    One at a time because each refresh dials the peers it finds: run together, they
    queue behind each other's connection set-up on the one core and take longer.
    """
    with trio.fail_after(120):
        while any(node.dht.routing_table_size() == 0 for node in nodes[1:]):
            await trio.sleep(0.2)
    started = time.perf_counter()
    await _quiet()
    for i, node in enumerate(nodes if XREFRESH else []):
        await node.dht.refresh()
        if (i + 1) % 10 == 0 or i + 1 == len(nodes):
            progress(
                f"{BENCH}: refreshed {i + 1}/{len(nodes)} routing tables"
                f" ({time.perf_counter() - started:.0f} s)"
            )
    await _quiet()
    sizes = sorted(node.dht.routing_table_size() for node in nodes)
    conns = sorted(len(node.host.connected_peers()) for node in nodes)
    progress(
        f"{BENCH}: routing tables min/median/max {sizes[0]}/{sizes[len(sizes) // 2]}/"
        f"{sizes[-1]}; connections {conns[0]}/{conns[len(conns) // 2]}/{conns[-1]}"
    )


async def _quiet() -> float:
    """Wait until this process's CPU use over one second falls below `QUIET_CPU`
    (or `QUIET_MAX_WAIT` passes); return the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < QUIET_MAX_WAIT:
        cpu, wall = time.process_time(), time.perf_counter()
        await trio.sleep(1.0)
        if (time.process_time() - cpu) / (time.perf_counter() - wall) < QUIET_CPU:
            break
    waited = time.perf_counter() - started
    _say(f"swarm quiet after {waited:.0f} s")
    return waited


def _make_models(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for seed, name in enumerate(names, start=1):
        path = folder / f"{name.replace(':', '_')}.gguf"
        generate_model(path, MODEL_SIZE, seed=seed)
        paths[name] = path
    return paths


async def _add(node: Node, name: str, path: Path) -> None:
    await trio.to_thread.run_sync(lambda: node.store.add_model(name, path))
    await node.refresh()


# ---------------------------------------------------------------------------- find


@dataclass(slots=True)
class _Sample:
    glob: str
    find: float
    exact: float
    miss: str | None
    exact_miss: bool


async def _measure_find(
    nodes: list[Node], holders: dict[str, Node], per_glob: int, rng: random.Random
) -> list[Figure]:
    plan: list[tuple[str, Node]] = []
    for glob in GLOBS:
        expected = [name for name in FIND_MODELS if glob_matches(glob, name)]
        # A holder would answer its own models from its store, without the network.
        askers = [n for n in nodes if all(holders[name] is not n for name in expected)]
        plan += [(glob, askers[i % len(askers)]) for i in range(per_glob)]
    rng.shuffle(plan)
    _say(f"{len(plan)} finds, each beside one exact-key lookup")
    samples: list[_Sample] = []
    for i, (glob, asker) in enumerate(plan):
        # Alternating which goes first spreads any warm-up (connections, caches) evenly.
        samples.append(await _sample(asker, glob, holders, exact_first=i % 2 == 0))
    misses = [s for s in samples if s.miss]
    for s in misses[:5]:
        _say(f"find {s.glob!r} miss: {s.miss}")
    exact_misses = sum(s.exact_miss for s in samples)
    if exact_misses:
        _say(f"{exact_misses} exact-key lookups did not find the holder")

    prefix = [s for s in samples if s.glob != NO_PREFIX]
    bare = [s for s in samples if s.glob == NO_PREFIX]

    def pair(name: str, chosen: list[_Sample], q: float) -> Figure:
        return Figure.against(
            BENCH,
            name,
            _percentile([s.find for s in chosen], q),
            "s",
            f"{EXACT} p{q:g}",
            _percentile([s.exact for s in chosen], q),
            better="lower",
        )

    return [
        pair("find p50", samples, 50),
        pair("find p95", samples, 95),
        pair("find p95, literal prefix", prefix, 95),
        pair("find p95, no prefix", bare, 95),
        Figure(BENCH, "find misses", len(misses), "count", better="lower"),
    ]


async def _sample(
    asker: Node, glob: str, holders: dict[str, Node], *, exact_first: bool
) -> _Sample:
    exact_name = GLOBS[glob]
    key = model_key(parse_model_name(exact_name))
    holder = holders[exact_name].peer_id

    exact_seconds = 0.0
    exact_miss = True

    async def exact() -> None:
        nonlocal exact_seconds, exact_miss
        started = time.perf_counter()
        with trio.move_on_after(FIND_TIMEOUT):
            found = await asker.dht.find_providers(key)
            exact_miss = all(p.peer_id != holder for p in found)
        exact_seconds = time.perf_counter() - started

    if exact_first:
        await exact()
    started = time.perf_counter()
    result = await asker.find(glob, timeout=FIND_TIMEOUT)
    find_seconds = time.perf_counter() - started
    if not exact_first:
        await exact()
    return _Sample(glob, find_seconds, exact_seconds, _wrong(result, glob, holders), exact_miss)


def _wrong(result: dict[str, object], glob: str, holders: dict[str, Node]) -> str | None:
    """What is wrong with a find result, or None: every matching model, each with its
    holder reachable, and nothing else."""
    expected = {name: holders[name].peer_id for name in FIND_MODELS if glob_matches(glob, name)}
    models = result["models"]
    assert isinstance(models, list)
    got = {m["name"]: m for m in models}
    missing = sorted(
        n for n, peer in expected.items() if peer not in got.get(n, {}).get("reachable", ())
    )
    extra = sorted(set(got) - set(expected))
    if not missing and not extra:
        return None
    return f"missing {missing}, unexpected {extra} after {result['seconds']} s"


# --------------------------------------------------------------------- propagation


@dataclass(slots=True)
class _Round:
    name: str  # full model:tag
    waiting: set[str]
    started: float = math.inf
    arrived: dict[str, float] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)


class _Watcher:
    """Notes when each node's ``_on_announcement`` has taken in a watched version.

    It wraps the callback the node gave its announcer, so the time is taken right
    after the node's own handler returns, and only if the version landed in the node's
    gossip table (a refused record does not count).
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.round: _Round | None = None
        for node in nodes:
            self._wrap(node)

    def _wrap(self, node: Node) -> None:
        announcer = node.announcer
        handler = announcer._on_records

        async def observed(peer_id: str, announcement: Announcement) -> None:
            if handler is not None:
                await handler(peer_id, announcement)
            now = time.perf_counter()
            current = self.round
            if current is None:
                return
            for record in announcement.records:
                landed = (record.name, record.version_id.hex()) in node._gossip
                if record.name == current.name and landed and node.peer_id in current.waiting:
                    current.waiting.discard(node.peer_id)
                    current.arrived[node.peer_id] = now - current.started
                    if not current.waiting:
                        current.done.set()

        announcer._on_records = observed


async def _measure_propagation(
    nodes: list[Node],
    watcher: _Watcher,
    names: Sequence[str],
    paths: dict[str, Path],
    rng: random.Random,
) -> list[Figure]:
    to_all: list[float] = []
    one_hop: list[float] = []
    misses = 0
    # Seeds are connected to every node from the start: not a typical origin.
    origins = rng.sample(nodes[SEEDS:], len(names))
    _say(f"{len(names)} rounds of announcing a new model")
    for i, (name, origin) in enumerate(zip(names, origins, strict=True)):
        others = [n for n in nodes if n is not origin]
        neighbour = await _mesh_neighbour(origin, others)
        watcher.round = current = _Round(parse_model_name(name).full, {n.peer_id for n in others})
        await trio.to_thread.run_sync(functools.partial(origin.store.add_model, name, paths[name]))
        await origin.refresh()
        # ``refresh`` queues the announcement as its last step, with no checkpoint after,
        # so nothing can have been sent before this instant.
        current.started = time.perf_counter()
        with trio.move_on_after(PROPAGATION_DEADLINE):
            await current.done.wait()
        watcher.round = None
        misses += len(current.waiting)
        all_seconds = max(current.arrived.values()) if not current.waiting else PROPAGATION_DEADLINE
        if neighbour is not None and neighbour.peer_id in current.arrived:
            hop = current.arrived[neighbour.peer_id]
        else:
            # No neighbour was in the mesh in time: the first node reached is one hop away.
            hop = min(current.arrived.values(), default=PROPAGATION_DEADLINE)
        to_all.append(all_seconds)
        one_hop.append(hop)
        progress(
            f"{BENCH}: round {i + 1}/{len(names)}: all {len(others)} reached in"
            f" {all_seconds:.3f} s{'' if not current.waiting else ' (NOT ALL)'},"
            f" 1 hop {hop:.3f} s; reached by 0.5/1/2/5 s: {_reached(current.arrived)}"
        )
        await _quiet()
    return [
        Figure.against(
            BENCH,
            "propagation p50 to all",
            statistics.median(to_all),
            "s",
            f"{ONE_HOP} p50",
            statistics.median(one_hop),
            better="lower",
        ),
        Figure.against(
            BENCH,
            "propagation max to all",
            max(to_all),
            "s",
            f"{ONE_HOP} max",
            max(one_hop),
            better="lower",
        ),
        Figure(BENCH, "propagation misses", misses, "count", better="lower"),
    ]


async def _mesh_neighbour(origin: Node, candidates: Sequence[Node]) -> Node | None:
    """A node in `origin`'s gossip mesh (so it gets what `origin` publishes first-hand),
    or None if none joined it within 10 s."""
    found: list[Node] = []
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:

            async def wait(node: Node) -> None:
                await origin.announcer.wait_for_peer(node.peer_id, in_mesh=True)
                found.append(node)
                nursery.cancel_scope.cancel()

            for node in candidates:
                if node.peer_id in origin.host.connected_peers():
                    nursery.start_soon(wait, node)
    return found[0] if found else None


# --------------------------------------------------------------------------- helpers

_run_started = time.perf_counter()


def _say(message: str) -> None:
    """Progress, stamped with the seconds since the run began."""
    progress(f"{BENCH} {time.perf_counter() - _run_started:4.0f}s: {message}")


def _reached(arrived: dict[str, float]) -> str:
    return "/".join(str(sum(t <= limit for t in arrived.values())) for limit in (0.5, 1, 2, 5))


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


_PEER_ID = re.compile(r"\b(?:12D3Koo|Qm)[1-9A-HJ-NP-Za-km-z]{20,}")


@contextmanager
def _tally_logs() -> Iterator[Counter[tuple[str, str]]]:
    """Count the nodes' warnings instead of printing them: at 50 nodes the routine ones
    (failed dials, reset streams) run to hundreds and would bury the progress lines.
    The most frequent are reported at the end."""
    counts: Counter[tuple[str, str]] = Counter()

    class Tally(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            gist = _PEER_ID.sub("<peer>", record.getMessage())[:100]
            counts[(record.levelname, f"{record.name}: {gist}")] += 1

    logger = logging.getLogger("dmm")
    handler = Tally(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield counts
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
