"""Replication across real nodes: policies reach their count, holders heal after a kill,
constraints and exclusions decide where copies go, refusals give reasons, and surplus
replica-only copies are released while pinned copies never are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node import replication_service
from node.changes import wait_until_any
from node.daemon import Node, model_key, open_node
from node.p2p import KAD_PROTOCOL_ID, Stream, open_host
from node.replication import ReplicaState, live_pending
from node.replication_policy import Policy, PolicyDefaults, parse_policy
from node.testing import node_config
from protocols.replicate import Have, HaveReply, ReplicateReply, ReplicateRequest, Status
from storage.names import parse_model_name
from tests.conftest import MakeModel, clean_env, dmm

MiB = 1024 * 1024
# Short intervals so a test sees several rounds in a few seconds; the timeout is generous
# because six nodes share this process on a shared machine.
FAST = (
    '[replication]\nhealth_check_interval = "2s"\nhealth_check_timeout = "2s"\n'
    'policy_enforcement_interval = "3s"\n'
)
MODEL = "replicated:v1"


def _extra(tags: dict[str, str] | None = None, replication: str = "") -> str:
    text = FAST + replication
    if tags:
        text += "[node.tags]\n" + "".join(f'{k} = "{v}"\n' for k, v in tags.items())
    return text


@asynccontextmanager
async def _swarm(
    root: Path, extras: Sequence[str], bootstrap: Sequence[str] = ()
) -> AsyncIterator[list[Node]]:
    """One in-process node per entry of ``extras``; all bootstrap from the first (or from
    ``bootstrap``)."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i, extra in enumerate(extras):
            boot = list(bootstrap) or ([nodes[0].host.listen_addrs[0]] if nodes else [])
            config = node_config(root, f"n{i}", boot, extra)
            nodes.append(await stack.enter_async_context(open_node(config)))
        yield nodes


def _holds(node: Node, name: str = MODEL) -> bool:
    return node.store.layout.read(parse_model_name(name)) is not None


def _holders(nodes: Sequence[Node], name: str = MODEL) -> set[str]:
    return {n.peer_id for n in nodes if _holds(n, name)}


async def _add(node: Node, make_model: MakeModel, name: str = MODEL) -> None:
    path = make_model(f"{name.replace(':', '_')}.gguf", size=2 * MiB)
    await trio.to_thread.run_sync(lambda: node.store.add_model(name, path))
    await node.refresh()


async def _settles(nodes: Sequence[Node], count: int, name: str = MODEL) -> set[str]:
    """Wait until exactly ``count`` nodes hold ``name`` and keep holding it for two health
    rounds (on a loaded machine a slow probe may overshoot for a moment: the
    surplus replica-only copy is then released, which is part of what this checks)."""
    changes = [node.changes for node in nodes]
    while True:
        held = _holders(nodes, name)
        if len(held) == count:
            # Settled if nothing moves for 4 s (two health rounds).
            with trio.move_on_after(4):
                await wait_until_any(changes, lambda held=held: _holders(nodes, name) != held)
                continue
            return held
        await wait_until_any(changes, lambda held=held: _holders(nodes, name) != held)


@pytest.mark.slow
async def test_policy_min_3_reaches_exactly_3_holders_and_api_reports_them(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with _swarm(tmp_path, [_extra()] * 6) as nodes:
        origin = nodes[0]
        await _add(origin, make_model)
        async with httpx.AsyncClient(base_url=origin.api_urls[0], timeout=30) as api:
            bad = await api.post("/api/policy", json={"glob": "replicated*", "min_replicas": 0})
            assert bad.status_code == 400 and "min_replicas" in bad.json()["error"]
            set_ = await api.post("/api/policy", json={"glob": "replicated*", "min_replicas": 3})
            assert set_.status_code == 200, set_.text
            assert set_.json()["policy"]["max_replicas"] == 3
            with trio.fail_after(60):
                holders = await _settles(nodes, 3)
            assert origin.peer_id in holders
            # The copies are replica-only; the origin's own copy is the user's.
            for node in nodes[1:]:
                if node.peer_id in holders:
                    row = node.store.db.get_model(parse_model_name(MODEL).full)
                    assert row is not None and row.pinned is False

            # The origin's view: the same three holders, each answering its probes.
            def all_healthy() -> bool:
                view = origin.replication.get_replicas(MODEL)
                health = {r["peer_id"]: r["health"] for r in view["replicas"]}
                return health == dict.fromkeys(holders, "healthy")

            with trio.fail_after(30):
                await origin.wait_until(all_healthy)
            shown = (await api.get("/api/replicas", params={"model": MODEL})).json()
            assert {r["peer_id"]: r["health"] for r in shown["replicas"]} == dict.fromkeys(
                holders, "healthy"
            )
            assert shown["healthy"] == 3 and shown["status"] == "ok"
            policies = (await api.get("/api/policy")).json()["policies"]
            assert [p["glob"] for p in policies] == ["replicated*"]
    # Persisted: the same store knows the policy after a restart.
    async with open_node(node_config(tmp_path, "n0")) as again:
        assert [p.glob for p in again.replication.policies()] == ["replicated*"]


@pytest.mark.slow
async def test_constraints_and_exclusions_decide_where_copies_go(
    tmp_path: Path, make_model: MakeModel
) -> None:
    regions = ["eu", "us", "eu", "us", "eu", "eu"]
    async with _swarm(tmp_path, [_extra({"region": r}) for r in regions]) as nodes:
        excluded = nodes[2]
        # The policy lives on the origin only; it travels with its requests.
        origin = nodes[0]
        await _add(origin, make_model)
        await origin.replication.set_replication_policy(
            _policy("replicated*", 3, excluded=[excluded.peer_id], region="eu")
        )
        with trio.fail_after(60):
            holders = await _settles(nodes, 3)
        assert holders == {nodes[0].peer_id, nodes[4].peer_id, nodes[5].peer_id}
        # Asked directly, the excluded and the us-tagged peers refuse, saying why.
        to_excluded = await origin.replication.replicate_model(MODEL, excluded.peer_id)
        assert to_excluded["code"] == "policy" and "excluded" in to_excluded["reason"]
        to_us = await origin.replication.replicate_model(MODEL, nodes[1].peer_id)
        assert to_us["code"] == "policy" and "region='eu'" in to_us["reason"]
        assert not _holds(excluded) and not _holds(nodes[1])


def _policy(
    glob: str, low: int, high: int | None = None, excluded: Sequence[str] = (), **tags: str
) -> Policy:

    raw: dict[str, object] = {"glob": glob, "min_replicas": low, "constraints": tags}
    if high is not None:
        raw["max_replicas"] = high
    raw["excluded_peers"] = list(excluded)
    return parse_policy(raw, PolicyDefaults())


async def test_refusals_give_their_reason(tmp_path: Path, make_model: MakeModel) -> None:
    small = _extra(replication='replica_capacity = "1KiB"\n')
    async with _swarm(tmp_path, [_extra(), small]) as (a, b):
        await _add(a, make_model)
        async with httpx.AsyncClient(base_url=a.api_urls[0], timeout=30) as api:
            answer = await api.post("/api/replicate", json={"model": MODEL, "peer": b.peer_id})
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert result["code"] == "capacity"
            assert "bytes" in result["reason"] and "free for replicas" in result["reason"]
            missing = await api.post(
                "/api/replicate", json={"model": "nothere:v1", "peer": b.peer_id}
            )
            assert missing.status_code == 404
            bad = await api.post("/api/replicate", json={"model": MODEL, "peer": "nope"})
            assert bad.status_code == 400
        assert not _holds(b)
        # The node is still up and answering after the refusals.
        async with httpx.AsyncClient(base_url=b.api_urls[0], timeout=10) as api:
            assert (await api.get("/api/health")).status_code == 200


async def test_a_candidate_slow_to_give_its_status_does_not_hold_up_placement(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """Placement asks every candidate for its status, but once enough have answered it
    goes ahead with them: a copy is requested while one candidate's status is still
    outstanding. (It used to wait for every candidate, up to health_check_timeout, here
    a minute: one stuck peer delayed every heal.)"""
    patient = (
        '[replication]\nhealth_check_interval = "60s"\nhealth_check_timeout = "60s"\n'
        'policy_enforcement_interval = "3s"\n'
    )
    async with _swarm(tmp_path, [patient] * 3) as (origin, quick, stuck):
        await _add(origin, make_model)
        asked, release, gave_up = trio.Event(), trio.Event(), trio.Event()
        answer_status = stuck.replication.target.answer_status

        async def stalled(peer_id: str) -> Status:
            asked.set()
            try:
                await release.wait()
            finally:
                # The server's answer deadline cancels us: the exchange is over.
                if not release.is_set():
                    gave_up.set()
            return await answer_status(peer_id)

        stuck.replication.target.answer_status = stalled  # type: ignore[method-assign]
        policy = {"glob": "replicated*", "min_replicas": 2}
        await origin.replication.set_replication_policy(parse_policy(policy, PolicyDefaults()))
        with trio.fail_after(30):
            await asked.wait()
            await quick.wait_until(lambda: _holds(quick))
        # Placed while the stalled status request was still outstanding.
        assert not gave_up.is_set()
        assert not _holds(stuck)
        release.set()


async def test_a_policy_set_mid_round_does_not_wait_for_a_holder_slow_to_answer(
    tmp_path: Path, make_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round probes each holder for up to health_check_timeout, here a minute, as
    long as the holder's server waits for its answer. A policy set while one holder's
    probe hung waited for that probe to end; now the probing is cut short, and the new
    policy's copy is asked for while the hung probe is still out."""
    monkeypatch.setattr(replication_service, "ANSWER_TIMEOUT", 60.0)
    patient = (
        '[replication]\nhealth_check_interval = "60s"\nhealth_check_timeout = "60s"\n'
        'policy_enforcement_interval = "60s"\n'
    )
    async with _swarm(tmp_path, [patient] * 3) as (origin, slow, spare):
        await _add(origin, make_model, "first:v1")
        await _add(slow, make_model, "first:v1")
        await _add(origin, make_model, "second:v1")
        hung, release, gave_up, asked = trio.Event(), trio.Event(), trio.Event(), trio.Event()
        answer_have = slow.replication.target.answer_have

        async def stalled(peer_id: str, request: Have) -> HaveReply:
            if parse_model_name(request.name).model == "first":
                hung.set()
                try:
                    await release.wait()
                finally:
                    if not release.is_set():  # the server's answer deadline cancelled us
                        gave_up.set()
            return await answer_have(peer_id, request)

        slow.replication.target.answer_have = stalled  # type: ignore[method-assign]
        for node in (slow, spare):
            answer = node.replication.target.answer_replicate

            async def noted(
                peer_id: str, request: ReplicateRequest, answer: Any = answer
            ) -> ReplicateReply:
                if parse_model_name(request.name).model == "second":
                    asked.set()
                return cast(ReplicateReply, await answer(peer_id, request))

            node.replication.target.answer_replicate = noted  # type: ignore[method-assign]
        first = {"glob": "first*", "min_replicas": 2}
        await origin.replication.set_replication_policy(parse_policy(first, PolicyDefaults()))
        with trio.fail_after(30):
            await hung.wait()
            second = {"glob": "second*", "min_replicas": 2}
            await origin.replication.set_replication_policy(parse_policy(second, PolicyDefaults()))
            await asked.wait()
        assert not gave_up.is_set()
        release.set()


async def _never_answer(stream: Stream) -> None:
    """A DHT peer that reads every request and answers none."""
    while await stream.receive_some():
        pass


async def test_dht_holders_count_when_a_dht_peer_never_answers(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """A holder lookup cut short by its deadline keeps the holders it found: one DHT peer
    that never answers must not hide them all (with 20 peers on a loaded machine every
    lookup ran past the deadline, and the node probed no holder at all)."""
    async with _swarm(tmp_path, [_extra()] * 2) as (a, b):
        await _add(a, make_model)
        await _add(b, make_model)
        key = model_key(parse_model_name(MODEL))
        with trio.fail_after(30):
            assert [p.peer_id for p in await a.dht.find_providers(key)] == [b.peer_id]
        # Gossip names b too: leave it out, so that only the DHT can.
        a.gossip_holders = dict  # type: ignore[method-assign]
        async with open_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as silent:
            silent.set_stream_handler(KAD_PROTOCOL_ID, _never_answer)
            with trio.fail_after(10):
                await a.host.connect(silent.listen_addrs[0])
            # One copy is enough and the factor is 1: nothing is asked of b, so b can
            # only enter a's view through discovery.
            policy = {"glob": "replicated*", "min_replicas": 1, "replication_factor": 1}
            await a.replication.set_replication_policy(parse_policy(policy, PolicyDefaults()))

            def b_healthy() -> bool:
                try:
                    replicas = a.replication.get_replicas(MODEL)["replicas"]
                except KeyError:  # no round yet
                    return False
                return any(r["peer_id"] == b.peer_id and r["health"] == "healthy" for r in replicas)

            with trio.fail_after(30):
                await a.wait_until(b_healthy)


@pytest.mark.slow
async def test_above_max_a_replica_only_copy_is_released_never_a_pinned_one(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with _swarm(tmp_path, [_extra()] * 4) as nodes:
        a, b, c, d = nodes
        await _add(a, make_model)

        async def quiet(event: object) -> None:
            pass

        with trio.fail_after(30):
            await b.pull(MODEL, quiet)  # a user's pulls: pinned
            await c.pull(MODEL, quiet)
        # Max 2 on every holder; three pinned copies exceed it, and must all stay.
        for node in (a, b, c):
            await node.replication.set_replication_policy(_policy("replicated*", 1, 2))
        answer = await a.replication.replicate_model(MODEL, d.peer_id)
        assert answer["code"] == "accepted"
        with trio.fail_after(30):
            await d.wait_until(lambda: _holds(d))
            # d took the copy with a's policy (max 2), saw four copies, released its own.
            await d.wait_until(
                lambda: not _holds(d) and d.store.db.get_model(parse_model_name(MODEL).full) is None
            )
        with trio.fail_after(30):
            assert await _settles(nodes, 3) == {a.peer_id, b.peer_id, c.peer_id}


# --- a real `dmm node start` process, killed ------------------------------------------------


def _process_config(root: Path, make_model: MakeModel) -> Path:
    config = node_config(
        root,
        "proc",
        extra=_extra(
            replication='[[replication.policy]]\nglob = "replicated*"\nmin_replicas = 3\n'
        ),
        fixed_ports=True,  # so the in-process nodes can bootstrap from it
    )
    assert config.path is not None
    gguf = make_model("proc.gguf", size=2 * MiB)
    dmm(config.path, "add", MODEL, str(gguf))
    return config.path


def _start_process(config: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "node", "start", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=open(config.parent / "node.log", "w"),  # noqa: SIM115 (closed with the process)
        text=True,
        env=clean_env(),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("dmm node "), first
    p2p = proc.stdout.readline().split()[1]
    return proc, first.split()[2], p2p


@pytest.mark.slow
async def test_killed_holder_process_is_replaced_within_a_health_interval_plus_transfer(
    tmp_path: Path, make_model: MakeModel
) -> None:
    config = _process_config(tmp_path, make_model)
    proc, proc_id, p2p = await trio.to_thread.run_sync(_start_process, config)
    try:
        async with _swarm(tmp_path, [_extra()] * 5, bootstrap=[p2p]) as nodes:
            with trio.fail_after(60):
                await _settles(nodes, 2)
            # The CLI against the process: its policy and its view of the replicas.
            shown = await trio.to_thread.run_sync(
                lambda: json.loads(dmm(config, "policy", "show", "--json").stdout)
            )
            assert [p["glob"] for p in shown["policies"]] == ["replicated*"]
            replicas = await trio.to_thread.run_sync(
                lambda: json.loads(dmm(config, "replicas", MODEL, "--json").stdout)
            )
            listed = {r["peer_id"]: r for r in replicas["replicas"]}
            assert _holders(nodes) | {proc_id} <= set(listed)
            assert listed[proc_id]["local"] and listed[proc_id]["pinned"]
            table = await trio.to_thread.run_sync(lambda: dmm(config, "replicas").stdout)
            assert "replicated:v1" in table and "healthy" in table
            usage = await trio.to_thread.run_sync(
                lambda: dmm(config, "policy", "set", "x*", "--require", "bad", check=2)
            )
            assert "key=value" in usage.stderr

            os.kill(proc.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(proc.wait)
            killed_at = trio.current_time()
            # One health interval (2 s) to notice (the dial is refused), then the 2 MiB
            # transfer; generous bounds, since the test machine is shared.
            with trio.fail_after(30):
                await wait_until_any([n.changes for n in nodes], lambda: len(_holders(nodes)) == 3)
            healed_in = trio.current_time() - killed_at
            print(f"healed in {healed_in:.2f}s")
            with trio.fail_after(30):
                await _settles(nodes, 3)
            survivor = next(n for n in nodes if _holds(n))

            def proc_unreachable() -> bool:
                view = survivor.replication.get_replicas(MODEL)
                states = {r["peer_id"]: r["health"] for r in view["replicas"]}
                return states.get(proc_id) == "unreachable" and view["healthy"] == 3

            with trio.fail_after(10):
                await survivor.wait_until(proc_unreachable)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_peer_asked_for_a_copy_stops_counting_once_found_unreachable() -> None:
    """A peer that accepted a copy counts as one until its time to fetch runs out, unless
    a probe finds it unreachable first: one that accepted and then died held a heal up
    for the whole 60 s (the replication benchmark's heal took 52-58 s)."""
    holders = {
        "fetching": ReplicaState("fetching", health="unknown"),
        "died": ReplicaState("died", health="unreachable"),
    }
    pending = {"fetching": 100.0, "died": 100.0, "unprobed": 100.0, "late": 5.0}
    assert live_pending(pending, holders, 10.0) == {"fetching": 100.0, "unprobed": 100.0}
