"""The version book: signed version records of the models this node knows, in its database.

A local change (add, import, pull) becomes a record signed with the node's identity, whose
parents are the current heads of that ``model:tag``; records from peers are verified
(``VersionRecord.decode``) before they are kept. The hybrid logical clock is persisted, so
timestamps never go backwards across restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from protocols.records import HybridClock, VersionRecord
from storage.db import MetadataDB, VersionRow
from storage.names import ModelName

if TYPE_CHECKING:  # libp2p is slow to import and only the node needs it at run time
    from node.acl import Acl
    from node.identity import Identity

_HLC_SETTING = "hlc"


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class RecordRejected(ValueError):
    """A record this node refuses to keep: its author lacks the publisher role."""


class VersionBook:
    """Thread-safe: called from worker threads (CLI, store operations) and the node.

    With an ``acl``, records from peers whose author lacks the publisher role for the model
    are refused (``RecordRejected``); our own records never are.
    """

    def __init__(self, db: MetadataDB, identity: Identity, acl: Acl | None = None) -> None:
        self.db = db
        self.identity = identity
        self.acl = acl
        self._lock = threading.Lock()
        self._clock = HybridClock(int(db.get_setting(_HLC_SETTING) or 0))
        # Called (from whatever thread stored it) after a record new to this book is kept.
        self.on_change: Callable[[], None] | None = None

    def _tick(self) -> int:
        hlc = self._clock.now(_wall_ms())
        self.db.set_setting(_HLC_SETTING, str(hlc))
        return hlc

    def records(self, name: ModelName | str) -> list[VersionRecord]:
        """Every verified record of ``host/namespace/model:tag``, oldest first."""
        full = name.full if isinstance(name, ModelName) else name
        return [
            VersionRecord.decode(row.record)
            for row in self.db.versions(full)
            if row.record is not None
        ]

    def heads(self, name: ModelName | str) -> list[VersionRecord]:
        """Versions no other known version descends from (more than one = diverged)."""
        records = self.records(name)
        parents = {p for r in records for p in r.parents}
        return [r for r in records if r.version_id not in parents]

    def latest(self, name: ModelName | str) -> VersionRecord | None:
        heads = self.heads(name)
        if not heads:
            return None
        return max(heads, key=lambda r: (r.hlc, r.version_id))

    def record_local(self, name: ModelName, manifest_digest: str, size: int) -> VersionRecord:
        """The record for ``name`` now pointing at ``manifest_digest``; new only if it changed.

        A manifest some head already names is no change: the store holds a version we know
        (pulled, or one side of a conflict), and signing a record on top of every head here
        would settle a conflict behind the sync policy's back. Settling is ``record_merge``.
        """
        with self._lock:
            heads = self.heads(name)
            same = [h for h in heads if h.manifest_digest == manifest_digest]
            if same:
                return max(same, key=lambda r: (r.hlc, r.version_id))
            return self._sign(name, manifest_digest, size, [h.version_id for h in heads])

    def record_held(self, name: ModelName, manifest_digest: str, size: int) -> VersionRecord:
        """The record for what the store holds under ``name``, after any change to it.

        A manifest some known version names is that version (the newest such), even when it
        is no head any more: a sync or pull wrote it, and records arriving meanwhile must
        not turn that write into a new local version on top of them. Only a manifest no
        version names is a local change (``record_local``). A user's own edit goes through
        ``record_local`` first (``dmm add``), so reverting to an older file still counts.
        """
        with self._lock:
            same = [r for r in self.records(name) if r.manifest_digest == manifest_digest]
            if same:
                return max(same, key=lambda r: (r.hlc, r.version_id))
        return self.record_local(name, manifest_digest, size)

    def record_merge(
        self, name: ModelName, parents: Iterable[VersionRecord], winner: VersionRecord
    ) -> VersionRecord:
        """A merge record: ``parents`` (the conflicting heads) settled on ``winner``'s manifest."""
        with self._lock:
            return self._sign(
                name, winner.manifest_digest, winner.size, [p.version_id for p in parents]
            )

    def _sign(
        self, name: ModelName, manifest_digest: str, size: int, parents: list[bytes]
    ) -> VersionRecord:
        record = VersionRecord.sign(
            model=f"{name.host}/{name.namespace}/{name.model}",
            tag=name.tag,
            manifest_digest=manifest_digest,
            size=size,
            parents=parents,
            hlc=self._tick(),
            signing_key=self.identity.signing_key,
        )
        self._store(record)
        return record

    def accept(self, record: VersionRecord) -> bool:
        """Keep a verified record from a peer; False if it was already known.

        Raises ``RecordRejected`` when the ACL does not let its author publish it.
        """
        if self.acl is not None:
            refusal = self.acl.publish_refusal(record)
            if refusal is not None:
                raise RecordRejected(refusal)
        with self._lock:
            hlc = self._clock.observe(record.hlc, _wall_ms())
            self.db.set_setting(_HLC_SETTING, str(hlc))
            return self._store(record)

    def accept_many(self, records: Iterable[VersionRecord]) -> int:
        """Keep each acceptable record; rejected ones are skipped. How many were new."""
        kept = 0
        for record in records:
            try:
                kept += self.accept(record)
            except RecordRejected:
                continue
        return kept

    def _store(self, record: VersionRecord) -> bool:
        added = self._add(record)
        if added and self.on_change is not None:
            self.on_change()
        return added

    def _add(self, record: VersionRecord) -> bool:
        return self.db.add_version(
            VersionRow(
                id=record.version_id.hex(),
                name=record.name,
                manifest_digest=record.manifest_digest,
                size=record.size,
                parents=tuple(p.hex() for p in record.parents),
                author=record.author,
                created_at=time.time(),
                hlc=record.hlc,
                record=record.encode(),
            )
        )
