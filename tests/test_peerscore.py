"""Peer strikes, bans that expire, rate estimates, and the upload token bucket (on a mock clock)."""

from __future__ import annotations

import trio
import trio.testing

from node.peerscore import PeerScores, TokenBucket


async def test_three_bad_chunks_ban_a_peer_until_the_ban_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scores = PeerScores(ban_after=3, ban_for=60)
    assert not scores.bad("p", "hash mismatch")
    assert not scores.bad("p", "hash mismatch")
    assert scores.bad("p", "hash mismatch")
    assert scores.is_banned("p") and not scores.is_banned("q")
    await trio.sleep(59)
    assert scores.is_banned("p")
    await trio.sleep(2)
    assert not scores.is_banned("p")
    assert scores.get("p").bad_chunks == 3 and scores.get("p").strikes == 0


async def test_rates_follow_the_measurements_and_stalls_halve_them() -> None:
    scores = PeerScores()
    scores.good("fast", 1_000_000, 0.01)
    scores.good("slow", 1_000_000, 1.0)
    assert scores.rate("fast") > 10 * scores.rate("slow")
    before = scores.rate("fast")
    scores.timeout("fast")
    assert scores.rate("fast") == before / 2


async def test_token_bucket_spaces_out_bytes(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=1000, burst=1000)
    start = trio.current_time()
    for _ in range(5):
        await bucket.take(1000)
    # The burst covers the first 1000 bytes; the other 4000 take 4 s at 1000 B/s.
    assert 3.9 <= trio.current_time() - start <= 4.1


async def test_unlimited_bucket_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=0)
    start = trio.current_time()
    await bucket.take(10**12)
    assert trio.current_time() == start
