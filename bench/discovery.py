"""Finding models across a swarm of real nodes, and how fast an announcement reaches all.

The swarm grows to 50, 100 and 200 nodes (4 and 8 with ``--quick``) in this one process
on loopback, each a full ``open_node``. New nodes join as every node does: they dial the
one seed and refresh their routing tables once (``node.bootstrap``), ten at a time, each
ten once the ten before have joined; the first stage's nodes add small models. At every
size finds are measured (p95 against the exact-key lookup, and DHT hops: the query rounds of the
exact-key lookup's walk, ``node.p2p.trace_walks``); at the last size also:

- find: ``Node.find(glob)`` from many asking nodes, for globs with a literal prefix
  (``llama*``, ``mis*``: one ``/dmm/index/<p>`` key) and without (``*:q4``: the
  ``/dmm/index/`` key every holder provides). Beside each find, the same asker does one
  exact-key ``find_providers("/dmm/model/<name>")``: the least a DHT discovery costs.
  Every find result is checked (each matching model, with its holder reachable, and
  nothing else); wrong ones are counted as misses.
- propagation: one node adds a model and ``refresh()``es, which announces it over
  gossipsub. The figure is the time until every other node's ``_on_announcement`` has
  the version in its gossip table; the baseline is the time the same announcement took
  to reach one neighbour in the origin's gossip mesh (1 hop). A round in which some node
  is not reached within `PROPAGATION_DEADLINE` counts as that deadline (a lower bound)
  and its unreached nodes as misses.

Every node shares this one process, so on a 2-core machine they all share one core: the
absolute times are pessimistic, and each figure's baseline is measured at the same
moment of the same run. The goals (p95 find <= 1 s, propagation to all <= 2 s) are
absolute: as in ``bench.transfer``, each is named in its figure and handed to the runner
as the ratio goal absolute goal / baseline, which is met exactly when the value is.

Nearly all of a run is py-libp2p connection and stream set-up on one core. At commit
5d899cc the 50-node stage took about 3 minutes (join 84 s, the holders' provides 43 s,
30 finds 65 s) and the 100-node stage about 4; growing on to 200 makes it the longest
benchmark by far. Progress lines on stderr carry the elapsed seconds.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
import resource
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import Figure, progress, register
from node.config import Config
from node.daemon import Node, model_key, open_node
from node.p2p import trace_walks
from node.testing import node_config
from protocols.catalog import glob_matches
from protocols.records import Announcement, VersionRecord
from storage.names import parse_model_name
from storage.testmodels import generate_model

BENCH = "discovery"
# The swarm grows through these sizes; finds are measured at each, the rest at the last.
FULL_SIZES = (50, 100, 200)
QUICK_SIZES = (4, 8)
# New nodes bootstrap from one seed, as a LAN whose nodes all name one machine would.
SEEDS = 1
START_BATCH = 10
# A batch has joined (reached the seed, refreshed its table) by then, or the next starts
# anyway; every node of a growth step has joined by `JOIN_TIMEOUT` after the last batch.
BATCH_JOIN_TIMEOUT = 300.0
JOIN_TIMEOUT = 600.0
MiB = 1024 * 1024
MODEL_SIZE = 1 * MiB
FIND_TIMEOUT = 5.0
# 30 finds at every size (p95: the second slowest). A find and its exact lookup take up
# to 10 s, and at 200 nodes in one process most of that: 60 at the last size took 17 min.
FULL_SAMPLES_PER_GLOB = 10
QUICK_SAMPLES_PER_GLOB = 4
FULL_ROUNDS = 4
QUICK_ROUNDS = 2
PROPAGATION_DEADLINE = 15.0
# A round's origin announces, then provides its new model in the DHT. Its provides may
# run this long past the round (they are not what a round measures) and are then cut
# off: at 200 nodes one took 18 minutes on the saturated core.
ANNOUNCE_TIMEOUT = 120.0
PROVIDE_GRACE = 60.0
# Files a node holds besides its connections' sockets (listeners, its database): 5 for
# a node with no connection; the rest is room for API clients and files being read.
FILES_PER_NODE = 20
GOAL_FIND_P95 = 1.0  # seconds
GOAL_PROPAGATION = 2.0  # seconds to reach every node
# Between phases, wait until this process uses under this share of a core (an idle
# 50-node swarm measured 5-10%), so one phase's leftovers (dials, provides, gossip
# forwarding) do not land in the next one's times.
QUIET_CPU = 0.3
QUIET_MAX_WAIT = 60.0

# Different first letters, and two pairs sharing a prefix ("llama", "mis").
FIND_MODELS = ("llama-a:q4", "mistral-b:q4", "qwen-c:q4", "llama-d:q8", "mis-e:q4", "phi-f:q4")
# Each glob, and the model whose exact /dmm/model/<name> key is looked up beside it.
GLOBS = {"llama*": "llama-a:q4", "mis*": "mistral-b:q4", "*:q4": "qwen-c:q4"}
NO_PREFIX = "*:q4"
EXACT = "exact-key find_providers"
ONE_HOP = "1 hop (mesh neighbour)"


@register(BENCH)
def run(quick: bool) -> list[Figure]:
    """find(glob) vs an exact-key DHT lookup at 50/100/200 nodes; announcement to all vs 1 hop"""
    clock = _Clock()
    sizes = QUICK_SIZES if quick else FULL_SIZES
    with (
        _open_files_for(sizes[-1], clock),
        tempfile.TemporaryDirectory(prefix="dmm-bench-") as tmp,
        _tally_logs() as tally,
    ):
        figures = trio.run(_run, Path(tmp), quick, clock)
    seconds = clock.elapsed()
    clock.say(f"whole run {seconds:.0f} s, set-up and teardown included")
    for (level, gist), count in tally.most_common(5):
        clock.say(f"node log {level} x{count}: {gist}")
    return [*figures, Figure(BENCH, "run time", round(seconds, 1), "s", better="lower")]


async def _run(root: Path, quick: bool, clock: _Clock) -> list[Figure]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    per_glob = QUICK_SAMPLES_PER_GLOB if quick else FULL_SAMPLES_PER_GLOB
    rng = random.Random(1)
    folder = root / "gguf"
    folder.mkdir()
    announced = [f"zeta{i}:v1" for i in range(rounds)]
    paths = await trio.to_thread.run_sync(_make_models, folder, [*FIND_MODELS, *announced])

    figures: list[Figure] = []
    setup = 0.0
    async with _open_swarm(root / "nodes") as swarm:
        holders: dict[str, Node] = {}
        samples: list[_Sample] = []
        for size in sizes:
            clock.say(f"growing to {size} nodes ({SEEDS} seed, batches of {START_BATCH})")
            started = clock.elapsed()
            new = await swarm.grow(size, clock)
            await _bootstrap(swarm.nodes, new, clock)
            setup += clock.elapsed() - started
            if not holders:
                # Holders are spread over the first stage's non-seed nodes: the seed is
                # everyone's first contact, a shortcut no other holder has.
                others = swarm.nodes[SEEDS:]
                holders = {
                    name: others[i * len(others) // len(FIND_MODELS)]
                    for i, name in enumerate(FIND_MODELS)
                }
                clock.say(f"{len(set(holders.values()))} nodes add a model each and refresh")
                async with trio.open_nursery() as nursery:
                    for name, holder in holders.items():
                        nursery.start_soon(_add, holder, name, paths[name])
                await _quiet(clock)
            samples = await _sample_finds(swarm.nodes, holders, per_glob, rng, clock)
            figures += _growth_figures(size, samples)
        figures += _find_figures(samples, clock)
        nodes = swarm.nodes
        watcher = _Watcher(nodes)
        figures += await _measure_propagation(nodes, watcher, announced, paths, rng, clock)
        clock.say(f"measured; stopping {len(nodes)} nodes")
        stopping = clock.elapsed()
    clock.say(f"{len(nodes)} nodes stopped in {clock.elapsed() - stopping:.0f} s")
    return [*figures, Figure(BENCH, "swarm set-up", round(setup, 1), "s", better="lower")]


def _growth_figures(size: int, samples: list[_Sample]) -> list[Figure]:
    """Find latency and DHT hops at one size of the swarm."""
    hops = [s.hops for s in samples]
    return [
        Figure.against(
            BENCH,
            f"find p95 @{size} nodes",
            _percentile([s.find for s in samples], 95),
            "s",
            f"{EXACT} p95",
            _percentile([s.exact for s in samples], 95),
            better="lower",
        ),
        Figure(BENCH, f"DHT hops p50 @{size} nodes", _percentile(hops, 50), "hops", better="lower"),
        Figure(BENCH, f"DHT hops max @{size} nodes", max(hops), "hops", better="lower"),
    ]


# --------------------------------------------------------------------------- swarm


class _Swarm:
    """``node.testing.open_swarm``'s swarm (the seeds chained, the rest bootstrapping
    from them), grown a batch at a time and stopped all at once: one by one, 50 nodes
    took about a minute each way, every departure setting off the others' reconnects.

    A batch of `START_BATCH` nodes starts together, and the next once they have joined
    (or `BATCH_JOIN_TIMEOUT` passed), as a network grows. Started all at once, 100 new
    nodes joined a 100-node swarm within a minute: each join dials tens of peers (its
    lookups' walks) at about 40-50 ms of CPU a connection, both ends in this process, so
    the core had minutes of work; every lookup timed out, the nodes whose joins failed kept
    refreshing their thin routing tables, and the core stayed saturated for good (tables
    median 1-2 half an hour later, every find at 200 nodes missed).
    """

    def __init__(self, root: Path, nursery: trio.Nursery, stop: trio.Event) -> None:
        self.root = root
        self.nursery = nursery
        self.stop = stop
        self.nodes: list[Node] = []

    async def grow(self, count: int, clock: _Clock) -> list[Node]:
        """Start nodes until there are ``count``; returns the new ones."""
        before = len(self.nodes)
        while len(self.nodes) < min(count, SEEDS):
            boot = [n.host.listen_addrs[0] for n in self.nodes]
            config = node_config(self.root, f"n{len(self.nodes)}", boot)
            self.nodes.append(await self.nursery.start(_hold_node, config, self.stop))
        boot = [n.host.listen_addrs[0] for n in self.nodes[:SEEDS]]
        for first in range(len(self.nodes), count, START_BATCH):
            batch: dict[int, Node] = {}

            async def start(i: int, batch: dict[int, Node] = batch) -> None:
                config = node_config(self.root, f"n{i}", boot)
                batch[i] = await self.nursery.start(_hold_node, config, self.stop)

            started = clock.elapsed()
            async with trio.open_nursery() as starting:
                for i in range(first, min(first + START_BATCH, count)):
                    starting.start_soon(start, i)
            self.nodes.extend(batch[i] for i in sorted(batch))
            with trio.move_on_after(BATCH_JOIN_TIMEOUT):
                for node in batch.values():
                    await node.bootstrap.joined.wait()
            joined = sum(node.bootstrap.joined.is_set() for node in batch.values())
            clock.say(
                f"{len(self.nodes) - before}/{count - before} new nodes started;"
                f" the last {len(batch)} joined {joined} in {clock.elapsed() - started:.0f} s"
            )
        return self.nodes[before:]


@asynccontextmanager
async def _open_swarm(root: Path) -> AsyncIterator[_Swarm]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            yield _Swarm(root, nursery, stop)
        finally:
            stop.set()


async def _hold_node(
    config: Config, stop: trio.Event, *, task_status: trio.TaskStatus[Node]
) -> None:
    async with open_node(config) as node:
        task_status.started(node)
        await stop.wait()


async def _bootstrap(nodes: list[Node], new: list[Node], clock: _Clock) -> None:
    """Wait until every new node has joined as any node does (``node.bootstrap``): it
    reached the seed and its routing-table refresh is over. The older nodes learn of the
    new ones from their queries, as in Kademlia.

    A second refresh of every new table, one at a time, made fuller tables, but took
    ~10 s a node at 200 nodes in this one process: most of the run, for tables no real
    node has just after it joins.
    """
    with trio.move_on_after(JOIN_TIMEOUT):
        for node in new:
            if node not in nodes[:SEEDS]:
                await node.bootstrap.joined.wait()
    late = [n for n in new if n not in nodes[:SEEDS] and not n.bootstrap.joined.is_set()]
    if late:
        never = sum(n.bootstrap.connects == 0 for n in late)
        raise RuntimeError(
            f"{len(late)} of {len(new)} new nodes had not joined after {JOIN_TIMEOUT:.0f} s:"
            f" {never} never reached the seed"
            f" ({sum(n.bootstrap.failed_dials for n in late)} failed dials),"
            f" {len(late) - never} reached it and were still refreshing their routing tables"
        )
    await _quiet(clock)
    tables = sorted(node.dht.routing_table_size() for node in nodes)
    conns = sorted(len(node.host.connected_peers()) for node in nodes)
    clock.say(
        f"routing tables min/median/max {tables[0]}/{tables[len(tables) // 2]}/{tables[-1]},"
        f" connections {conns[0]}/{conns[len(conns) // 2]}/{conns[-1]}"
    )


async def _quiet(clock: _Clock) -> None:
    """Wait until this process's CPU use over one second falls below `QUIET_CPU`, or
    `QUIET_MAX_WAIT` passes."""
    started = time.perf_counter()
    share = math.inf
    while time.perf_counter() - started < QUIET_MAX_WAIT:
        cpu, wall = time.process_time(), time.perf_counter()
        await trio.sleep(1.0)
        share = (time.process_time() - cpu) / (time.perf_counter() - wall)
        if share < QUIET_CPU:
            clock.say(f"swarm quiet after {time.perf_counter() - started:.0f} s")
            return
    clock.say(
        f"swarm NOT quiet after {time.perf_counter() - started:.0f} s:"
        f" {share:.0%} of a core over the last second"
    )


def _make_models(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for seed, name in enumerate(names, start=1):
        path = folder / f"{name.replace(':', '_')}.gguf"
        generate_model(path, MODEL_SIZE, seed=seed)
        paths[name] = path
    return paths


async def _add(node: Node, name: str, path: Path) -> None:
    await trio.to_thread.run_sync(functools.partial(node.store.add_model, name, path))
    await node.refresh()


# ---------------------------------------------------------------------------- find


@dataclass(slots=True)
class _Sample:
    glob: str
    find: float
    exact: float
    wrong: str | None  # what the find result got wrong
    exact_missed: bool  # the exact-key lookup did not list the holder
    hops: int  # query rounds of the exact-key lookup's walk


async def _sample_finds(
    nodes: list[Node],
    holders: dict[str, Node],
    per_glob: int,
    rng: random.Random,
    clock: _Clock,
) -> list[_Sample]:
    plan: list[tuple[str, Node]] = []
    for glob in GLOBS:
        # A holder would answer its own models from its store, without the network.
        busy = {holders[name].peer_id for name in FIND_MODELS if glob_matches(glob, name)}
        askers = [n for n in nodes if n.peer_id not in busy]
        rng.shuffle(askers)
        plan += [(glob, askers[i % len(askers)]) for i in range(per_glob)]
    rng.shuffle(plan)
    clock.say(f"{len(plan)} finds, each beside one exact-key lookup by the same node")
    samples: list[_Sample] = []
    for i, (glob, asker) in enumerate(plan):
        # Alternating which goes first spreads any warm-up (a dial, a cache) over both.
        samples.append(await _sample(asker, glob, holders, exact_first=i % 2 == 0))
        if (i + 1) % 10 == 0 and i + 1 < len(plan):
            clock.say(f"{i + 1}/{len(plan)} finds done")
    return samples


def _find_figures(samples: list[_Sample], clock: _Clock) -> list[Figure]:
    wrong = [s for s in samples if s.wrong]
    for s in wrong:
        clock.say(f"find {s.glob!r} wrong: {s.wrong}")
    prefix = [s for s in samples if s.glob != NO_PREFIX]
    bare = [s for s in samples if s.glob == NO_PREFIX]

    def against_exact(
        name: str, chosen: list[_Sample], q: float, goal: float | None = None
    ) -> Figure:
        baseline = _percentile([s.exact for s in chosen], q)
        return Figure.against(
            BENCH,
            name,
            _percentile([s.find for s in chosen], q),
            "s",
            f"{EXACT} p{q:g}",
            baseline,
            better="lower",
            goal=None if goal is None else goal / baseline,
        )

    return [
        against_exact("find p50", samples, 50),
        against_exact(f"find p95 (goal <= {GOAL_FIND_P95:g} s)", samples, 95, GOAL_FIND_P95),
        against_exact("find p95, literal prefix", prefix, 95),
        against_exact("find p95, no prefix", bare, 95),
        Figure(BENCH, "find misses", len(wrong), "count", better="lower"),
        Figure(
            BENCH, "exact-key misses", sum(s.exact_missed for s in samples), "count", better="lower"
        ),
    ]


async def _sample(
    asker: Node, glob: str, holders: dict[str, Node], *, exact_first: bool
) -> _Sample:
    exact_name = GLOBS[glob]
    key = model_key(parse_model_name(exact_name))
    holder = holders[exact_name].peer_id
    exact_seconds = 0.0
    exact_missed = True
    hops = 0

    async def exact() -> None:
        nonlocal exact_seconds, exact_missed, hops
        started = time.perf_counter()
        with trio.move_on_after(FIND_TIMEOUT), trace_walks() as walks:
            found = await asker.dht.find_providers(key)
            exact_missed = all(p.peer_id != holder for p in found)
        exact_seconds = time.perf_counter() - started
        hops = sum(w.rounds for w in walks)

    if exact_first:
        await exact()
    started = time.perf_counter()
    result = await asker.find(glob, timeout=FIND_TIMEOUT)
    find_seconds = time.perf_counter() - started
    if not exact_first:
        await exact()
    wrong = _wrong(result, glob, holders)
    return _Sample(glob, find_seconds, exact_seconds, wrong, exact_missed, hops)


def _wrong(result: dict[str, Any], glob: str, holders: dict[str, Node]) -> str | None:
    """What a find result got wrong, or None if it lists every model `glob` matches,
    each with its holder reachable, and nothing else."""
    expected = {name: holders[name].peer_id for name in FIND_MODELS if glob_matches(glob, name)}
    got = {m["name"]: m for m in result["models"]}
    # Not found (the lookup missed the holder) is a different failure from found but not
    # answering in time (the ask ran out of time).
    asked_silent = set(result["providers_silent"])
    missing = [n for n, p in expected.items() if p not in got.get(n, {}).get("reachable", ())]
    silent = sorted(n for n in missing if expected[n] in asked_silent)
    unfound = sorted(n for n in missing if expected[n] not in asked_silent)
    extra = sorted(set(got) - set(expected))
    if not unfound and not silent and not extra:
        return None
    return (
        f"not found {unfound}, found but no answer {silent}, unexpected {extra},"
        f" after {result['seconds']} s"
    )


# --------------------------------------------------------------------- propagation


@dataclass(slots=True)
class _Round:
    name: str  # full model:tag of the announced version
    waiting: set[str]  # peer ids of the nodes that have not taken it in yet
    started: float = math.inf  # when the origin queued the announcement
    arrived: dict[str, float] = field(default_factory=dict)  # peer id -> seconds
    announced: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


class _Watcher:
    """Notes when each node's ``_on_announcement`` has taken in the watched version.

    The node hands ``_on_announcement`` to its announcer as ``on_records``, and there is
    no other hook; wrapping it times the moment the node's own handler returns, and a
    record counts only once the node lists its author among ``gossip_holders()`` (a
    refused record is not listed).
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.round: _Round | None = None
        for node in nodes:
            self._wrap(node)

    def _wrap(self, node: Node) -> None:
        announce_nowait = node.announcer.announce_nowait

        def announcing(records: Sequence[VersionRecord], addrs: Sequence[str] = ()) -> None:
            current = self.round
            if current is not None and any(r.name == current.name for r in records):
                # Queued here, sent by the announcer's task: nothing has left yet.
                current.started = time.perf_counter()
                current.announced.set()
            announce_nowait(records, addrs)

        node.announcer.announce_nowait = announcing  # type: ignore[method-assign]
        handler = node.announcer._on_records

        async def observed(peer_id: str, announcement: Announcement) -> None:
            if handler is not None:
                await handler(peer_id, announcement)
            now = time.perf_counter()
            current = self.round
            if current is None or node.peer_id not in current.waiting:
                return
            for record in announcement.records:
                key = (record.name, record.version_id.hex())
                if record.name == current.name and key in node.gossip_holders():
                    current.waiting.discard(node.peer_id)
                    current.arrived[node.peer_id] = now - current.started
                    if not current.waiting:
                        current.done.set()

        node.announcer._on_records = observed


async def _measure_propagation(
    nodes: list[Node],
    watcher: _Watcher,
    names: Sequence[str],
    paths: dict[str, Path],
    rng: random.Random,
    clock: _Clock,
) -> list[Figure]:
    to_all: list[float] = []
    one_hop: list[float] = []
    misses = 0
    # The seed is connected to every node from the start: not a typical origin.
    origins = rng.sample(nodes[SEEDS:], len(names))
    clock.say(f"{len(names)} rounds: one node announces a new model")
    for i, (name, origin) in enumerate(zip(names, origins, strict=True), start=1):
        others = [n for n in nodes if n is not origin]
        neighbour = await _mesh_neighbour(origin, others)
        current = _Round(parse_model_name(name).full, {n.peer_id for n in others})
        watcher.round = current
        async with trio.open_nursery() as nursery:
            # ``refresh`` announces the new version as soon as it is signed, then
            # provides it in the DHT: the round is timed from the announcement.
            nursery.start_soon(_add, origin, name, paths[name])
            with trio.move_on_after(ANNOUNCE_TIMEOUT):
                await current.announced.wait()
            if current.announced.is_set():
                with trio.move_on_at(trio.current_time() + PROPAGATION_DEADLINE):
                    await current.done.wait()
            else:
                clock.say(f"round {i}: the origin did not announce in {ANNOUNCE_TIMEOUT:g} s")
            watcher.round = None
            nursery.cancel_scope.deadline = trio.current_time() + PROVIDE_GRACE
        if nursery.cancel_scope.cancelled_caught:
            clock.say(f"round {i}: the origin's provides cut off {PROVIDE_GRACE:g} s after it")
        misses += len(current.waiting)
        arrived = current.arrived
        every = PROPAGATION_DEADLINE if current.waiting else max(arrived.values())
        if neighbour is not None and neighbour.peer_id in arrived:
            hop = arrived[neighbour.peer_id]
        else:
            # No neighbour joined the mesh in time: the first node reached is 1 hop away.
            hop = min(arrived.values(), default=PROPAGATION_DEADLINE)
        to_all.append(every)
        one_hop.append(hop)
        late = f", {len(current.waiting)} NOT reached" if current.waiting else ""
        clock.say(
            f"round {i}: all {len(others)} in {every:.2f} s{late}, 1 hop {hop:.2f} s;"
            f" reached within 0.5/1/2/5 s: {_reached_by(arrived, (0.5, 1, 2, 5))}"
        )
        await _quiet(clock)
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
            f"propagation max to all (goal <= {GOAL_PROPAGATION:g} s)",
            max(to_all),
            "s",
            f"{ONE_HOP} max",
            max(one_hop),
            better="lower",
            goal=GOAL_PROPAGATION / max(one_hop),
        ),
        Figure(BENCH, "propagation misses", misses, "count", better="lower"),
    ]


async def _mesh_neighbour(origin: Node, candidates: Sequence[Node]) -> Node | None:
    """A node in `origin`'s gossip mesh, which gets what `origin` publishes first-hand;
    None if none is in it within 10 s."""
    found: list[Node] = []
    connected = set(origin.host.connected_peers())
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:

            async def wait(node: Node) -> None:
                await origin.announcer.wait_for_peer(node.peer_id, in_mesh=True)
                found.append(node)
                nursery.cancel_scope.cancel()

            for node in candidates:
                if node.peer_id in connected:
                    nursery.start_soon(wait, node)
    return found[0] if found else None


# --------------------------------------------------------------------------- helpers


class _Clock:
    """Seconds since the run began, and progress lines stamped with them."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def say(self, message: str) -> None:
        progress(f"{BENCH} {self.elapsed():4.0f}s: {message}")


@contextmanager
def _open_files_for(nodes: int, clock: _Clock) -> Iterator[None]:
    """Raise this process's open-file limit so `nodes` nodes fit, for the run.

    Every connection between two nodes of this one process holds a socket at each end.
    Before connections were trimmed (defect 35 in node/p2p.py) nodes connected to most of
    the others, and 180 nodes ran out of a 20,000-file limit; trimmed, 170 nodes held
    about 10,400. The worst case, all to all, is what is asked for. A node in its own
    process needs one file per connection. Raising the hard limit takes CAP_SYS_RESOURCE (root
    outside a container); without it the soft limit goes up to the hard one, and a
    limit short of the worst case is reported.
    """
    needed = nodes * (nodes - 1) + nodes * FILES_PER_NODE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(wanted, hard)), hard))
        clock.say(
            f"open-file limit {min(wanted, hard)}, under the {needed} that {nodes} nodes"
            " connected to each other may need: raise the hard limit (ulimit -Hn, which"
            " takes CAP_SYS_RESOURCE) if the run fails with 'Too many open files'"
        )
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: always a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _reached_by(arrived: dict[str, float], limits: Sequence[float]) -> str:
    return "/".join(str(sum(t <= limit for t in arrived.values())) for limit in limits)


_PEER_ID = re.compile(r"\b(?:12D3Koo|Qm)[1-9A-HJ-NP-Za-km-z]{20,}")


@contextmanager
def _tally_logs() -> Iterator[Counter[tuple[str, str]]]:
    """Count the nodes' warnings instead of printing them: at 50 nodes the routine ones
    (failed dials, reset streams, gossip back-offs) run to hundreds and would bury the
    progress lines. The most frequent are reported at the end of the run."""
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
