"""Conflicts for the SyncManager: one report per conflict, keep-both's kept losers, the list.

The rules that pick a winner are in ``protocols/dag.py``; this is what a node does with them.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from node.pull import PullError
from protocols.dag import Resolution, VersionDag, conflict_tag, resolve
from storage.cas import StoreBusyError
from storage.manifest import ManifestError
from storage.names import InvalidName, ModelName, parse_model_name
from storage.store import StoreError

if TYPE_CHECKING:
    from node.sync import SyncManager

log = logging.getLogger("dmm.sync")

# What fetching a version may fail with, short of a bug: said in one line, the node stays up.
FETCH_ERRORS = (PullError, StoreError, StoreBusyError, ManifestError, OSError)
_KEPT_SETTING = "sync.kept."  # + full name: merges looked at and losers kept (keep-both)


class ConflictKeeper:
    def __init__(self, sync: SyncManager) -> None:
        self.sync = sync
        self._reported: set[tuple[str, frozenset[bytes]]] = set()

    async def report(self, name: ModelName, resolution: Resolution) -> None:
        """One log line and one ``on-conflict`` hook per distinct conflict."""
        key = (name.full, frozenset(h.version_id for h in resolution.conflict.heads))
        if key in self._reported:
            return
        self._reported.add(key)
        versions = [h.version_id.hex() for h in resolution.conflict.heads]
        log.info(
            "model %s: conflict between %s; %s picks %s",
            name.display,
            ", ".join(v[:12] for v in versions),
            resolution.strategy,
            resolution.original.version_id.hex()[:12],
        )
        hooks = getattr(self.sync.node, "hooks", None)
        if hooks is None:
            return
        try:
            result = hooks.fire(
                "on-conflict",
                name.display,
                versions=versions,
                strategy=resolution.strategy,
                winner=resolution.original.version_id.hex(),
            )
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # a broken hook must not stop syncing
            log.warning("model %s: on-conflict hook failed: %s", name.display, exc)

    async def keep_losers(
        self, name: ModelName, before: str | None, peers: list[str], kind: str
    ) -> tuple[list[str], int]:
        """keep-both: each loser of a merge that followed what we held, under its own tag.

        Only merges descending from the version this node held count (a node that held
        nothing lost nothing); each merge is looked at once, each loser kept once, so a
        conflict tag someone deleted does not come back.
        """
        db = self.sync.node.store.db
        key = _KEPT_SETTING + name.full
        raw = await trio.to_thread.run_sync(db.get_setting, key)
        state = json.loads(raw) if raw else {"merges": [], "losers": []}
        seen, kept = set(state["merges"]), set(state["losers"])
        dag = VersionDag(await trio.to_thread.run_sync(self.sync.node.book.records, name))
        held = [r.version_id for r in dag.records() if r.manifest_digest == before]
        made: list[str] = []
        fetched = 0
        for merge in dag.merges():
            mid = merge.version_id.hex()
            if mid in seen:
                continue
            if not any(dag.descends(merge.version_id, h) for h in held):
                seen.add(mid)
                continue
            done = True
            for loser in dag.merge_losers(merge):
                lid = loser.version_id.hex()
                if lid in kept:
                    continue
                target = name.with_tag(conflict_tag(name.tag, loser))
                # Holders of the name itself may still hold the loser, or its blobs.
                sources = [*peers, *await self.sync.node.holders_of(name)]
                try:
                    fetched += await self.sync.switch(target, loser.manifest_digest, sources, kind)
                except FETCH_ERRORS as exc:
                    log.warning("model %s: loser %s not kept: %s", name.display, lid[:12], exc)
                    done = False
                    continue
                kept.add(lid)
                made.append(target.display)
                log.info("model %s: version %s kept as %s", name.display, lid[:12], target.display)
            if done:
                seen.add(mid)
        text = json.dumps({"merges": sorted(seen), "losers": sorted(kept)})
        await trio.to_thread.run_sync(db.set_setting, key, text)
        return made, fetched

    async def list(self) -> list[dict[str, Any]]:
        """Unsettled conflicts of the models held here or followed."""
        held = {
            e.name.full for e in await trio.to_thread.run_sync(self.sync.node.store.list_models)
        }
        rows = await trio.to_thread.run_sync(self.sync.node.store.db.versions_like, "%")
        result = []
        for full in sorted({row.name for row in rows} | held):
            try:
                name = parse_model_name(full)
            except InvalidName:
                continue
            if full not in held and self.sync.policy_for(name) is None:
                continue
            dag = VersionDag(await trio.to_thread.run_sync(self.sync.node.book.records, name))
            policy = self.sync.effective_policy(name)
            resolution = resolve(dag, policy.conflict_strategy, policy.trusted_authors)
            if resolution is None:
                continue
            local = await trio.to_thread.run_sync(self.sync.node.store.layout.read, name)
            result.append(
                {
                    "model": name.display,
                    "strategy": policy.conflict_strategy,
                    "local": local.digest if local is not None else None,
                    "suggested": resolution.winner.version_id.hex(),
                    "heads": [
                        {
                            "version": h.version_id.hex(),
                            "original": dag.original(h).version_id.hex(),
                            "author": dag.original(h).author,
                            "hlc": dag.original(h).hlc,
                            "manifest": h.manifest_digest,
                            "size": h.size,
                            "merge": dag.is_merge(h),
                        }
                        for h in resolution.conflict.heads
                    ],
                }
            )
        return result
