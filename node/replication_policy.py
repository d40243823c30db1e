"""Replication policies and the deterministic choices healers make from them (no I/O).

A ``Policy`` applies to the models whose ``name:tag`` matches its glob (the glob rules of
``protocols.catalog.glob_matches``). Models that match no policy are left alone:
replication is opt-in per glob, so a node never copies models nobody asked it to.

Every holder of a model computes the same answers from the same view — which peers should
take new copies (``placement``), which holder asks them (``leader``), which replica-only
copies go when there are too many (``releases``) — so no coordinator is needed. Ties are
broken by rendezvous hashing of (model, peer), which spreads models over peers evenly and
moves few of them when a peer comes or goes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from protocols.catalog import glob_matches, literal_prefix
from protocols.replicate import PolicySpec

__all__ = [
    "Candidate",
    "HolderView",
    "Policy",
    "PolicyDefaults",
    "PolicyError",
    "leader",
    "parse_policy",
    "placement",
    "policy_from_spec",
    "releases",
    "select_policy",
    "spec_from_policy",
]

MAX_REPLICAS = 1000
MAX_GLOB = 256
POLICY_FIELDS = (
    "glob",
    "min_replicas",
    "max_replicas",
    "replication_factor",
    "preferred_peers",
    "excluded_peers",
    "sync_interval",
    "priority",
    "constraints",
)


class PolicyError(ValueError):
    """A bad policy field: ``field`` names it, ``str()`` is one line."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"{field_name}: {problem}")


@dataclass(frozen=True, slots=True)
class PolicyDefaults:
    min_replicas: int = 1
    max_replicas: int = 3
    replication_factor: int = 2


@dataclass(frozen=True, slots=True)
class Policy:
    """How many copies of the matching models the network should hold, and where.

    ``replication_factor`` is the count healers aim for (``min <= factor <= max``);
    below ``min_replicas`` a model is healed, above ``max_replicas`` replica-only copies
    are released. ``sync_interval`` (seconds, ``None`` = ``[replication]
    policy_enforcement_interval``) is how often this policy is re-checked; ``priority``
    orders policies (higher wins a model matched by several, and heals first).
    """

    glob: str
    min_replicas: int
    max_replicas: int
    replication_factor: int
    preferred_peers: tuple[str, ...] = ()
    excluded_peers: tuple[str, ...] = ()
    sync_interval: float | None = None
    priority: int = 0
    constraints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def matches(self, name_tag: str) -> bool:
        """``name_tag`` is a display ``name:tag`` (``llama3:8b``, ``ns/model:tag``)."""
        return glob_matches(self.glob, name_tag)

    def allows(self, peer_id: str, tags: Mapping[str, str]) -> str | None:
        """Why ``peer_id`` with ``tags`` may not hold a copy, or ``None`` if it may."""
        if peer_id in self.excluded_peers:
            return f"peer {peer_id} is excluded by policy {self.glob!r}"
        for key, wanted in sorted(self.constraints.items()):
            if tags.get(key) != wanted:
                have = tags.get(key)
                shown = "no such tag" if have is None else repr(have)
                return f"policy {self.glob!r} requires {key}={wanted!r} ({shown} here)"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "glob": self.glob,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "replication_factor": self.replication_factor,
            "preferred_peers": list(self.preferred_peers),
            "excluded_peers": list(self.excluded_peers),
            "sync_interval": self.sync_interval,
            "priority": self.priority,
            "constraints": dict(self.constraints),
        }


def _int(raw: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise PolicyError(key, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise PolicyError(key, f"{value} is outside {lo}..{hi}")
    return value


def _peers(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    from node.config import validate_peer_id

    value = raw.get(key, [])
    if not isinstance(value, list | tuple):
        raise PolicyError(key, f"expected an array of peer ids, got {value!r}")
    peers: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise PolicyError(key, f"expected a peer id, got {item!r}")
        try:
            peers.append(validate_peer_id(item))
        except ValueError as exc:
            raise PolicyError(key, str(exc)) from None
    return tuple(dict.fromkeys(peers))


def parse_policy(raw: Mapping[str, Any], defaults: PolicyDefaults) -> Policy:
    """A ``Policy`` from a TOML table or JSON object; fields left out take ``defaults``.

    Raises ``PolicyError`` naming the first bad field. Unknown fields are refused.
    """
    from node.config import parse_duration

    for key in raw:
        if key not in POLICY_FIELDS:
            raise PolicyError(str(key), f"unknown field (known: {', '.join(POLICY_FIELDS)})")
    glob = raw.get("glob")
    if not isinstance(glob, str) or not glob:
        raise PolicyError("glob", "a non-empty glob over model names is required, e.g. 'llama*'")
    if len(glob) > MAX_GLOB or not glob.isprintable():
        raise PolicyError("glob", f"must be printable and at most {MAX_GLOB} characters")
    low = _int(raw, "min_replicas", 1, MAX_REPLICAS)
    high = _int(raw, "max_replicas", 1, MAX_REPLICAS)
    factor = _int(raw, "replication_factor", 1, MAX_REPLICAS)
    low = defaults.min_replicas if low is None else low
    high = max(defaults.max_replicas, low) if high is None else high
    if low > high:
        raise PolicyError("min_replicas", f"{low} is larger than max_replicas ({high})")
    factor = min(max(defaults.replication_factor, low), high) if factor is None else factor
    if not low <= factor <= high:
        raise PolicyError("replication_factor", f"{factor} is outside {low}..{high}")
    preferred = _peers(raw, "preferred_peers")
    excluded = _peers(raw, "excluded_peers")
    both = set(preferred) & set(excluded)
    if both:
        raise PolicyError("excluded_peers", f"{sorted(both)[0]} is also preferred")
    interval_raw = raw.get("sync_interval")
    interval: float | None = None
    if interval_raw is not None and interval_raw != "":
        try:
            interval = parse_duration(interval_raw)
        except ValueError as exc:
            raise PolicyError("sync_interval", str(exc)) from None
        if interval <= 0:
            raise PolicyError("sync_interval", "must be longer than zero")
    priority = _int(raw, "priority", -1000, 1000) or 0
    constraints_raw = raw.get("constraints", {})
    if not isinstance(constraints_raw, Mapping):
        raise PolicyError("constraints", f"expected a table of strings, got {constraints_raw!r}")
    constraints: dict[str, str] = {}
    for key, value in constraints_raw.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise PolicyError("constraints", f"{key!r} = {value!r}: keys and values are strings")
        if len(key) > 64 or len(value) > 256 or not (key + value).isprintable():
            raise PolicyError("constraints", f"{key!r}: too long or not printable")
        constraints[key] = value
    if len(constraints) > 32:
        raise PolicyError("constraints", "at most 32 constraints")
    return Policy(
        glob=glob,
        min_replicas=low,
        max_replicas=high,
        replication_factor=factor,
        preferred_peers=preferred,
        excluded_peers=excluded,
        sync_interval=interval,
        priority=priority,
        constraints=MappingProxyType(constraints),
    )


def spec_from_policy(policy: Policy) -> PolicySpec:
    return PolicySpec(
        glob=policy.glob,
        min_replicas=policy.min_replicas,
        max_replicas=policy.max_replicas,
        replication_factor=policy.replication_factor,
        priority=policy.priority,
        constraints=dict(policy.constraints),
        preferred_peers=policy.preferred_peers,
        excluded_peers=policy.excluded_peers,
    )


def policy_from_spec(spec: PolicySpec) -> Policy:
    return parse_policy(
        {
            "glob": spec.glob,
            "min_replicas": spec.min_replicas,
            "max_replicas": spec.max_replicas,
            "replication_factor": spec.replication_factor,
            "priority": spec.priority,
            "constraints": dict(spec.constraints),
            "preferred_peers": list(spec.preferred_peers),
            "excluded_peers": list(spec.excluded_peers),
        },
        PolicyDefaults(),
    )


def select_policy(policies: Iterable[Policy], name_tag: str) -> Policy | None:
    """The policy for ``name_tag``: highest priority, then the longest literal glob prefix
    (the most specific), then the one listed last."""
    best: tuple[tuple[int, int, int], Policy] | None = None
    for index, policy in enumerate(policies):
        if not policy.matches(name_tag):
            continue
        key = (policy.priority, len(literal_prefix(policy.glob)), index)
        if best is None or key > best[0]:
            best = (key, policy)
    return None if best is None else best[1]


# --------------------------------------------------------------------------- choices


def _score(model: str, peer_id: str) -> bytes:
    """Rendezvous hash: each (model, peer) pair's fixed place in the order."""
    return hashlib.sha256(f"{model}\n{peer_id}".encode()).digest()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A peer that could take a copy, as the healer saw it (``Status`` of /dmm/replicate/1)."""

    peer_id: str
    tags: Mapping[str, str] = field(hash=False)
    free: int
    load: int


@dataclass(frozen=True, slots=True)
class HolderView:
    """A healthy holder of a model: ``pinned`` if a user put the copy there."""

    peer_id: str
    pinned: bool
    tags: Mapping[str, str] | None = field(default=None, hash=False)


def placement(
    model: str, size: int, policy: Policy, candidates: Sequence[Candidate]
) -> list[Candidate]:
    """Peers that may take a new copy of ``model``, best first.

    Excluded peers, peers whose tags miss a constraint and peers with less than ``size``
    bytes free are left out. Then: preferred peers first, the least loaded first, then
    the rendezvous hash — the same order on every node that sees the same candidates.
    """
    allowed = [c for c in candidates if policy.allows(c.peer_id, c.tags) is None and c.free >= size]
    return sorted(
        allowed,
        key=lambda c: (c.peer_id not in policy.preferred_peers, c.load, _score(model, c.peer_id)),
    )


def leader(holders: Iterable[str]) -> str | None:
    """The holder that acts for all of them: the lowest peer id among the healthy ones."""
    return min(holders, default=None)


def releases(model: str, policy: Policy, holders: Sequence[HolderView]) -> list[str]:
    """The replica-only copies of ``model`` to release, given its healthy ``holders``.

    Never a pinned copy. Copies on peers the policy no longer allows (excluded, or tags
    known and missing a constraint) go first, and only while the others still reach
    ``replication_factor``; then, above ``max_replicas``, the surplus, non-preferred
    peers first and then in reverse rendezvous order (the last peers placement picks).
    """
    unpinned = [h for h in holders if not h.pinned]
    misplaced = [
        h
        for h in unpinned
        if h.peer_id in policy.excluded_peers
        or (h.tags is not None and policy.allows(h.peer_id, h.tags) is not None)
    ]
    chosen: list[str] = []
    well_placed = len(holders) - len(misplaced)
    if well_placed >= policy.replication_factor:
        chosen.extend(sorted(h.peer_id for h in misplaced))
    remaining = len(holders) - len(chosen)
    surplus = remaining - policy.max_replicas
    if surplus > 0:
        rest = [h for h in unpinned if h.peer_id not in chosen]
        # Non-preferred first, then reverse rendezvous order: the peer placement would
        # pick last goes first.
        ordered = sorted(
            rest,
            key=lambda h: (h.peer_id in policy.preferred_peers, _neg(_score(model, h.peer_id))),
        )
        chosen.extend(h.peer_id for h in ordered[:surplus])
    return chosen


def _neg(score: bytes) -> bytes:
    """A key that sorts in the opposite order of ``score``."""
    return bytes(255 - b for b in score)
