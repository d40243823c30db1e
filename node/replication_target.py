"""The target side of ``/dmm/replicate/1``: answering probes, status and requests.

``ReplicaTarget`` is the ``ReplicaSource`` the ReplicationManager's server answers from.
A request is decided by this node's own rules — its capacity (free disk, and
``[replication] replica_capacity``), its tags against the requester's constraints, its own
policies' exclusions, and its free worker slots — and an accepted model is pulled in the
background as a replica-only copy (``pinned=False``), keeping the requester's policy.
"""

from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING, Any

import trio

from node.replication_policy import Policy, policy_from_spec, select_policy
from protocols.replicate import Have, HaveReply, ReplicateReply, ReplicateRequest, Status
from storage.names import InvalidName, parse_model_name

if TYPE_CHECKING:
    from node.replication import ReplicationManager

__all__ = ["DISK_RESERVE", "ReplicaTarget"]

log = logging.getLogger("dmm.replication")

# Free disk a node keeps for itself when it takes replicas.
DISK_RESERVE = 256 * 1024 * 1024


class ReplicaTarget:
    def __init__(self, manager: ReplicationManager) -> None:
        self.manager = manager
        self.jobs: dict[str, str] = {}  # model being fetched for a peer -> that peer

    async def answer_have(self, peer_id: str, request: Have) -> HaveReply:
        return await trio.to_thread.run_sync(self._have_blocking, request)

    def _have_blocking(self, request: Have) -> HaveReply:
        store = self.manager.node.store
        stored = store.layout.read(parse_model_name(request.name))
        if stored is None:
            return HaveReply(False, False, False)
        row = store.db.get_model(request.name)
        pinned = row is None or row.pinned
        chunk_held = store.cas.has(request.blob) and any(
            loc.blob == request.blob for loc in store.db.find_chunk(request.chunk)
        )
        return HaveReply(True, chunk_held, pinned)

    def _free_for_replicas(self) -> int:
        store = self.manager.node.store
        free = shutil.disk_usage(store.layout.models_dir).free - DISK_RESERVE
        if self.manager.config.replica_capacity:
            used = sum(r.size for r in store.db.all_models() if not r.pinned)
            free = min(free, self.manager.config.replica_capacity - used)
        return max(free, 0)

    async def answer_status(self, peer_id: str) -> Status:
        free = await trio.to_thread.run_sync(self._free_for_replicas)
        return Status(dict(self.manager.node.config.node.tags), free, len(self.jobs))

    async def answer_replicate(self, peer_id: str, request: ReplicateRequest) -> ReplicateReply:
        reply = await self._decide(peer_id, request)
        self.manager.node.audit.record(
            "replicate",
            peer=peer_id,
            model=request.name,
            version=request.manifest_digest,
            outcome="ok" if reply.accepted else "refused",
            reason=f"asked to hold it: {reply.code} {reply.reason}".strip(),
        )
        log.info(
            "model %s: replication request from %s: %s%s",
            request.name,
            peer_id,
            reply.code,
            f" ({reply.reason})" if reply.reason else "",
        )
        return reply

    async def _decide(self, peer_id: str, request: ReplicateRequest) -> ReplicateReply:
        me = self.manager.node.peer_id
        name = parse_model_name(request.name)
        try:
            policy = policy_from_spec(request.policy)
        except ValueError as exc:
            return ReplicateReply("policy", f"unusable policy: {exc}")
        if request.name in self.jobs:
            return ReplicateReply("accepted", "already fetching it")
        stored = await trio.to_thread.run_sync(self.manager.node.store.layout.read, name)
        if stored is not None and stored.digest == request.manifest_digest:
            self._adopt(request.name, policy)
            return ReplicateReply("holding", "")
        tags = self.manager.node.config.node.tags
        own = select_policy(self.manager._policies.values(), name.display)
        for rules in (policy, own):
            why = None if rules is None else rules.allows(me, tags)
            if why is not None:
                return ReplicateReply("policy", why)
        free = await trio.to_thread.run_sync(self._free_for_replicas)
        if request.size > free:
            return ReplicateReply(
                "capacity", f"needs {request.size} bytes, {free} free for replicas here"
            )
        if request.name in self.jobs:
            return ReplicateReply("accepted", "already fetching it")
        if len(self.jobs) >= self.manager.config.worker_count:
            return ReplicateReply("busy", f"{len(self.jobs)} replication jobs running")
        if self.manager._nursery is None:
            return ReplicateReply("busy", "the node is starting")
        self.jobs[request.name] = peer_id
        self._adopt(request.name, policy)
        deadline = trio.current_time() + self.manager.pending_for
        self.manager._hints[request.name] = {
            p: deadline for p in (*request.peers, peer_id) if p != self.manager.node.peer_id
        }
        self.manager._nursery.start_soon(self._fetch, request.name, peer_id)
        return ReplicateReply("accepted", "")

    def _adopt(self, name: str, policy: Policy) -> None:
        self.manager._adopted[name] = policy
        if self.manager._nursery is not None:
            self.manager._nursery.start_soon(trio.to_thread.run_sync, self.manager._save_settings)

    async def _fetch(self, name: str, requester: str) -> None:
        from node.pull import PEER_ERRORS as PULL_PEER_ERRORS
        from node.pull import PullError, pull_model

        async def quiet(event: dict[str, Any]) -> None:
            pass

        node = self.manager.node
        errors = (PullError, *PULL_PEER_ERRORS, InvalidName)
        result: dict[str, Any] | None = None
        try:
            # From the requester first (no lookups); if that fails, from any holder found.
            for peers in ([requester], []):
                try:
                    result = await pull_model(node, name, quiet, pinned=False, peers=peers)
                    break
                except errors as exc:
                    log.warning(
                        "model %s: replica for %s not fetched%s: %s",
                        name,
                        requester,
                        " from it" if peers else "",
                        exc,
                    )
        except Exception as exc:  # e.g. a transfer error wrapped in an ExceptionGroup:
            # a replica this node offered to keep must never take the node down.
            log.error("model %s: replica for %s failed: %r", name, requester, exc)
        finally:
            self.jobs.pop(name, None)
        if result is None:
            return
        log.info(
            "model %s: replica-only copy fetched for %s (%d bytes)",
            name,
            requester,
            result.get("bytes_fetched", 0),
        )
        await self.manager._fire("added", name, peer=self.manager.node.peer_id, requester=requester)
        self.manager.wake()
