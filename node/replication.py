"""ReplicationManager (``node.replication``): policies, health checks and healing.

For every model in the store that a policy covers, the manager keeps a view of its
holders. Every ``health_check_interval`` it probes each known holder over
``/dmm/replicate/1`` — a ``Ping`` and a ``Have`` for one randomly sampled chunk, on a
stream kept per holder, under ``health_check_timeout`` — and marks it ``healthy``,
``degraded`` (late, or lacking the chunk) or ``unreachable`` (dial refused, or
``SILENT_PROBES`` probes in a row unanswered). Every ``policy_enforcement_interval`` (or a
policy's own ``sync_interval``, or at once after a policy change) it also rediscovers the
holders (DHT providers and gossip). After each round it acts, with no coordinator:

- fewer healthy, well-placed copies than ``min_replicas`` (or than the factor, on an
  enforcement round): the leader (lowest peer id among healthy holders) asks the peers
  ``replication_policy.placement`` ranks first, until ``replication_factor`` is reached;
- more than ``max_replicas``: each holder of a replica-only copy that
  ``replication_policy.releases`` names releases its own. A pinned copy (a user added,
  pulled or imported it here) is never released.

The target side (``node/replication_target.py``) decides a request by its own rules:
its capacity, its tags against the policy's constraints, its own policies' exclusions,
and its free worker slots. An accepted model is pulled with ``pinned=False`` and the
requester's policy is kept with it, so the copy can heal the model after the requester
is gone.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from node.p2p import P2PError
from node.replication_policy import (
    Candidate,
    HolderView,
    Policy,
    PolicyDefaults,
    leader,
    parse_policy,
    placement,
    releases,
    select_policy,
    spec_from_policy,
)
from node.replication_service import (
    PROTOCOL_ID,
    ReplicateClient,
    ReplicateError,
    ReplicateServer,
    open_replicate_client,
)
from node.replication_target import ReplicaTarget
from protocols.catalog import glob_matches
from protocols.replicate import (
    MAX_PEERS,
    HaveReply,
    ReplicateReply,
    ReplicateRequest,
    Status,
)
from storage.names import parse_model_name
from storage.store import ModelEntry

if TYPE_CHECKING:
    from node.daemon import Node

__all__ = ["ModelView", "ReplicaState", "ReplicationManager"]

log = logging.getLogger("dmm.replication")

POLICIES_SETTING = "replication.policies"
ADOPTED_SETTING = "replication.adopted"
PEER_ERRORS = (P2PError, ReplicateError, trio.BrokenResourceError, trio.TooSlowError, OSError)
# Probes in a row without an answer before a holder that still accepts connections is
# called unreachable. A dead process refuses the dial and is unreachable at once.
SILENT_PROBES = 3
# Resetting a probe stream we give up on never waits longer than this.
PROBE_RESET_WAIT = 2.0
# An accepted request counts as a copy for this long while the target fetches it.
PENDING_MIN = 60.0
# A candidate's status (free space, load, tags) is reused for this long: it changes
# slowly, and asking every peer again would put a round trip before every heal.
STATUS_TTL = 30.0
# Once enough candidates have answered, the rest get as long again as that took (at
# least this long) before placement goes ahead with whoever answered.
GATHER_GRACE_MIN = 0.05


def live_pending(
    pending: dict[str, float], holders: dict[str, ReplicaState], now: float
) -> dict[str, float]:
    """The peers asked to hold a copy that still count as one: their time to fetch it
    has not run out, and no probe has found them unreachable since (a peer that accepted
    and then died counted for the whole ``pending_for``, 60 s, before a heal)."""
    return {
        peer: due
        for peer, due in pending.items()
        if due > now and not (peer in holders and holders[peer].health == "unreachable")
    }


@dataclass(slots=True)
class ReplicaState:
    """One holder of one model, as the last check saw it."""

    peer_id: str
    health: str = "unknown"  # healthy | degraded | unreachable | unknown
    pinned: bool | None = None
    rtt_ms: float | None = None
    checked_at: float | None = None
    error: str | None = None
    timeouts: int = 0  # probes in a row that got no answer in time

    @property
    def counts(self) -> bool:
        """Whether this copy counts toward the policy: healthy, or merely slow (a loaded
        machine is not a lost copy; ``SILENT_PROBES`` silent probes in a row, or a refused
        dial, are)."""
        return self.health == "healthy" or (self.health == "degraded" and self.timeouts > 0)

    def to_json(self, local: bool) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "local": local,
            "health": self.health,
            "pinned": self.pinned,
            "rtt_ms": self.rtt_ms,
            "checked_at": self.checked_at,
            "error": self.error,
        }


@dataclass(slots=True)
class ModelView:
    name: str  # full host/namespace/model:tag
    display: str
    manifest_digest: str
    size: int
    policy: Policy | None
    sample_blob: str | None = None
    holders: dict[str, ReplicaState] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)  # peer -> deadline
    status: str = "unknown"
    discovered_at: float = 0.0


class ReplicationManager:
    """Owned by ``Node``; ``run`` serves ``/dmm/replicate/1`` and runs the checks."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config.replication
        self.defaults = PolicyDefaults(
            self.config.default_min_replicas,
            self.config.default_max_replicas,
            self.config.default_replication_factor,
        )
        self._policies: dict[str, Policy] = {p.glob: p for p in self.config.policies}
        self._adopted: dict[str, Policy] = {}
        self._views: dict[str, ModelView] = {}
        self.target = ReplicaTarget(self)
        self.server = ReplicateServer(self.target)
        # Peers a requester named as holding or asked (model -> peer -> deadline): they
        # count as copies in this node's first rounds, before it can see them itself.
        self._hints: dict[str, dict[str, float]] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_enforced: dict[str, float] = {}
        self._probe_streams: dict[str, ReplicateClient] = {}
        self._urgent: set[str] = set()  # globs of policies just set: their models first
        # The probing of the round under way, which a policy just set cuts short.
        self._probing: trio.CancelScope | None = None
        self._entries: list[ModelEntry] | None = None
        self._entries_key: tuple[tuple[str, str], ...] = ()
        self._entries_at = 0.0
        self._chunk_ids: dict[str, list[bytes]] = {}  # blob -> its chunk ids, for sampling
        self._statuses: dict[str, tuple[float, Status]] = {}  # peer -> (when, status)
        # For the benchmark and tests: when the last replication request was sent.
        self.requests_sent = 0
        self.last_request_at: float | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self._load_settings)
        self.node.host.set_stream_handler(PROTOCOL_ID, self.server.handle)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._loop()

    def _load_settings(self) -> None:
        db = self.node.store.db
        for raw in json.loads(db.get_setting(POLICIES_SETTING) or "[]"):
            policy = parse_policy(raw, self.defaults)
            self._policies[policy.glob] = policy
        for name, raw in json.loads(db.get_setting(ADOPTED_SETTING) or "{}").items():
            self._adopted[name] = parse_policy(raw, self.defaults)

    def _save_settings(self) -> None:
        db = self.node.store.db
        configured = {p.glob: p for p in self.config.policies}
        runtime = [p.to_json() for g, p in self._policies.items() if configured.get(g) != p]
        db.set_setting(POLICIES_SETTING, json.dumps(runtime))
        db.set_setting(
            ADOPTED_SETTING, json.dumps({n: p.to_json() for n, p in self._adopted.items()})
        )

    async def _loop(self) -> None:
        interval = self.config.health_check_interval
        while True:
            started = trio.current_time()
            await self.check_all(enforce=False)
            with trio.move_on_at(started + interval):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()

    # --- policies -----------------------------------------------------------------------

    def policies(self) -> list[Policy]:
        return list(self._policies.values())

    async def set_replication_policy(self, policy: Policy) -> None:
        """Add or replace (same glob) a policy; persisted, and enforced at once."""
        self._policies[policy.glob] = policy
        await trio.to_thread.run_sync(self._save_settings)
        self.node.audit.record(
            "policy",
            model=policy.glob,
            reason=f"replication: min {policy.min_replicas}, max {policy.max_replicas}, "
            f"factor {policy.replication_factor}",
        )
        log.info(
            "policy %r set: min %d, max %d, factor %d",
            policy.glob,
            policy.min_replicas,
            policy.max_replicas,
            policy.replication_factor,
        )
        # The models this policy covers go first and at once; the rest keep their turn.
        self._urgent.add(policy.glob)
        for name, view in self._views.items():
            if policy.matches(view.display):
                self._last_enforced.pop(name, None)
        self._entries = None  # models without a view yet are read again
        if self._probing is not None:
            # Probes only read: the round ends at once and the next starts with this
            # policy's models, rather than after a holder's probe times out.
            self._probing.cancel()
        self._wake.set()

    def wake(self) -> None:
        """Run a round now (a policy changed, or a replica arrived)."""
        self._wake.set()

    @property
    def pending_for(self) -> float:
        """How long an accepted request counts as a copy while the target fetches it."""
        return max(PENDING_MIN, 10 * self.config.health_check_interval)

    def policy_for(self, name_full: str, display: str) -> Policy | None:
        own = select_policy(self._policies.values(), display)
        return own if own is not None else self._adopted.get(name_full)

    # --- queries ------------------------------------------------------------------------

    def get_replicas(self, model: str) -> dict[str, Any]:
        name = parse_model_name(model)
        view = self._views.get(name.full)
        if view is None:
            raise KeyError(f"{name.display} is not held here, or no check has run yet")
        return self._view_json(view)

    def get_all_replicas(self) -> list[dict[str, Any]]:
        return [self._view_json(v) for _, v in sorted(self._views.items())]

    def health_counts(self) -> dict[str, int]:
        """Holders of the replicated models held here, by health (the metrics read it)."""
        counts: dict[str, int] = {}
        for view in self._views.values():
            for holder in view.holders.values():
                counts[holder.health] = counts.get(holder.health, 0) + 1
        return counts

    def _view_json(self, view: ModelView) -> dict[str, Any]:
        me = self.node.peer_id
        healthy = sum(1 for h in view.holders.values() if h.counts)
        return {
            "model": view.display,
            "name": view.name,
            "digest": view.manifest_digest,
            "size": view.size,
            "policy": None if view.policy is None else view.policy.to_json(),
            "healthy": healthy,
            "status": view.status,
            "pending": sorted(view.pending),
            "replicas": [
                h.to_json(p == me) for p, h in sorted(view.holders.items(), key=lambda kv: kv[0])
            ],
        }

    # --- the rounds ---------------------------------------------------------------------

    async def check_all(self, *, enforce: bool) -> None:
        """One round over every local model a policy covers; fixes what it finds."""
        if not self._policies and not self._adopted:
            # Nothing to replicate: a node that does not use replication pays nothing.
            self._views.clear()
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        # Reading every manifest each second would be most of a round's cost: re-read
        # only when the node published a change, and on enforcement rounds.
        key = tuple(sorted(self.node.published().items()))
        if (
            self._entries is None
            or key != self._entries_key
            or enforce
            or now - self._entries_at >= self.config.policy_enforcement_interval
        ):
            self._entries = await trio.to_thread.run_sync(self.node.store.list_models)
            self._entries_key, self._entries_at = key, now
        entries = self._entries
        seen: set[str] = set()
        work: list[tuple[bool, int, ModelView, bool]] = []
        for entry in entries:
            policy = self.policy_for(entry.name.full, entry.name.display)
            view = self._views.get(entry.name.full)
            if view is None or view.manifest_digest != entry.digest:
                layers = sorted(entry.manifest.layers, key=lambda layer: -layer.size)
                view = ModelView(
                    entry.name.full,
                    entry.name.display,
                    entry.digest,
                    entry.size,
                    policy,
                    layers[0].digest if layers else None,
                )
                self._views[entry.name.full] = view
                view.pending.update(self._hints.pop(entry.name.full, {}))
            view.policy = policy
            seen.add(entry.name.full)
            if policy is None:
                view.status = "no-policy"
                view.holders.setdefault(self.node.peer_id, ReplicaState(self.node.peer_id))
                continue
            every = policy.sync_interval or self.config.policy_enforcement_interval
            due = enforce or now - self._last_enforced.get(entry.name.full, -1e9) >= every
            urgent = any(glob_matches(g, entry.name.display) for g in self._urgent)
            work.append((urgent, policy.priority, view, due))
        for name in list(self._views):
            if name not in seen:
                del self._views[name]
        # Higher priority first, so a short worker pool heals the important models first.
        self._urgent.clear()
        for urgent, _, view, due in sorted(work, key=lambda w: (not w[0], -w[1])):
            if self._urgent:
                break  # a policy set during this round: the next one, at once, has it first
            if due:
                self._last_enforced[view.name] = trio.current_time()
                async with trio.open_nursery() as nursery:
                    if urgent:
                        # A policy just set will likely place copies: the candidates'
                        # statuses are asked during the DHT lookup, not after it, and
                        # whoever has not answered when it ends is asked again by _heal.
                        nursery.start_soon(self._warm_statuses, view)
                    await self._discover(view)
                    nursery.cancel_scope.cancel()
            with trio.CancelScope() as probing:
                self._probing = probing
                try:
                    await self._probe_all(view)
                finally:
                    self._probing = None
            if probing.cancelled_caught:
                if due:
                    self._last_enforced.pop(view.name, None)  # still due in the next round
                break
            await self._act(view, enforcing=due)
        self.node.changes.notify()

    async def _discover(self, view: ModelView) -> None:
        from node.daemon import model_key

        # Lookups run once per enforcement round; a loaded DHT gets a few seconds, and
        # what it found by then counts (a lookup cut short used to yield no holder at all).
        providers = await self.node.dht.find_providers(
            model_key(parse_model_name(view.name)),
            timeout=max(self.config.health_check_timeout, 5.0),
        )
        found = {info.peer_id for info in providers}
        for peer in found - set(view.holders):
            view.holders[peer] = ReplicaState(peer)
        view.discovered_at = trio.current_time()

    async def _probe_all(self, view: ModelView) -> None:
        me = self.node.peer_id
        for (full, _), peers in self.node.gossip_holders().items():
            if full == view.name:
                for peer in peers - set(view.holders):
                    view.holders[peer] = ReplicaState(peer)
        for peer in view.pending:
            view.holders.setdefault(peer, ReplicaState(peer))
        row = await trio.to_thread.run_sync(self.node.store.db.get_model, view.name)
        view.holders[me] = ReplicaState(
            me, "healthy", row is None or row.pinned, 0.0, time.time(), None
        )
        if view.sample_blob in self._chunk_ids:
            chunks = self._chunk_ids[view.sample_blob]
        else:
            chunks = await trio.to_thread.run_sync(self._sample_chunks, view.sample_blob)
        async with trio.open_nursery() as nursery:
            for peer in list(view.holders):
                if peer != me:
                    nursery.start_soon(self._probe, view, peer, chunks)

    def _sample_chunks(self, blob: str | None) -> list[bytes]:
        if blob is None:
            return []
        if blob not in self._chunk_ids:
            if len(self._chunk_ids) > 256:
                self._chunk_ids.clear()
            self._chunk_ids[blob] = [c.digest for c in self.node.store.db.blob_chunks(blob)]
        return self._chunk_ids[blob]

    async def _probe(self, view: ModelView, peer: str, chunks: list[bytes]) -> None:
        state = view.holders[peer]
        started = time.perf_counter()
        reply: HaveReply | None = None
        try:
            with trio.fail_after(self.config.health_check_timeout):
                for attempt in (1, 2):
                    reused = peer in self._probe_streams
                    client = await self._probe_client(peer)
                    try:
                        await client.ping()
                        state.rtt_ms = round((time.perf_counter() - started) * 1000, 2)
                        if chunks and view.sample_blob is not None:
                            chunk = random.choice(chunks)
                            reply = await client.have(view.name, view.sample_blob, chunk)
                        break
                    except BaseException as exc:
                        await self._drop_probe_client(peer)
                        # A kept stream the server has since closed: one fresh try.
                        broken = isinstance(
                            exc, trio.BrokenResourceError | trio.ClosedResourceError
                        )
                        if not (reused and broken and attempt == 1):
                            raise
        except trio.TooSlowError:
            state.timeouts += 1
            state.checked_at = time.time()
            state.error = f"no answer within {self.config.health_check_timeout:g}s"
            if state.timeouts < SILENT_PROBES:
                state.health = "degraded"
                return
            if state.health != "unreachable":
                log.info("model %s: holder %s unreachable (%s)", view.display, peer, state.error)
            state.health = "unreachable"
            return
        except PEER_ERRORS as exc:
            if state.health != "unreachable":
                log.info("model %s: holder %s unreachable (%r)", view.display, peer, exc)
            state.health, state.error = "unreachable", str(exc)[:200] or repr(exc)
            state.checked_at = time.time()
            return
        state.checked_at = time.time()
        state.error = None
        state.timeouts = 0
        if reply is not None and not reply.model_held:
            # Released, removed, or never held this tag: no longer a holder.
            del view.holders[peer]
            return
        state.pinned = None if reply is None else reply.pinned
        if reply is not None and not reply.chunk_held:
            state.health, state.error = "degraded", "missing the sampled chunk"
        else:
            state.health = "healthy"
        view.pending.pop(peer, None)

    async def _probe_client(self, peer: str) -> ReplicateClient:
        """The kept probe stream to ``peer``, opened on first use. One stream per holder
        for the node's life (or until it breaks) spares each probe the stream set-up."""
        client = self._probe_streams.get(peer)
        if client is None:
            stream = await self.node.host.open_stream(peer, PROTOCOL_ID)
            client = ReplicateClient(stream, self.config.health_check_timeout)
            self._probe_streams[peer] = client
        return client

    async def _drop_probe_client(self, peer: str) -> None:
        client = self._probe_streams.pop(peer, None)
        if client is not None:
            # Also when the probe was cancelled: a stream mid-exchange is not kept.
            with trio.CancelScope(shield=True), trio.move_on_after(PROBE_RESET_WAIT):
                await client.stream.reset()

    # --- acting -------------------------------------------------------------------------

    async def _act(self, view: ModelView, *, enforcing: bool) -> None:
        policy = view.policy
        assert policy is not None
        me = self.node.peer_id
        now = trio.current_time()
        view.pending = live_pending(view.pending, view.holders, now)
        healthy = {p: h for p, h in view.holders.items() if h.counts}
        for peer in [p for p, h in view.holders.items() if h.health == "unreachable"]:
            # Known dead holders stay listed (that is what `dmm replicas` should show),
            # but one the DHT no longer names and that stays down is forgotten.
            if now - view.discovered_at > 10 * self.config.policy_enforcement_interval:
                view.holders.pop(peer, None)
        count = len(set(healthy) | set(view.pending))
        views = [
            HolderView(p, bool(h.pinned), self.node.config.node.tags if p == me else None)
            for p, h in healthy.items()
        ]
        if count > policy.max_replicas or me in releases(view.name, policy, views):
            view.status = "over-replicated"
            if me in releases(view.name, policy, views):
                await self._release(view, len(healthy))
            return
        below = count < policy.min_replicas or (enforcing and count < policy.replication_factor)
        if not below:
            view.status = "healing" if view.pending else "ok"
            return
        if leader(healthy) != me:
            view.status = "under-replicated"
            return
        if view.status != "stuck":
            view.status = "under-replicated"
        needed = policy.replication_factor - count
        await self._heal(view, policy, needed)

    def _candidates(self) -> list[str]:
        """Peers that could be asked to hold a copy: connected ones and the DHT's."""
        peers = set(self.node.host.connected_peers()) | set(self.node.dht.routing_table_peers())
        peers.discard(self.node.peer_id)
        return sorted(peers)

    async def _candidate_statuses(
        self, view: ModelView, peers: list[str], needed: int
    ) -> dict[str, Status]:
        """The statuses of ``peers``: fresh cached ones, and the answers of the rest.

        Each asked peer gets health_check_timeout. Once ``needed`` have answered, the
        others get as long again as that took (at least `GATHER_GRACE_MIN`): placement
        ranks every peer that answers promptly without waiting on a slow one. While too
        few have answered, the slow ones are waited for (up to 5 s each).
        """
        now = trio.current_time()
        # Expired entries go, so peers long gone do not pile up in a long-running node.
        self._statuses = {p: e for p, e in self._statuses.items() if now - e[0] < STATUS_TTL}
        statuses = {p: self._statuses[p][1] for p in peers if p in self._statuses}
        asked = [p for p in peers if p not in statuses]
        enough, answered = trio.Event(), trio.Event()
        replies = 0

        def settle() -> None:
            if len(statuses) >= needed:
                enough.set()
            if replies == len(asked):
                enough.set()
                answered.set()

        async def ask(peer: str) -> None:
            nonlocal replies
            try:
                async with open_replicate_client(
                    self.node.host, peer, timeout=max(self.config.health_check_timeout, 5.0)
                ) as client:
                    status = await client.status()
                statuses[peer] = status
                self._statuses[peer] = (trio.current_time(), status)
            except PEER_ERRORS as exc:
                log.info("model %s: candidate %s gave no status (%s)", view.display, peer, exc)
            replies += 1
            settle()

        settle()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for peer in asked:
                nursery.start_soon(ask, peer)
            with trio.move_on_after(self.config.health_check_timeout):
                await enough.wait()
                took = trio.current_time() - started
                with trio.move_on_after(max(took, GATHER_GRACE_MIN)):
                    await answered.wait()
            if len(statuses) >= needed:
                nursery.cancel_scope.cancel()
        return statuses

    async def _warm_statuses(self, view: ModelView) -> None:
        """Fill the status cache from every candidate that answers (until cancelled)."""
        peers = self._candidates()
        await self._candidate_statuses(view, peers, len(peers))

    async def _heal(self, view: ModelView, policy: Policy, needed: int) -> None:
        exclude = set(view.holders) | set(view.pending)
        asked = [p for p in self._candidates() if p not in exclude]
        statuses = await self._candidate_statuses(view, asked, needed)
        candidates = [Candidate(p, s.tags, s.free, s.load) for p, s in statuses.items()]
        ranked = placement(view.name, view.size, policy, candidates)
        if not ranked:
            if view.status != "stuck":
                log.warning(
                    "model %s: %d more copies wanted, no suitable peer among %d candidate(s)",
                    view.display,
                    needed,
                    len(candidates),
                )
            view.status = "stuck"
            return
        log.info(
            "model %s: %d healthy copies, policy %r wants %d: asking %d candidate(s)",
            view.display,
            len([h for h in view.holders.values() if h.counts]),
            policy.glob,
            policy.replication_factor,
            len(ranked),
        )
        planned = [c.peer_id for c in ranked[:needed]]
        for candidate in ranked:
            if needed <= 0:
                break
            others = sorted({*view.holders, *view.pending, *planned} - {candidate.peer_id})
            reply = await self._request(view, policy, candidate.peer_id, others)
            if reply is not None and reply.accepted:
                needed -= 1
        if needed > 0:
            view.status = "stuck"
            log.warning(
                "model %s: %d more copies wanted, no suitable peer accepted", view.display, needed
            )

    async def _request(
        self, view: ModelView, policy: Policy, peer: str, others: list[str]
    ) -> ReplicateReply | None:
        if not self.node.acl.allowed(peer, "replicator", view.display):
            # [[access]] rules name who may be asked to hold a copy: not this peer.
            log.info("model %s: peer %s has no replicator role; not asked", view.display, peer)
            return ReplicateReply("policy", f"peer {peer} has no replicator role for this model")
        request = ReplicateRequest(
            view.name,
            view.manifest_digest,
            view.size,
            spec_from_policy(policy),
            tuple(others[:MAX_PEERS]),
        )
        try:
            async with open_replicate_client(self.node.host, peer, timeout=10) as client:
                self.requests_sent += 1
                self.last_request_at = time.perf_counter()
                reply = await client.replicate(request)
        except PEER_ERRORS as exc:
            log.info("model %s: replication request to %s failed (%s)", view.display, peer, exc)
            self._statuses.pop(peer, None)
            return None
        log.info(
            "model %s: peer %s answered %s%s",
            view.display,
            peer,
            reply.code,
            f" ({reply.reason})" if reply.reason else "",
        )
        self.node.audit.record(
            "replicate",
            peer=peer,
            model=view.display,
            version=view.manifest_digest,
            outcome="ok" if reply.accepted else "refused",
            reason=f"{reply.code}: {reply.reason}" if reply.reason else reply.code,
        )
        if reply.accepted:
            view.pending[peer] = trio.current_time() + self.pending_for
            view.holders.setdefault(peer, ReplicaState(peer))
            await self._fire("requested", view.display, peer=peer, code=reply.code)
        return reply

    async def replicate_model(self, model: str, peer: str) -> dict[str, Any]:
        """Ask ``peer`` to hold ``model`` (held here) under its policy, or the defaults."""
        name = parse_model_name(model)
        stored = await trio.to_thread.run_sync(self.node.store.layout.read, name)
        if stored is None:
            raise KeyError(f"{name.display} is not in this node's store")
        policy = self.policy_for(name.full, name.display) or parse_policy(
            {"glob": name.display}, self.defaults
        )
        view = self._views.get(name.full) or ModelView(
            name.full, name.display, stored.digest, stored.manifest.total_size, policy
        )
        self._views.setdefault(name.full, view)
        others = sorted(({*view.holders, *view.pending, self.node.peer_id}) - {peer})
        reply = await self._request(view, policy, peer, others)
        if reply is None:
            raise ConnectionError(f"peer {peer} could not be asked")
        return {"model": name.display, "peer": peer, "code": reply.code, "reason": reply.reason}

    async def _release(self, view: ModelView, healthy: int) -> None:
        freed = await trio.to_thread.run_sync(_release_blocking, self.node.store, view.name)
        if freed is None:
            return
        self._adopted.pop(view.name, None)
        await trio.to_thread.run_sync(self._save_settings)
        self._views.pop(view.name, None)
        await self.node.refresh()
        log.info(
            "model %s: replica-only copy released (%d healthy copies, max %d), %d bytes freed",
            view.display,
            healthy,
            view.policy.max_replicas if view.policy else 0,
            freed,
        )
        await self._fire("released", view.display, peer=self.node.peer_id, freed=freed)

    async def _fire(self, action: str, model: str, **details: Any) -> None:
        hooks = getattr(self.node, "hooks", None)
        if hooks is None:
            return
        try:
            result = hooks.fire("on-replica-change", model, action=action, **details)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # a broken hook must not stop replication
            log.warning("model %s: on-replica-change hook failed: %r", model, exc)


def _release_blocking(store: Any, name: str) -> int | None:
    """Remove a replica-only model and the blobs only it used; ``None`` if it is pinned
    (a user's copy) or gone."""
    row = store.db.get_model(name)
    if row is None or row.pinned:
        return None
    stored = store.remove(name)
    freed = 0
    with store.cas.gc_lock():
        referenced = set(store.references())
        for digest in stored.manifest.blob_digests():
            if digest not in referenced and store.cas.has(digest):
                freed += store.cas.size(digest) or 0
                store.cas.delete(digest)
                store.db.delete_blob(digest)
    return freed
