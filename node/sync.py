"""SyncManager: followed models kept at the version their sync policy settles on.

A model is followed when a policy's glob matches its ``name:tag`` (``[sync] follow``,
``[[sync.policies]]``, or policies added at run time through the API, which are kept in
the database). A followed model is synced every policy interval and at once when a peer
announces a version of it. A sync asks peers for their version records
(``/dmm/catalog/1``), keeps the valid ones, and settles the model's DAG
(``protocols.dag``): with one head the local Ollama manifest moves to it; with heads naming
different manifests (a conflict) the policy's strategy picks the winner, the node signs a
merge record (parents: the conflicting heads; manifest: the winner's), switches the local
manifest to the winner (fetching what it lacks), and with ``keep-both`` keeps each loser
under ``<tag>-conflict-<12 hex>``. ``manual`` leaves the model as it is until
``resolve_conflict``. Every node computes the same winner from the same records.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from node.catalog_service import open_catalog_client
from node.config import SYNC_TYPES, SyncPolicy
from node.pull import PEER_ERRORS, PullError, fetch_version_data, write_model
from node.sync_conflicts import FETCH_ERRORS, ConflictKeeper
from node.sync_policies import PolicyBook
from protocols.catalog import display_name
from protocols.dag import (
    Resolution,
    SyncStateName,
    VersionDag,
    compare_heads,
    resolve,
    should_sign_merge,
)
from protocols.errors import ProtocolError
from protocols.records import VersionRecord
from storage.manifest import Manifest
from storage.names import InvalidName, ModelName, parse_model_name
from storage.store import StoreError

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("dmm.sync")

PEER_TIMEOUT = 15.0
FIRST_PASS_DELAY = 10.0


class SyncError(RuntimeError):
    """A sync or resolve request that cannot be done; the message says why, in one line."""


class LocalChange(Exception):
    """The name's manifest changed here (an add, a pull, a create) while a sync worked."""


# `switch(replacing=ANY_MANIFEST)`: write whatever the name points at now.
ANY_MANIFEST = "*"


@dataclass(slots=True)
class PeerState:
    """How one model stands on this node against one peer."""

    model: str  # host/namespace/model:tag
    peer: str
    state: SyncStateName
    reason: str = ""
    checked_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": _display(self.model),
            "peer": self.peer,
            "state": self.state,
            "checked_at": self.checked_at,
        }
        if self.reason:
            data["reason"] = self.reason
        return data


@dataclass(frozen=True, slots=True)
class PeerView:
    """What a peer told us of one model: every record it knows, the manifest it holds."""

    records: list[VersionRecord]
    held: str | None


def _display(full: str) -> str:
    model, _, tag = full.rpartition(":")
    return f"{display_name(model)}:{tag}"


def _hex(records: Iterable[VersionRecord]) -> list[str]:
    return [r.version_id.hex() for r in records]


class SyncManager:
    """Owned by the node as ``node.sync``; ``run`` keeps the periodic syncs going."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._states: dict[tuple[str, str], PeerState] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._running: set[str] = set()
        self._pending: dict[str, set[str]] = {}
        self._nursery: trio.Nursery | None = None
        self.policy_book = PolicyBook(node.store.db, node.config.sync)
        self.keeper = ConflictKeeper(self)
        self.syncs = 0  # completed synchronize_model calls, for status and tests

    # --- policies (node/sync_policies.py) -----------------------------------------------------

    def policies(self) -> list[SyncPolicy]:
        return self.policy_book.policies()

    def policy_for(self, name: ModelName) -> SyncPolicy | None:
        return self.policy_book.policy_for(name)

    def effective_policy(self, name: ModelName) -> SyncPolicy:
        return self.policy_book.effective(name)

    async def set_policy(self, obj: dict[str, Any]) -> SyncPolicy:
        policy = await self.policy_book.set(obj)
        self.node.audit.record(
            "policy",
            model=policy.glob,
            reason=f"sync: {policy.sync_type} every {policy.interval:g}s, "
            f"conflicts: {policy.conflict_strategy}",
        )
        return policy

    async def remove_policy(self, glob: str) -> bool:
        removed = await self.policy_book.remove(glob)
        if removed:
            self.node.audit.record("policy", model=glob, reason="sync: removed")
        return removed

    # --- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                async with trio.open_nursery() as loops:
                    for policy in self.policies():
                        loops.start_soon(self._policy_loop, policy)
                    await self.policy_book.wait_changed()
                    loops.cancel_scope.cancel()

    async def _policy_loop(self, policy: SyncPolicy) -> None:
        # The first pass comes soon after start: a node back from a while offline catches up
        # without waiting a whole interval.
        await trio.sleep(min(policy.interval, FIRST_PASS_DELAY))
        while True:
            try:
                await self.sync_glob(policy)
            except Exception as exc:  # a background pass must never take the node down
                log.warning("sync pass for %r failed: %r", policy.glob, exc)
            await trio.sleep(policy.interval)

    async def sync_glob(self, policy: SyncPolicy) -> list[dict[str, Any]]:
        """Sync every model this policy follows: the ones known here and the ones ``find`` sees."""
        names: dict[str, list[str]] = {}
        for entry in await trio.to_thread.run_sync(self.node.store.list_models):
            names[entry.name.full] = []
        for row in await trio.to_thread.run_sync(self.node.store.db.versions_like, "%"):
            names.setdefault(row.name, [])
        found = await self.node.find(policy.glob, timeout=5)
        for model in found["models"]:
            names.setdefault(model["model"], []).extend(model["reachable"])
        results = []
        for full, peers in sorted(names.items()):
            try:
                name = parse_model_name(full)
            except InvalidName:
                continue
            if self.policy_for(name) != policy:
                continue
            results.append(await self._sync_quietly(name, peers or None))
        return results

    def on_announced(self, peer_id: str, record: VersionRecord) -> None:
        """A peer announced a version: sync a followed model with it now (one sync at a time)."""
        try:
            name = parse_model_name(record.name)
        except InvalidName:
            return
        if self.policy_for(name) is None or self._nursery is None:
            return
        if name.full in self._running:
            self._pending.setdefault(name.full, set()).add(peer_id)
            return
        self._running.add(name.full)
        self._nursery.start_soon(self._drain, name, peer_id)

    async def _drain(self, name: ModelName, peer_id: str) -> None:
        peers = {peer_id}
        try:
            while peers:
                await self._sync_quietly(name, sorted(peers))
                peers = self._pending.pop(name.full, set())
        finally:
            self._running.discard(name.full)

    async def _sync_quietly(self, name: ModelName, peers: list[str] | None) -> dict[str, Any]:
        try:
            return await self.synchronize_model(name.full, peers=peers)
        except SyncError as exc:
            log.info("model %s: sync failed: %s", name.display, exc)
            return {"model": name.display, "error": str(exc)}
        except Exception as exc:  # e.g. a full disk: report it, keep the node up
            log.warning("model %s: sync failed: %r", name.display, exc)
            return {"model": name.display, "error": f"{type(exc).__name__}: {exc}"}

    # --- synchronize ---------------------------------------------------------------------------

    async def synchronize_model(
        self,
        model: str,
        peer: str | None = None,
        sync_type: str | None = None,
        *,
        peers: list[str] | None = None,
    ) -> dict[str, Any]:
        """Bring ``model`` to the version its policy settles on, with what ``peer`` (or every
        holder) has that we lack. ``sync_type`` is ``full`` or ``delta`` (default: the
        policy's). Returns a summary; raises ``SyncError`` when nothing could be done."""
        try:
            name = parse_model_name(model)
        except InvalidName as exc:
            raise SyncError(str(exc)) from None
        policy = self.effective_policy(name)
        kind = sync_type or policy.sync_type
        if kind not in SYNC_TYPES:
            raise SyncError(f"sync type {kind!r} is not one of full, delta")
        lock = self._locks.setdefault(name.full, trio.Lock())
        async with lock:
            asked = [peer] if peer else (peers or await self.node.holders_of(name))
            asked = [p for p in dict.fromkeys(asked) if p != self.node.peer_id]
            for p in asked:
                self._set_state(name.full, p, "syncing")
            answers = await self._ask_versions(name, asked)
            if asked and not answers:
                raise SyncError(f"{name.display}: none of the {len(asked)} peer(s) asked answered")
            for view in answers.values():
                await self._accept(name, view.records)
            try:
                outcome = await self._settle(name, policy, kind, list(answers) or asked)
            except FETCH_ERRORS as exc:
                for p in answers:
                    self._set_state(name.full, p, "error", str(exc))
                raise SyncError(f"{name.display}: {exc}") from None
            for p, view in answers.items():
                self._set_state(name.full, p, await self._compare(name, view))
        if not asked and outcome["version"] is None:
            raise SyncError(f"no peer holds {name.display}; try `dmm find '{name.model}*'`")
        self.syncs += 1
        outcome["peers"] = [
            self._states[(name.full, p)].to_json() for p in asked if (name.full, p) in self._states
        ]
        return outcome

    async def _ask_versions(self, name: ModelName, peers: list[str]) -> dict[str, PeerView]:
        """Each peer's version records of ``name`` and the manifest it holds under it."""
        answers: dict[str, PeerView] = {}

        async def ask(peer: str) -> None:
            try:
                async with open_catalog_client(self.node.host, peer, timeout=PEER_TIMEOUT) as c:
                    records = await c.get_versions(name.full)
                    # Names cannot hold glob characters, so the display name matches itself.
                    listed = await c.list_models(name.display, limit=1)
                    held = next(
                        (
                            m.manifest_digest
                            for m in listed.models
                            if f"{m.name}:{m.tag}" == name.full
                        ),
                        None,
                    )
                    answers[peer] = PeerView(records, held)
            except (*PEER_ERRORS, ProtocolError, trio.ClosedResourceError) as exc:
                reason = f"peer did not answer: {exc or type(exc).__name__}"
                self._set_state(name.full, peer, "error", reason)
                log.info("model %s: peer %s %s", name.display, peer, reason)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        return answers

    async def _accept(self, name: ModelName, records: list[VersionRecord]) -> None:
        def accept_all() -> None:
            for record in records:
                try:
                    self.node.book.accept(record)
                except ProtocolError as exc:  # e.g. a clock far ahead of ours
                    vid = record.version_id.hex()[:12]
                    log.info("model %s: record %s refused: %s", name.display, vid, exc)

        await trio.to_thread.run_sync(accept_all)

    async def _settle(
        self, name: ModelName, policy: SyncPolicy, kind: str, peers: list[str]
    ) -> dict[str, Any]:
        """Apply the DAG's answer to the local store; the core of every sync."""
        dag = VersionDag(await trio.to_thread.run_sync(self.node.book.records, name))
        local = await trio.to_thread.run_sync(self.node.store.layout.read, name)
        before = local.digest if local is not None else None
        resolution = resolve(dag, policy.conflict_strategy, policy.trusted_authors)
        if resolution is None:
            target = dag.resolved_head()
        else:
            await self.keeper.report(name, resolution)
            target = None if policy.conflict_strategy == "manual" else resolution.winner
        fetched = 0
        changed = False
        if before is not None and all(r.manifest_digest != before for r in dag.records()):
            # Added, pulled or created here and not recorded yet (the adder records it
            # next, as the newest version): never overwrite that with an older version.
            log.info(
                "model %s: local manifest %s has no version record yet; sync leaves it",
                name.display,
                before[:19],
            )
            target = None
        if target is not None and target.manifest_digest != before:
            try:
                fetched += await self.switch(
                    name, target.manifest_digest, peers, kind, replacing=before
                )
            except LocalChange as exc:
                log.info("model %s: %s; sync leaves it", name.display, exc)
                target = None
            else:
                changed = True
                log.info(
                    "model %s now at version %s (%s), %d bytes fetched",
                    name.display,
                    target.version_id.hex()[:12],
                    target.manifest_digest[:19],
                    fetched,
                )
        merge = None
        if (
            resolution is not None
            and target is not None
            and should_sign_merge(dag, resolution, self.node.peer_id)
        ):
            merge = await self._sign_merge(name, resolution, resolution.winner)
        if policy.conflict_strategy == "keep-both":
            kept, more = await self.keeper.keep_losers(name, before, peers, kind)
            fetched += more
            changed = changed or bool(kept)
        if changed:
            await self.node.refresh()
        current = target or dag.resolved_head()
        return {
            "model": name.display,
            "strategy": policy.conflict_strategy,
            "sync_type": kind,
            "version": current.version_id.hex() if current else None,
            "manifest": current.manifest_digest if current else before,
            "changed": changed,
            "conflict": resolution is not None,
            "merge": merge.version_id.hex() if merge else None,
            "bytes_fetched": fetched,
        }

    async def switch(
        self,
        name: ModelName,
        digest: str,
        peers: list[str],
        kind: str,
        *,
        replacing: str | None = ANY_MANIFEST,
    ) -> int:
        """Point ``name`` at manifest ``digest``, fetching what the store lacks.

        The peers at hand are tried first; the DHT is asked for more holders only when they
        cannot supply it (a lookup costs seconds on a big or half-connected network).
        With ``replacing`` (the manifest digest the name pointed at when the sync decided,
        or None for none), raises `LocalChange` instead of writing if it points elsewhere now.
        """
        reuse = kind == "delta"
        # A sync is a pull the node starts itself: the same hooks may refuse it or follow it.
        hooks = self.node.hooks
        await hooks.fire("pre-pull", name.display, digest=digest, source="sync")
        try:
            try:
                raw, manifest, fetched = await fetch_version_data(
                    self.node, name, digest, peers, reuse_local=reuse
                )
            except PullError:
                more = [p for p in await self.node.holders_of(name) if p not in peers]
                if not more:
                    raise
                raw, manifest, fetched = await fetch_version_data(
                    self.node, name, digest, [*peers, *more], reuse_local=reuse
                )
            write = functools.partial(self._write_unless_changed, name, raw, manifest, replacing)
            await trio.to_thread.run_sync(write)
        except PullError as exc:
            await hooks.fire(
                "post-pull", name.display, status="error", error=str(exc), source="sync"
            )
            raise
        await hooks.fire(
            "post-pull",
            name.display,
            status="success",
            digest=digest,
            bytes_fetched=fetched,
            source="sync",
        )
        return fetched

    def _write_unless_changed(
        self, name: ModelName, raw: bytes, manifest: Manifest, replacing: str | None
    ) -> None:
        if replacing != ANY_MANIFEST:
            current = self.node.store.layout.read(name)
            now = current.digest if current is not None else None
            if now != replacing:
                raise LocalChange(f"its manifest changed to {str(now)[:19]} meanwhile")
        write_model(self.node, name, raw, manifest)

    async def _sign_merge(
        self, name: ModelName, resolution: Resolution, winner: VersionRecord
    ) -> VersionRecord:
        merge = await trio.to_thread.run_sync(
            self.node.book.record_merge, name, resolution.conflict.heads, winner
        )
        log.info(
            "model %s: merge %s settles %s on %s",
            name.display,
            merge.version_id.hex()[:12],
            ", ".join(h[:12] for h in _hex(resolution.conflict.heads)),
            winner.version_id.hex()[:12],
        )
        self.node.announcer.announce_nowait([merge], self.node.host.listen_addrs)
        try:
            await self.node.dht.put_version(merge)
        except Exception as exc:  # a DHT with no peers fails puts; gossip still carried it
            log.info("model %s: merge not stored in the DHT (%s)", name.display, exc)
        return merge

    # --- state -------------------------------------------------------------------------------

    def _set_state(self, full: str, peer: str, state: SyncStateName, reason: str = "") -> None:
        self._states[(full, peer)] = PeerState(full, peer, state, reason)

    async def _compare(self, name: ModelName, theirs: PeerView) -> SyncStateName:
        """Records say what each side knows; each side must also hold what its records say."""
        ours = await trio.to_thread.run_sync(self.node.book.records, name)
        local = await trio.to_thread.run_sync(self.node.store.layout.read, name)
        state = compare_heads(ours, theirs.records)
        if state not in ("in-sync", "ahead"):
            return state
        our_head = VersionDag(ours).resolved_head()
        their_head = VersionDag(theirs.records).resolved_head()
        we_hold = our_head is None or (
            local is not None and local.digest == our_head.manifest_digest
        )
        they_hold = their_head is None or theirs.held == their_head.manifest_digest
        if not we_hold:
            return "behind"
        if state == "in-sync" and not they_hold:
            return "ahead"
        return state

    async def get_sync_state(self, model: str) -> dict[str, Any]:
        """``model`` here and against each holder, asked now (records are not taken in)."""
        try:
            name = parse_model_name(model)
        except InvalidName as exc:
            raise SyncError(str(exc)) from None
        records = await trio.to_thread.run_sync(self.node.book.records, name)
        dag = VersionDag(records)
        local = await trio.to_thread.run_sync(self.node.store.layout.read, name)
        peers = await self.node.holders_of(name)
        answers = await self._ask_versions(name, peers)
        states = []
        for peer in peers:
            if name.full in self._running or self._locks.get(name.full, trio.Lock()).locked():
                self._set_state(name.full, peer, "syncing")
            elif peer in answers:
                self._set_state(name.full, peer, await self._compare(name, answers[peer]))
            states.append(self._states[(name.full, peer)].to_json())
        policy = self.policy_for(name)
        conflict = dag.conflict()
        return {
            "model": name.display,
            "followed": policy is not None,
            "policy": self.effective_policy(name).to_json(),
            "local": local.digest if local is not None else None,
            "heads": _hex(dag.heads()),
            "conflict": conflict is not None,
            "peers": states,
        }

    def status(self) -> dict[str, Any]:
        """What the last syncs found, per model and peer (no network)."""
        models: dict[str, list[dict[str, Any]]] = {}
        for (full, _), state in sorted(self._states.items()):
            models.setdefault(_display(full), []).append(state.to_json())
        return {
            "policies": [p.to_json() for p in self.policies()],
            "runtime_policies": self.policy_book.runtime_globs(),
            "syncs": self.syncs,
            "models": [{"model": m, "peers": peers} for m, peers in models.items()],
        }

    # --- conflicts (node/sync_conflicts.py) ----------------------------------------------------

    async def conflicts(self) -> list[dict[str, Any]]:
        """Unsettled conflicts of the models held here or followed."""
        return await self.keeper.list()

    async def resolve_conflict(self, model: str, pick: str) -> dict[str, Any]:
        """Settle ``model``'s conflict on the head (or original) whose id starts with ``pick``."""
        try:
            name = parse_model_name(model)
        except InvalidName as exc:
            raise SyncError(str(exc)) from None
        pick = pick.strip().lower()
        if len(pick) < 4 or any(c not in "0123456789abcdef" for c in pick):
            raise SyncError(f"--pick {pick!r}: give at least 4 hex digits of a version id")
        async with self._locks.setdefault(name.full, trio.Lock()):
            dag = VersionDag(await trio.to_thread.run_sync(self.node.book.records, name))
            conflict = dag.conflict()
            if conflict is None:
                raise SyncError(f"{name.display} has no conflict to resolve")
            matches = [
                h
                for h in conflict.heads
                if h.version_id.hex().startswith(pick)
                or dag.original(h).version_id.hex().startswith(pick)
            ]
            if len({h.manifest_digest for h in matches}) != 1:
                heads = ", ".join(v[:12] for v in _hex(conflict.heads))
                what = "matches no" if not matches else "matches more than one"
                raise SyncError(f"{pick} {what} conflicting version of {name.display} ({heads})")
            winner = max(matches, key=lambda h: (dag.rank(h), h.version_id))
            resolution = Resolution(
                conflict, "manual", winner, dag.original(winner), ()
            )  # losers unused: manual keeps nothing
            local = await trio.to_thread.run_sync(self.node.store.layout.read, name)
            fetched = 0
            if local is None or local.digest != winner.manifest_digest:
                try:
                    fetched = await self.switch(name, winner.manifest_digest, [], "delta")
                except FETCH_ERRORS as exc:
                    raise SyncError(f"{name.display}: {exc}") from None
            merge = await self._sign_merge(name, resolution, winner)
            await self.node.refresh()
        return {
            "model": name.display,
            "picked": winner.version_id.hex(),
            "manifest": winner.manifest_digest,
            "merge": merge.version_id.hex(),
            "bytes_fetched": fetched,
        }

    # --- versions ------------------------------------------------------------------------------

    async def create_model_version(self, model: str, path: str | Path) -> dict[str, Any]:
        """Add a GGUF file as the next version of ``model``; recorded, provided, announced."""
        try:
            name = parse_model_name(model)
        except InvalidName as exc:
            raise SyncError(str(exc)) from None
        file = Path(path)

        def add() -> VersionRecord:
            result = self.node.store.add_model(name.full, file)
            return self.node.book.record_local(result.name, result.digest, result.size)

        try:
            # Under the model's sync lock: a sync pass between the store's write and the
            # record would see a manifest no version names.
            async with self._locks.setdefault(name.full, trio.Lock()):
                record = await trio.to_thread.run_sync(add)
        except StoreError as exc:
            raise SyncError(str(exc)) from None
        await self.node.refresh()
        return {
            "model": name.display,
            "version": record.version_id.hex(),
            "manifest": record.manifest_digest,
            "parents": [p.hex() for p in record.parents],
            "size": record.size,
        }


__all__ = ["PeerState", "PeerView", "SyncError", "SyncManager"]
