"""node/replication_policy.py: parsing, selection, and the choices every holder must agree on."""

from __future__ import annotations

import itertools

import pytest

from node.replication_policy import (
    Candidate,
    HolderView,
    PolicyDefaults,
    PolicyError,
    leader,
    parse_policy,
    placement,
    releases,
    select_policy,
)

DEFAULTS = PolicyDefaults(1, 3, 2)
PEERS = [
    "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X",
    "12D3KooWH3uVF6wv47WnArKHk5p6cvgCJEb74UTmxztmQDc298L3",
    "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
    "12D3KooWLJtG8fd2hkQzTn96MrLvThmnNQjTUFZwGEsLRz5EmSzc",
    "12D3KooWSHj3RRbBjD15g6wekV8y3mm57Pobmps2g2WJm6F67Lay",
]


def test_omitted_counts_take_the_defaults_clamped_to_the_policy() -> None:
    p = parse_policy({"glob": "llama*", "min_replicas": 3}, DEFAULTS)
    assert (p.min_replicas, p.max_replicas, p.replication_factor) == (3, 3, 3)
    p = parse_policy({"glob": "x*", "max_replicas": 1}, DEFAULTS)
    assert (p.min_replicas, p.max_replicas, p.replication_factor) == (1, 1, 1)


@pytest.mark.parametrize(
    "raw,field",
    [
        ({}, "glob"),
        ({"glob": "x", "min_replicas": 0}, "min_replicas"),
        ({"glob": "x", "min_replicas": 4, "max_replicas": 2}, "min_replicas"),
        ({"glob": "x", "replication_factor": 9}, "replication_factor"),
        ({"glob": "x", "excluded_peers": ["not-a-peer"]}, "excluded_peers"),
        (
            {"glob": "x", "preferred_peers": [PEERS[0]], "excluded_peers": [PEERS[0]]},
            "excluded_peers",
        ),
        ({"glob": "x", "constraints": {"region": 1}}, "constraints"),
        ({"glob": "x", "sync_interval": "soon"}, "sync_interval"),
        ({"glob": "x", "colour": "red"}, "colour"),
    ],
)
def test_bad_policies_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(raw, DEFAULTS)
    assert info.value.field == field


def test_the_most_important_then_most_specific_policy_applies() -> None:
    broad = parse_policy({"glob": "*"}, DEFAULTS)
    narrow = parse_policy({"glob": "llama3*"}, DEFAULTS)
    urgent = parse_policy({"glob": "ll*", "priority": 5}, DEFAULTS)
    assert select_policy([broad, narrow], "llama3:8b") is narrow
    assert select_policy([broad, narrow, urgent], "llama3:8b") is urgent
    assert select_policy([narrow], "qwen:1b") is None


def test_placement_respects_constraints_exclusions_space_and_preference() -> None:
    policy = parse_policy(
        {
            "glob": "m*",
            "constraints": {"region": "eu"},
            "excluded_peers": [PEERS[1]],
            "preferred_peers": [PEERS[4]],
        },
        DEFAULTS,
    )
    candidates = [
        Candidate(PEERS[0], {"region": "eu"}, 10**9, 0),
        Candidate(PEERS[1], {"region": "eu"}, 10**9, 0),  # excluded
        Candidate(PEERS[2], {"region": "us"}, 10**9, 0),  # wrong region
        Candidate(PEERS[3], {"region": "eu"}, 10, 0),  # too full
        Candidate(PEERS[4], {"region": "eu"}, 10**9, 3),  # preferred, though busy
    ]
    ranked = [c.peer_id for c in placement("m:1", 1000, policy, candidates)]
    assert ranked == [PEERS[4], PEERS[0]]


def test_every_holder_computes_the_same_choices_whatever_order_it_sees() -> None:
    policy = parse_policy({"glob": "m*", "min_replicas": 1, "max_replicas": 2}, DEFAULTS)
    candidates = [Candidate(p, {}, 10**9, 0) for p in PEERS]
    holders = [HolderView(PEERS[0], True)] + [HolderView(p, False) for p in PEERS[1:]]
    placements = {
        tuple(c.peer_id for c in placement("m:1", 1, policy, list(order)))
        for order in itertools.permutations(candidates)
    }
    assert len(placements) == 1
    chosen = {
        tuple(releases("m:1", policy, list(order))) for order in itertools.permutations(holders)
    }
    assert len(chosen) == 1
    [released] = chosen
    # Five copies, max 2: three go, never the pinned one.
    assert len(released) == 3 and PEERS[0] not in released
    assert leader(reversed(PEERS)) == min(PEERS)


def test_pinned_copies_are_never_released_even_far_above_max() -> None:
    policy = parse_policy({"glob": "m*", "max_replicas": 1}, DEFAULTS)
    holders = [HolderView(p, True) for p in PEERS]
    assert releases("m:1", policy, holders) == []


def test_a_misplaced_replica_goes_only_once_enough_well_placed_copies_exist() -> None:
    policy = parse_policy(
        {"glob": "m*", "min_replicas": 2, "constraints": {"region": "eu"}}, DEFAULTS
    )
    us = HolderView(PEERS[3], False, {"region": "us"})
    assert releases("m:1", policy, [HolderView(PEERS[0], True), us]) == []
    enough = [HolderView(PEERS[0], True), HolderView(PEERS[1], False), us]
    assert releases("m:1", policy, enough) == [PEERS[3]]
