"""Sync policies: which models a node follows, and how (node/sync.py applies them).

First match wins, in this order: policies set at run time (``POST /api/sync/policies``,
kept in the database's settings table so they survive restarts), ``[[sync.policies]]`` from
node.toml, then each ``[sync] follow`` glob with the ``[sync]`` defaults.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from node.config import SyncConfig, SyncPolicy, parse_sync_policy
from protocols.catalog import glob_matches
from storage.db import MetadataDB
from storage.names import ModelName

log = logging.getLogger("dmm.sync")

_POLICIES_SETTING = "sync.policies"


class PolicyBook:
    def __init__(self, db: MetadataDB, config: SyncConfig) -> None:
        self.db = db
        self.config = config
        self._changed = trio.Event()
        self._runtime = self._load()

    def _load(self) -> list[SyncPolicy]:
        raw = self.db.get_setting(_POLICIES_SETTING)
        policies: list[SyncPolicy] = []
        for obj in json.loads(raw) if raw else []:
            try:
                policies.append(parse_sync_policy(obj, self.config.default_policy()))
            except ValueError as exc:  # written by an older dmm, or by hand
                log.warning("sync policy %r in the database ignored: %s", obj, exc)
        return policies

    def policies(self) -> list[SyncPolicy]:
        """Every policy, first match wins: run-time ones, ``[[sync.policies]]``, ``follow``."""
        sync = self.config
        return [*self._runtime, *sync.policies, *(sync.default_policy(g) for g in sync.follow)]

    def runtime_globs(self) -> list[str]:
        return [p.glob for p in self._runtime]

    def policy_for(self, name: ModelName) -> SyncPolicy | None:
        """The policy following ``name``, or ``None`` when no policy follows it."""
        for policy in self.policies():
            if glob_matches(policy.glob, name.display):
                return policy
        return None

    def effective(self, name: ModelName) -> SyncPolicy:
        """The policy of a followed model; for others the ``[sync]`` defaults."""
        return self.policy_for(name) or self.config.default_policy("*")

    async def set(self, obj: dict[str, Any]) -> SyncPolicy:
        """Add or replace (by glob) a run-time policy; raises ``ValueError`` on a bad one."""
        policy = parse_sync_policy(obj, self.config.default_policy())
        self._runtime = [p for p in self._runtime if p.glob != policy.glob] + [policy]
        await self._save()
        log.info("sync policy for %r set: %s", policy.glob, policy.to_json())
        return policy

    async def remove(self, glob: str) -> bool:
        """Drop the run-time policy for ``glob``; False when there is none."""
        kept = [p for p in self._runtime if p.glob != glob]
        if len(kept) == len(self._runtime):
            return False
        self._runtime = kept
        await self._save()
        log.info("sync policy for %r removed", glob)
        return True

    async def wait_changed(self) -> None:
        """Return at the next change of the run-time policies."""
        await self._changed.wait()
        self._changed = trio.Event()

    async def _save(self) -> None:
        text = json.dumps([p.to_json() for p in self._runtime])
        await trio.to_thread.run_sync(self.db.set_setting, _POLICIES_SETTING, text)
        self._changed.set()
