"""The version DAG of one ``model:tag``, and the rules that settle its conflicts.

Every node must reach the same answer from the same set of records with no coordinator,
so everything here is a pure function of the *set* of records: their order never matters.

- **heads**: the versions no other known version names as a parent.
- **conflict**: heads that name more than one manifest (neither descends from the other).
  Heads naming the same manifest are equivalent: two nodes that settle one conflict the
  same way each sign a merge record, and those two merges do not conflict again.
- **merge**: a record with two or more parents whose manifest is the manifest of one of
  them. It stands for that parent's **original** (followed through merges of merges) and
  ranks exactly as that original: a merge signed late never looks newer than the version
  it chose, so a conflict between two merges is settled as the conflict between their
  originals would be, whichever node merged first and whatever each had seen.
- **rank**: ``(hlc, version id)`` of a version's original; ``newest`` takes the greatest.

A node whose policy differs from its peers' (another strategy, another trusted list)
settles differently; ``should_sign_merge`` keeps such nodes from signing merge after merge
at each other: a node that already settled the same originals the same way waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .errors import LocalProtocolError
from .records import VersionRecord

__all__ = [
    "STRATEGIES",
    "SYNC_STATES",
    "Conflict",
    "Resolution",
    "Strategy",
    "SyncStateName",
    "VersionDag",
    "compare_heads",
    "conflict_tag",
    "resolve",
    "should_sign_merge",
]

Strategy = Literal["newest", "prefer-author", "keep-both", "manual"]
STRATEGIES: Final[tuple[Strategy, ...]] = ("newest", "prefer-author", "keep-both", "manual")

SyncStateName = Literal["in-sync", "behind", "ahead", "diverged", "syncing", "error"]
SYNC_STATES: Final[tuple[SyncStateName, ...]] = (
    "in-sync",
    "behind",
    "ahead",
    "diverged",
    "syncing",
    "error",
)

# Ollama's tag limit is 80 characters (storage.names); "-conflict-" + 12 hex is 22.
_SHORT_ID = 12
_MAX_TAG = 80


@dataclass(frozen=True, slots=True)
class Conflict:
    """Heads of one ``model:tag`` naming different manifests."""

    name: str  # host/namespace/model:tag
    heads: tuple[VersionRecord, ...]  # sorted by version id


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a strategy settles a conflict.

    ``winner`` is the head whose manifest the name takes; ``original`` the version it
    stands for. ``losers`` are the originals of the other manifests, one per manifest
    (the best ranked), sorted by version id: ``keep-both`` keeps each under
    ``conflict_tag``.
    """

    conflict: Conflict
    strategy: Strategy
    winner: VersionRecord
    original: VersionRecord
    losers: tuple[VersionRecord, ...]


class VersionDag:
    """The records of one ``model:tag``; parents not among them are simply unknown."""

    def __init__(self, records: Iterable[VersionRecord]) -> None:
        self._records: dict[bytes, VersionRecord] = {}
        for record in records:
            self._records.setdefault(record.version_id, record)
        names = {r.name for r in self._records.values()}
        if len(names) > 1:
            raise LocalProtocolError(f"one DAG holds one model:tag, not {sorted(names)}")
        self.name = names.pop() if names else ""
        self._parents_of_known = {p for r in self._records.values() for p in r.parents}
        self._originals: dict[bytes, VersionRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, version_id: object) -> bool:
        return version_id in self._records

    def get(self, version_id: bytes) -> VersionRecord | None:
        return self._records.get(version_id)

    def records(self) -> list[VersionRecord]:
        """Every record, oldest first by ``(hlc, version id)``."""
        return sorted(self._records.values(), key=lambda r: (r.hlc, r.version_id))

    def heads(self) -> tuple[VersionRecord, ...]:
        """Versions no known version descends from, sorted by version id."""
        return tuple(
            sorted(
                (r for r in self._records.values() if r.version_id not in self._parents_of_known),
                key=lambda r: r.version_id,
            )
        )

    def ancestors(self, version_id: bytes) -> frozenset[bytes]:
        """Every version ``version_id`` descends from (known or merely named as a parent)."""
        seen: set[bytes] = set()
        record = self._records.get(version_id)
        stack = list(record.parents) if record is not None else []
        while stack:
            vid = stack.pop()
            if vid in seen:
                continue
            seen.add(vid)
            parent = self._records.get(vid)
            if parent is not None:
                stack.extend(parent.parents)
        return frozenset(seen)

    def descends(self, a: bytes, b: bytes) -> bool:
        """Whether ``a`` descends from ``b`` (strictly: a version does not descend from itself)."""
        return b in self.ancestors(a)

    def common_ancestor(self, a: bytes, b: bytes) -> VersionRecord | None:
        """The nearest known version both descend from (or are); the best ranked if several."""
        common = (self.ancestors(a) | {a}) & (self.ancestors(b) | {b})
        known = [self._records[v] for v in common if v in self._records]
        below: set[bytes] = set()
        for record in known:
            below |= self.ancestors(record.version_id)
        nearest = [r for r in known if r.version_id not in below]
        if not nearest:
            return None
        return max(nearest, key=lambda r: (r.hlc, r.version_id))

    # --- merges and originals --------------------------------------------------------------

    def merge_parents(self, record: VersionRecord) -> list[VersionRecord]:
        """The known parents whose manifest a record took, if it is a merge; else ``[]``."""
        if len(record.parents) < 2:
            return []
        return [
            parent
            for vid in record.parents
            if (parent := self._records.get(vid)) is not None
            and parent.manifest_digest == record.manifest_digest
        ]

    def is_merge(self, record: VersionRecord) -> bool:
        return bool(self.merge_parents(record))

    def original(self, record: VersionRecord) -> VersionRecord:
        """The version a record stands for: itself, or for a merge its chosen parent's original."""
        vid = record.version_id
        if vid in self._originals:
            return self._originals[vid]
        # Iterative post-order walk: merge chains may be long, Python's stack is not.
        stack: list[tuple[VersionRecord, bool]] = [(record, False)]
        while stack:
            current, expanded = stack.pop()
            cid = current.version_id
            if cid in self._originals:
                continue
            chosen = self.merge_parents(current)
            pending = [p for p in chosen if p.version_id not in self._originals]
            if pending and not expanded:
                stack.append((current, True))
                stack.extend((p, False) for p in pending)
                continue
            if not chosen:
                self._originals[cid] = current
            else:
                self._originals[cid] = max(
                    (self._originals[p.version_id] for p in chosen),
                    key=lambda o: (o.hlc, o.version_id),
                )
        return self._originals[vid]

    def rank(self, record: VersionRecord) -> tuple[int, bytes]:
        original = self.original(record)
        return (original.hlc, original.version_id)

    def merges(self) -> list[VersionRecord]:
        """Every merge record, oldest first."""
        return [r for r in self.records() if self.is_merge(r)]

    def merge_losers(self, merge: VersionRecord) -> list[VersionRecord]:
        """The originals a merge set aside: one per other manifest among its parents."""
        best: dict[str, VersionRecord] = {}
        for vid in merge.parents:
            parent = self._records.get(vid)
            if parent is None or parent.manifest_digest == merge.manifest_digest:
                continue
            original = self.original(parent)
            held = best.get(original.manifest_digest)
            if held is None or (original.hlc, original.version_id) > (held.hlc, held.version_id):
                best[original.manifest_digest] = original
        return sorted(best.values(), key=lambda r: r.version_id)

    # --- conflicts -------------------------------------------------------------------------

    def conflict(self) -> Conflict | None:
        heads = self.heads()
        if len({h.manifest_digest for h in heads}) < 2:
            return None
        return Conflict(self.name, heads)

    def resolved_head(self) -> VersionRecord | None:
        """With no conflict: the best ranked head (every head names the same manifest)."""
        heads = self.heads()
        if not heads or len({h.manifest_digest for h in heads}) > 1:
            return None
        return max(heads, key=lambda h: (self.rank(h), h.version_id))


def resolve(dag: VersionDag, strategy: Strategy, trusted: Sequence[str] = ()) -> Resolution | None:
    """How ``strategy`` settles the DAG's conflict; ``None`` when there is none.

    ``newest``, ``keep-both`` and ``manual`` (as a suggestion) take the greatest rank;
    ``prefer-author`` first prefers heads whose original was signed by a peer in
    ``trusted``, then the greatest rank. Ties between equivalent heads go to the greater
    version id, so the answer never depends on the order records arrived in.
    """
    if strategy not in STRATEGIES:
        raise LocalProtocolError(f"unknown conflict strategy {strategy!r}")
    conflict = dag.conflict()
    if conflict is None:
        return None
    trusted_set = frozenset(trusted)

    def key(head: VersionRecord) -> tuple[bool, tuple[int, bytes], bytes]:
        preferred = strategy == "prefer-author" and dag.original(head).author in trusted_set
        return (preferred, dag.rank(head), head.version_id)

    winner = max(conflict.heads, key=key)
    best: dict[str, VersionRecord] = {}
    for head in conflict.heads:
        if head.manifest_digest == winner.manifest_digest:
            continue
        original = dag.original(head)
        held = best.get(head.manifest_digest)
        if held is None or (original.hlc, original.version_id) > (held.hlc, held.version_id):
            best[head.manifest_digest] = original
    losers = tuple(sorted(best.values(), key=lambda r: r.version_id))
    return Resolution(conflict, strategy, winner, dag.original(winner), losers)


def should_sign_merge(dag: VersionDag, resolution: Resolution, author: str) -> bool:
    """Whether ``author`` should sign a merge settling ``resolution``.

    Not when ``author`` already signed a merge of the same originals on the same winner:
    this node has said its word. Without this, nodes settling by different policies (or
    trusting different authors) would answer each other's merges with merges for ever;
    with it they stop, each keeping its own answer, until a new version arrives.
    """
    originals = frozenset(dag.original(h).version_id for h in resolution.conflict.heads)
    for record in dag.merges():
        if record.author != author or dag.original(record) != resolution.original:
            continue
        merged = frozenset(
            dag.original(parent).version_id
            for vid in record.parents
            if (parent := dag.get(vid)) is not None
        )
        if merged == originals:
            return False
    return True


def conflict_tag(tag: str, loser: VersionRecord) -> str:
    """``<tag>-conflict-<12 hex of the loser's version id>``, the tag keep-both keeps it under.

    The tag is shortened when needed so the result stays a valid Ollama tag (80 chars).
    """
    suffix = f"-conflict-{loser.version_id.hex()[:_SHORT_ID]}"
    return tag[: _MAX_TAG - len(suffix)] + suffix


def compare_heads(ours: Iterable[VersionRecord], theirs: Iterable[VersionRecord]) -> SyncStateName:
    """How our records stand against a peer's: ``in-sync``, ``ahead``, ``behind``, ``diverged``.

    Both sides settled on the same manifest is ``in-sync`` even when the records differ
    (two equivalent merges). Otherwise ``ahead``: every head of theirs is one of ours or
    an ancestor of one; ``behind``: the reverse; ``diverged``: neither.
    """
    our_list, their_list = list(ours), list(theirs)
    our_dag, their_dag = VersionDag(our_list), VersionDag(their_list)
    union = VersionDag([*our_list, *their_list])
    our_heads = {h.version_id for h in our_dag.heads()}
    their_heads = {h.version_id for h in their_dag.heads()}
    if our_heads == their_heads:
        return "in-sync"
    our_head, their_head = our_dag.resolved_head(), their_dag.resolved_head()
    if (
        our_head is not None
        and their_head is not None
        and our_head.manifest_digest == their_head.manifest_digest
    ):
        return "in-sync"

    def covered(heads: set[bytes], by: set[bytes]) -> bool:
        return all(h in by or any(union.descends(b, h) for b in by) for h in heads)

    if covered(their_heads, our_heads):
        return "ahead"
    if covered(our_heads, their_heads):
        return "behind"
    return "diverged"
