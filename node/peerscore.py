"""Who to trust with work: per-peer transfer rates, bad-chunk strikes and temporary bans.

A peer that sends a chunk whose hash is wrong gets a strike; after ``ban_after`` strikes it
is banned for ``ban_for`` seconds (the node disconnects it and refuses its streams). Rates
are an exponentially weighted average of bytes per second, so faster peers get more work.
Time is trio's clock, so tests can run it with ``MockClock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

log = logging.getLogger("dmm.peers")

DEFAULT_BAN_AFTER = 3
# Peers whose scores are kept; past this the oldest unbanned one is forgotten.
MAX_PEERS_TRACKED = 4096
DEFAULT_BAN_FOR = 600.0
# Weight of the newest sample in the rate average: reacts within a few chunks.
_RATE_ALPHA = 0.3


@dataclass(slots=True)
class PeerScore:
    rate: float = 0.0  # bytes/s, EWMA; 0 = unknown
    bytes_in: int = 0
    good_chunks: int = 0
    bad_chunks: int = 0
    timeouts: int = 0
    strikes: int = 0
    banned_until: float = 0.0


class PeerScores:
    def __init__(
        self, *, ban_after: int = DEFAULT_BAN_AFTER, ban_for: float = DEFAULT_BAN_FOR
    ) -> None:
        self.ban_after = ban_after
        self.ban_for = ban_for
        self._scores: dict[str, PeerScore] = {}
        # Called with (peer, bytes, seconds) for each verified chunk: the metrics listen.
        self.chunk_listeners: list[Callable[[str, int, float], None]] = []

    def items(self) -> Iterator[tuple[str, PeerScore]]:
        return iter(list(self._scores.items()))

    def get(self, peer: str) -> PeerScore:
        score = self._scores.get(peer)
        if score is None:
            if len(self._scores) >= MAX_PEERS_TRACKED:
                self._forget_one()
            score = self._scores[peer] = PeerScore()
        return score

    def _forget_one(self) -> None:
        now = trio.current_time()
        for peer, score in self._scores.items():
            if score.banned_until <= now:
                del self._scores[peer]
                return
        del self._scores[next(iter(self._scores))]  # all banned: the oldest ban goes

    def good(self, peer: str, nbytes: int, seconds: float) -> None:
        score = self.get(peer)
        score.bytes_in += nbytes
        score.good_chunks += 1
        sample = nbytes / max(seconds, 1e-6)
        score.rate = (
            sample if score.rate == 0 else (1 - _RATE_ALPHA) * score.rate + _RATE_ALPHA * sample
        )
        for listener in self.chunk_listeners:
            listener(peer, nbytes, seconds)

    def bad(self, peer: str, reason: str) -> bool:
        """A chunk that failed verification; True when this strike bans the peer."""
        score = self.get(peer)
        score.bad_chunks += 1
        score.strikes += 1
        log.warning(
            "peer %s sent a bad chunk (%s): strike %d of %d",
            peer,
            reason,
            score.strikes,
            self.ban_after,
        )
        if score.strikes >= self.ban_after and not self.is_banned(peer):
            score.banned_until = trio.current_time() + self.ban_for
            log.warning(
                "peer %s banned for %.0fs after %d bad chunks", peer, self.ban_for, score.strikes
            )
            return True
        return False

    def timeout(self, peer: str) -> None:
        score = self.get(peer)
        score.timeouts += 1
        # A stall halves the peer's estimated rate, so it is given less work next.
        score.rate /= 2

    def is_banned(self, peer: str) -> bool:
        score = self._scores.get(peer)
        if score is None or score.banned_until == 0.0:
            return False
        if trio.current_time() >= score.banned_until:
            score.banned_until = 0.0
            score.strikes = 0
            return False
        return True

    def rate(self, peer: str) -> float:
        return self.get(peer).rate


class TokenBucket:
    """A byte-rate limit shared by tasks: ``await take(n)`` waits until n bytes may go."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0 (0 = unlimited)")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._tokens = self.burst
        self._stamp = 0.0
        self._lock = trio.Lock()

    async def take(self, nbytes: int) -> None:
        if self.rate == 0:
            return
        async with self._lock:
            now = trio.current_time()
            if self._stamp == 0.0:
                self._stamp = now
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            if self._tokens < 0:
                # Sleep off the debt while holding the lock: later takers queue behind us.
                await trio.sleep(-self._tokens / self.rate)
                self._stamp = trio.current_time()
                self._tokens = 0.0
