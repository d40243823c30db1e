"""The version DAG and its conflict rules (protocols/dag.py): pure functions of the records.

Every node must reach the same winner from the same set of records in any order, and merges
signed independently for one conflict must not start a new one.
"""

from __future__ import annotations

import random

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dag import (
    VersionDag,
    compare_heads,
    conflict_tag,
    resolve,
    should_sign_merge,
)
from protocols.errors import LocalProtocolError
from protocols.records import VersionRecord, hlc_pack

MODEL = "registry.ollama.ai/library/shared"
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(8)]


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def rec(
    key: int,
    manifest: int,
    hlc_ms: int,
    parents: tuple[VersionRecord, ...] = (),
    *,
    tag: str = "latest",
) -> VersionRecord:
    return VersionRecord.sign(
        model=MODEL,
        tag=tag,
        manifest_digest=digest(manifest),
        size=manifest,
        parents=[p.version_id for p in parents],
        hlc=hlc_pack(1_700_000_000_000 + hlc_ms, 0),
        signing_key=KEYS[key],
    )


def merge(
    key: int, hlc_ms: int, parents: tuple[VersionRecord, ...], winner: VersionRecord
) -> VersionRecord:
    return VersionRecord.sign(
        model=MODEL,
        tag="latest",
        manifest_digest=winner.manifest_digest,
        size=winner.size,
        parents=[p.version_id for p in parents],
        hlc=hlc_pack(1_700_000_000_000 + hlc_ms, 0),
        signing_key=KEYS[key],
    )


def author(key: int) -> str:
    return rec(key, 1, 0).author


def test_heads_ancestors_descends_and_common_ancestor() -> None:
    v1 = rec(0, 1, 10)
    v2a = rec(0, 2, 20, (v1,))
    v2b = rec(1, 3, 30, (v1,))
    v3 = rec(1, 4, 40, (v2b,))
    dag = VersionDag([v3, v2a, v1, v2b])
    assert [h.version_id for h in dag.heads()] == sorted([v2a.version_id, v3.version_id])
    assert dag.ancestors(v3.version_id) == {v2b.version_id, v1.version_id}
    assert dag.descends(v3.version_id, v1.version_id)
    assert not dag.descends(v1.version_id, v3.version_id)
    assert not dag.descends(v2a.version_id, v2b.version_id)
    assert not dag.descends(v1.version_id, v1.version_id)
    assert dag.common_ancestor(v2a.version_id, v3.version_id) == v1
    assert dag.common_ancestor(v3.version_id, v2b.version_id) == v2b
    assert dag.common_ancestor(v2a.version_id, rec(2, 9, 5).version_id) is None
    assert [r.version_id for r in dag.records()] == [v.version_id for v in (v1, v2a, v2b, v3)]
    conflict = dag.conflict()
    assert conflict is not None and set(conflict.heads) == {v2a, v3}
    # A linear history has no conflict, and one head to follow.
    line = VersionDag([v1, v2b, v3])
    assert line.conflict() is None and line.resolved_head() == v3


def test_a_dag_holds_one_name() -> None:
    with pytest.raises(LocalProtocolError):
        VersionDag([rec(0, 1, 1), rec(0, 1, 1, tag="other")])


def test_missing_parents_are_just_unknown() -> None:
    v1 = rec(0, 1, 10)
    v2 = rec(0, 2, 20, (v1,))
    dag = VersionDag([v2])
    assert dag.heads() == (v2,)
    assert dag.ancestors(v2.version_id) == {v1.version_id}
    assert dag.common_ancestor(v2.version_id, v2.version_id) == v2


def test_heads_naming_the_same_manifest_are_no_conflict() -> None:
    # Two nodes added the same file independently.
    a, b = rec(0, 7, 10), rec(1, 7, 11)
    dag = VersionDag([a, b])
    assert dag.conflict() is None
    assert resolve(dag, "newest") is None
    assert dag.resolved_head() == b  # the greater rank, same manifest either way


def test_newest_prefer_author_and_tie_break() -> None:
    v1 = rec(0, 1, 10)
    old = rec(0, 2, 20, (v1,))
    new = rec(1, 3, 30, (v1,))
    dag = VersionDag([v1, old, new])
    newest = resolve(dag, "newest")
    assert newest is not None and newest.winner == new and newest.losers == (old,)
    trusted = resolve(dag, "prefer-author", [author(0)])
    assert trusted is not None and trusted.winner == old and trusted.losers == (new,)
    untrusted = resolve(dag, "prefer-author", [author(3)])
    assert untrusted is not None and untrusted.winner == new  # nobody trusted: newest
    # Same HLC: the greater version id wins.
    x, y = rec(2, 4, 50, (v1,)), rec(3, 5, 50, (v1,))
    tie = resolve(VersionDag([v1, x, y]), "newest")
    assert tie is not None and tie.winner == max(x, y, key=lambda r: r.version_id)
    with pytest.raises(LocalProtocolError):
        resolve(dag, "coin-toss")  # type: ignore[arg-type]


def test_independent_merges_of_one_conflict_do_not_conflict_again() -> None:
    v1 = rec(0, 1, 10)
    a, b = rec(0, 2, 20, (v1,)), rec(1, 3, 30, (v1,))
    m0 = merge(0, 40, (a, b), b)
    m2 = merge(2, 41, (a, b), b)
    dag = VersionDag([v1, a, b, m0, m2])
    assert set(dag.heads()) == {m0, m2}
    assert dag.conflict() is None
    assert dag.original(m0) == b and dag.original(m2) == b
    assert dag.merge_losers(m0) == [a]
    assert dag.merges() == [m0, m2]


def test_a_late_merge_ranks_as_the_version_it_chose() -> None:
    """X saw {a, b} and kept a; Y saw {a, b, c} and kept c (the newest): every node then
    settles on c, as if all had seen the three at once, though X's merge is signed later."""
    v1 = rec(0, 1, 10)
    a, b, c = rec(0, 2, 30, (v1,)), rec(1, 3, 20, (v1,)), rec(2, 4, 40, (v1,))
    m_y = merge(2, 50, (a, b, c), c)
    m_x = merge(0, 60, (a, b), a)
    dag = VersionDag([v1, a, b, c, m_x, m_y])
    resolution = resolve(dag, "newest")
    assert resolution is not None
    assert resolution.winner == m_y and resolution.original == c
    assert resolution.losers == (a,)
    # A new edit on top of a merge is newer than anything before it.
    v3 = rec(0, 9, 70, (m_x,))
    later = resolve(VersionDag([v1, a, b, c, m_x, m_y, v3]), "newest")
    assert later is not None and later.winner == v3


def test_a_node_that_merged_waits_instead_of_merging_again() -> None:
    """Two nodes settling by different policies must not answer merge with merge forever."""
    v1 = rec(0, 1, 10)
    a, b = rec(0, 2, 20, (v1,)), rec(1, 3, 30, (v1,))
    m_trusting = merge(0, 40, (a, b), a)  # prefer-author trusting key 0
    m_newest = merge(1, 41, (a, b), b)  # newest
    dag = VersionDag([v1, a, b, m_trusting, m_newest])
    by_newest = resolve(dag, "newest")
    by_trust = resolve(dag, "prefer-author", [author(0)])
    assert by_newest is not None and by_trust is not None
    assert by_newest.original == b and by_trust.original == a
    assert not should_sign_merge(dag, by_newest, author(1))
    assert not should_sign_merge(dag, by_trust, author(0))
    # A third node with either policy has said nothing yet, so it merges.
    assert should_sign_merge(dag, by_newest, author(2))


def test_compare_heads_states() -> None:
    v1 = rec(0, 1, 10)
    v2 = rec(0, 2, 20, (v1,))
    other = rec(1, 3, 30, (v1,))
    assert compare_heads([v1], [v1, v2]) == "behind"
    assert compare_heads([v1, v2], [v1]) == "ahead"
    assert compare_heads([v1, v2], [v2, v1]) == "in-sync"
    assert compare_heads([v1, v2], [v1, other]) == "diverged"
    assert compare_heads([], [v1]) == "behind"
    assert compare_heads([v1], []) == "ahead"
    # Equivalent merges: different records, same manifest, nothing to fetch.
    m0, m1 = merge(0, 40, (v2, other), other), merge(1, 41, (v2, other), other)
    assert compare_heads([v1, v2, other, m0], [v1, v2, other, m1]) == "in-sync"


def test_conflict_tag_is_a_valid_tag() -> None:
    loser = rec(0, 2, 20)
    assert conflict_tag("v2", loser) == f"v2-conflict-{loser.version_id.hex()[:12]}"
    long = conflict_tag("t" * 80, loser)
    assert len(long) == 80 and long.endswith(loser.version_id.hex()[:12])


# --- determinism: any order of the same records, the same answer -----------------------------


def _history(seed: int) -> list[VersionRecord]:
    """A random DAG: branches off random earlier versions, some merges among heads."""
    rng = random.Random(seed)
    records = [rec(rng.randrange(4), 1, 0)]
    for _ in range(1, rng.randrange(3, 12)):
        if rng.random() < 0.25 and len(records) > 2:
            parents = tuple(rng.sample(records, 2))
            winner = rng.choice(parents)
            records.append(merge(rng.randrange(4), rng.randrange(100), parents, winner))
        else:
            parent = rng.choice(records)
            # Few manifests and hlcs, so equal manifests and hlc ties happen often.
            records.append(
                rec(rng.randrange(4), rng.randrange(2, 6), rng.randrange(100), (parent,))
            )
    return records


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    order=st.randoms(use_true_random=False),
    strategy=st.sampled_from(["newest", "prefer-author", "keep-both", "manual"]),
)
def test_any_order_of_the_same_records_gives_the_same_winner(
    seed: int, order: random.Random, strategy: str
) -> None:
    records = _history(seed)
    shuffled = list(records)
    order.shuffle(shuffled)
    trusted = [author(seed % 4)]
    one = resolve(VersionDag(records), strategy, trusted)  # type: ignore[arg-type]
    two = resolve(VersionDag(shuffled), strategy, trusted)  # type: ignore[arg-type]
    assert (one is None) == (two is None)
    if one is not None and two is not None:
        assert one.winner == two.winner and one.losers == two.losers
        assert one.original == two.original
    assert VersionDag(records).heads() == VersionDag(shuffled).heads()


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), strategy=st.sampled_from(["newest", "keep-both"]))
def test_every_node_merging_the_same_conflict_ends_the_conflict(seed: int, strategy: str) -> None:
    """However many nodes sign a merge for the conflict they all see, no conflict is left."""
    records = _history(seed)
    dag = VersionDag(records)
    resolution = resolve(dag, strategy)  # type: ignore[arg-type]
    if resolution is None:
        return
    # Nodes 4..7 signed nothing in the history: each settles it.
    assert all(should_sign_merge(dag, resolution, author(k)) for k in range(4, 8))
    merges = [merge(k, 200 + k, resolution.conflict.heads, resolution.winner) for k in range(4, 8)]
    after = VersionDag([*records, *merges])
    assert after.conflict() is None
    head = after.resolved_head()
    assert head is not None and head.manifest_digest == resolution.winner.manifest_digest
