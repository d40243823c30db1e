"""Super-seeding decisions (node/seeding.py): who is sent elsewhere, for what, and never twice."""

from __future__ import annotations

from node.seeding import SuperSeeder

BLOB = "sha256:" + "ab" * 32
A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
CHUNK = 1024 * 1024


def seeder(connected: set[str] | None = None, **kwargs: float) -> SuperSeeder:
    peers = connected if connected is not None else {"p1", "p2", "p3"}
    return SuperSeeder(peers.__contains__, min_age=1.0, active_for=10.0, **kwargs)  # type: ignore[arg-type]


def test_one_puller_alone_is_always_served() -> None:
    s = seeder()
    s.sending("p1", BLOB, A, 0.0)
    # p1 asks again for A, much later, and it is the only one fetching: served.
    assert s.elsewhere("p1", BLOB, A, 5.0, length=CHUNK) == ()
    assert s.elsewhere("p1", BLOB, B, 5.0, length=CHUNK) == ()
    assert s.redirected == 0


def test_a_chunk_sent_to_another_fetcher_is_sent_elsewhere_once() -> None:
    s = seeder()
    assert s.elsewhere("p1", BLOB, A, 0.0, length=CHUNK) == ()
    s.sending("p1", BLOB, A, 0.0)
    assert (
        s.elsewhere("p2", BLOB, B, 0.1, length=CHUNK) == ()
    )  # p2 fetches too: now there is contention
    s.sending("p2", BLOB, B, 0.1)
    # Too soon after sending: p1 cannot have A yet.
    assert s.elsewhere("p2", BLOB, A, 0.5, length=CHUNK) == ()
    assert s.elsewhere("p2", BLOB, A, 1.5, length=CHUNK) == ("p1",)
    # Asking again gets the chunk: progress never depends on the peer we named.
    assert s.elsewhere("p2", BLOB, A, 1.6, length=CHUNK) == ()
    assert s.redirected == 1


def test_recipients_are_named_oldest_first_and_never_the_asker_or_a_peer_gone() -> None:
    connected = {"p1", "p2", "p3", "p4"}
    s = seeder(connected)
    for i, peer in enumerate(("p1", "p2", "p3")):
        s.elsewhere(peer, BLOB, B, float(i), length=CHUNK)
        s.sending(peer, BLOB, A, float(i))
    s.elsewhere("p4", BLOB, B, 4.0, length=CHUNK)
    assert s.elsewhere("p4", BLOB, A, 4.0, length=CHUNK) == ("p1", "p2", "p3")
    connected.discard("p1")
    assert s.elsewhere("p3", BLOB, A, 5.0, length=CHUNK) == ("p2",)  # not p1 (gone), not p3 itself


def test_a_peer_that_stopped_fetching_no_longer_counts_as_contention() -> None:
    s = seeder()
    s.elsewhere("p1", BLOB, B, 0.0, length=CHUNK)
    s.sending("p1", BLOB, A, 0.0)
    # p1 asked nothing for longer than active_for: p2 is the only fetcher left.
    assert s.elsewhere("p2", BLOB, A, 20.0, length=CHUNK) == ()


def test_tables_are_bounded() -> None:
    s = seeder(max_blobs=2, max_hints=1)
    for n in range(5):
        s.elsewhere("p1", f"sha256:{n:064x}", A, 0.0, length=CHUNK)
    assert len(s._blobs) == 2
    s.elsewhere("p1", BLOB, B, 0.0, length=CHUNK)
    s.elsewhere("p2", BLOB, B, 0.0, length=CHUNK)
    for peer in ("p1", "p2", "p3"):
        s.sending(peer, BLOB, A, 0.0)
        s.sending(peer, BLOB, C, 0.0)
    assert s.elsewhere("p3", BLOB, A, 2.0, length=CHUNK) != ()
    assert s.elsewhere("p3", BLOB, C, 2.0, length=CHUNK) == ()  # the hint table is full: just serve
    # A chunk remembers only the latest few recipients.
    for i in range(20):
        s.sending(f"q{i}", BLOB, B, 0.0)
    assert len(s._blobs[BLOB].sent[B]) == 8


def test_the_record_of_sends_is_bounded_over_all_blobs() -> None:
    s = seeder(max_sent=5, max_blobs=2)
    for n in range(10):
        s.sending("p1", BLOB, bytes([n]) * 32, 0.0)
    assert sum(len(r) for r in s._blobs[BLOB].sent.values()) == 5
    # Evicting a blob gives its entries back.
    s.sending("p1", "sha256:" + "01" * 32, A, 0.0)
    s.sending("p1", "sha256:" + "02" * 32, A, 0.0)
    assert BLOB not in s._blobs
    s.sending("p1", "sha256:" + "02" * 32, B, 0.0)
    assert len(s._blobs["sha256:" + "02" * 32].sent) == 2


def test_a_small_chunk_is_always_served() -> None:
    s = seeder()
    s.sending("p1", BLOB, A, 0.0)
    for peer in ("p1", "p2"):  # two fetchers: contention
        s.elsewhere(peer, BLOB, B, 0.0, length=CHUNK)
    # p1 got A long enough ago to be named, but a config blob's few hundred bytes are
    # cheaper to send than a redirect.
    assert s.elsewhere("p2", BLOB, A, 2.0, length=300) == ()
    assert s.elsewhere("p2", BLOB, A, 2.0, length=CHUNK) == ("p1",)
