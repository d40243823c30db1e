"""Per-peer and global bounds on what peers may ask of this node, and refused connections.

``Limits`` (one per node, from ``[limits]``) is asked by every inbound stream and request:

- ``open_stream(peer)`` before a handler runs: refused past ``peer_streams`` streams of that
  peer or ``streams`` in all, and for a banned peer.
- ``await request(peer)`` for each catalog or block request and each new stream: a peer
  over ``peer_requests``/s (or all peers over ``requests``/s) waits, which slows its stream
  down (we stop reading it). A peer still over its rate after ``disconnect_after`` seconds
  is disconnected and banned for ``ban_for``: ``request`` raises ``LimitExceeded``.
- ``violation(peer, reason)`` for a refused or malformed request (a wantlist past
  ``max_wantlist``, a protocol error, too many streams): the ``max_violations``-th one
  disconnects and bans the peer.
- ``on_send`` / ``on_receive`` (the ``node.p2p.StreamMeter`` of every dmm stream): bytes per
  second per peer each way and received in total; the total sent is
  ``storage.upload_rate_limit`` (the block provider's bucket).

Memory stays bounded whatever peers do: at most ``max_peers_tracked`` peers have counters
(the longest-idle one is forgotten to make room; a peer with open streams never is, and a new
peer is refused while all are busy), idle ones expire after ``IDLE_EXPIRY``, and the bans and
the refused-connection table have the same cap. Time is trio's clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from node.audit import AuditLog
from node.config import LimitsConfig
from node.p2p import Stream, StreamHandler
from node.peerscore import TokenBucket

__all__ = ["DISCONNECT_GRACE", "IDLE_EXPIRY", "LimitExceeded", "Limits", "Refusal"]

log = logging.getLogger("dmm.limits")

# A peer with no stream and no request for this long is forgotten.
IDLE_EXPIRY: Final = 600.0
_SWEEP_INTERVAL: Final = 60.0
# /api/peers lists at most this many refused peers (the newest).
_REFUSALS_SHOWN: Final = 100
# A peer being disconnected gets this long to read the final refusal that says why.
DISCONNECT_GRACE: Final = 0.5


class LimitExceeded(Exception):
    """The peer went over its limits and is being disconnected: end its stream."""


class _Pacer:
    """Requests spaced 1/rate apart with a burst of one second's worth (GCRA)."""

    __slots__ = ("_interval", "_next", "_span")

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._span = max(rate - 1.0, 0.0) * self._interval
        self._next = -math.inf

    def half_full(self, now: float) -> bool:
        """Whether at least half the burst is available: the peer has been under the rate."""
        return self._next <= now - self._span / 2

    def delay(self, now: float) -> float:
        """Book the next slot; how long the request must wait for it (0 = within the rate)."""
        slot = max(self._next, now - self._span)
        self._next = slot + self._interval
        return max(slot - now, 0.0)


@dataclass(slots=True)
class _Peer:
    pacer: _Pacer
    up: TokenBucket | None
    down: TokenBucket | None
    streams: int = 0
    requests: int = 0
    slowed: int = 0
    violations: int = 0
    over_since: float | None = None
    last_seen: float = 0.0


@dataclass(slots=True)
class Refusal:
    """Connections or streams of one peer refused: how often, when, why (the latest)."""

    count: int = 0
    first: float = 0.0  # unix time
    last: float = 0.0
    reason: str = ""

    def to_json(self, peer: str) -> dict[str, Any]:
        return {
            "peer_id": peer,
            "count": self.count,
            "first": round(self.first, 3),
            "last": round(self.last, 3),
            "reason": self.reason,
        }


@dataclass(slots=True)
class LimitStats:
    slowed: int = 0  # requests that had to wait
    streams_refused: int = 0
    violations: int = 0
    disconnects: int = 0
    peers_forgotten: int = 0  # evicted for room or expired
    disconnected: dict[str, str] = field(default_factory=dict)  # last few: peer -> reason


class Limits:
    """Start ``run`` with ``nursery.start`` (disconnects and the idle sweep run there)."""

    def __init__(
        self,
        config: LimitsConfig,
        *,
        audit: AuditLog | None = None,
        disconnect: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.audit = audit
        self.stats = LimitStats()
        # Set once the host exists; None = bans only, no disconnect.
        self.disconnect = disconnect
        self.on_change: Callable[[], None] | None = None  # called when a peer is banned
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._bans: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._refused: OrderedDict[str, Refusal] = OrderedDict()
        self._global = _Pacer(config.requests)
        self._global_down = TokenBucket(config.download_rate) if config.download_rate else None
        self._streams = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(_SWEEP_INTERVAL)
                self.sweep()

    # ------------------------------------------------------------------ peers table

    def _entry(self, peer: str) -> _Peer | None:
        """The peer's counters, made if need be; None when the table is full of busy peers."""
        entry = self._peers.get(peer)
        now = trio.current_time()
        if entry is None:
            if len(self._peers) >= self.config.max_peers_tracked and not self._evict_one():
                return None
            cfg = self.config
            entry = _Peer(
                pacer=_Pacer(cfg.peer_requests),
                up=_bucket(cfg.peer_upload_rate),
                down=_bucket(cfg.peer_download_rate),
            )
            self._peers[peer] = entry
        else:
            self._peers.move_to_end(peer)
        entry.last_seen = now
        return entry

    def _evict_one(self) -> bool:
        for peer, entry in self._peers.items():
            if entry.streams == 0:
                del self._peers[peer]
                self.stats.peers_forgotten += 1
                return True
        return False

    def sweep(self) -> None:
        """Forget idle peers and expired bans (``run`` calls this every minute)."""
        now = trio.current_time()
        idle = [
            p for p, e in self._peers.items() if e.streams == 0 and now - e.last_seen > IDLE_EXPIRY
        ]
        for peer in idle:
            del self._peers[peer]
        self.stats.peers_forgotten += len(idle)
        for peer in [p for p, (until, _) in self._bans.items() if until <= now]:
            del self._bans[peer]

    def tracked(self) -> int:
        return len(self._peers)

    # -------------------------------------------------------------------- bans

    def ban_reason(self, peer: str) -> str | None:
        """Why ``peer`` is banned now, or None."""
        ban = self._bans.get(peer)
        if ban is None:
            return None
        until, reason = ban
        left = until - trio.current_time()
        if left <= 0:
            del self._bans[peer]
            return None
        return f"banned for another {left:.0f}s: {reason}"

    def _disconnect(self, peer: str, reason: str) -> None:
        if peer in self._bans:
            return
        if len(self._bans) >= self.config.max_peers_tracked:
            self._bans.popitem(last=False)
        self._bans[peer] = (trio.current_time() + self.config.ban_for, reason)
        entry = self._peers.get(peer)
        if entry is not None:  # after the ban it starts afresh
            entry.violations = 0
            entry.over_since = None
        self.stats.disconnects += 1
        shown = self.stats.disconnected
        if len(shown) >= _REFUSALS_SHOWN:
            del shown[next(iter(shown))]
        shown[peer] = reason
        log.warning(
            "peer %s disconnected and banned for %.0fs: %s", peer, self.config.ban_for, reason
        )
        if self.audit is not None:
            self.audit.record("limit", peer=peer, outcome="refused", reason=reason)
        if self.on_change is not None:
            self.on_change()
        if self._nursery is not None and self.disconnect is not None:
            self._nursery.start_soon(self._disconnect_soon, peer, self.disconnect)

    async def _disconnect_soon(
        self, peer: str, disconnect: Callable[[str], Awaitable[None]]
    ) -> None:
        # Its streams are refused from now on (the ban); the grace lets the reply out.
        await trio.sleep(DISCONNECT_GRACE)
        await disconnect(peer)

    # ------------------------------------------------------------------ streams

    def open_stream(self, peer: str, protocol: str) -> str | None:
        """Count a new inbound stream; the reason it is refused instead, or None."""
        reason = self.ban_reason(peer)
        if reason is None and self._streams >= self.config.streams:
            reason = f"{self._streams} streams open here (limits.streams)"
        entry = None
        if reason is None:
            entry = self._entry(peer)
            if entry is None:
                reason = "too many peers busy here (limits.max_peers_tracked)"
            elif entry.streams >= self.config.peer_streams:
                reason = f"{entry.streams} streams open from this peer (limits.peer_streams)"
                self.violation(peer, reason)
        if reason is not None or entry is None:
            self.stats.streams_refused += 1
            log.info("refused a %s stream from %s: %s", protocol, peer, reason)
            if self.audit is not None:
                self.audit.record("stream", peer=peer, outcome="refused", reason=reason)
            return reason
        entry.streams += 1
        self._streams += 1
        return None

    def guard(self, protocol: str, handler: StreamHandler) -> StreamHandler:
        """``handler`` behind these limits: the stream is counted (or refused and reset), and
        opening it counts as a request. Register every dmm protocol's handler through this."""

        async def guarded(stream: Stream) -> None:
            peer = stream.peer_id
            if self.open_stream(peer, protocol) is not None:
                await stream.reset()
                return
            try:
                try:
                    await self.request(peer)
                except LimitExceeded:
                    await stream.reset()
                    return
                await handler(stream)
            finally:
                self.close_stream(peer)

        return guarded

    def close_stream(self, peer: str) -> None:
        self._streams -= 1
        entry = self._peers.get(peer)
        if entry is not None:
            entry.streams -= 1
            entry.last_seen = trio.current_time()

    # ----------------------------------------------------------------- requests

    async def request(self, peer: str) -> None:
        """Admit one request: waits while the peer (or everyone) is over the rate.

        Raises ``LimitExceeded`` when the peer has been over its rate for
        ``disconnect_after`` seconds (it is being disconnected) or is banned.
        """
        reason = self.ban_reason(peer)
        if reason is not None:
            raise LimitExceeded(reason)
        entry = self._entry(peer)
        if entry is None:
            raise LimitExceeded("too many peers busy here")
        now = trio.current_time()
        entry.requests += 1
        # "Over" ends only once the peer let its burst half refill: a client asking again
        # the moment each slowed request is answered stays over, however fast the replies.
        if entry.pacer.half_full(now):
            entry.over_since = None
        wait = max(entry.pacer.delay(now), self._global.delay(now))
        if wait > 0:
            entry.slowed += 1
            self.stats.slowed += 1
            if entry.over_since is None:
                entry.over_since = now
                log.info("peer %s is over its request rate: slowing it down", peer)
        if (
            entry.over_since is not None
            and now + wait - entry.over_since > self.config.disconnect_after
        ):
            reason = (
                f"over {self.config.peer_requests:g} requests/s for "
                f"{self.config.disconnect_after:g}s ({entry.requests} requests)"
            )
            self._disconnect(peer, reason)
            raise LimitExceeded(reason)
        if wait > 0:
            await trio.sleep(wait)
        else:
            await trio.lowlevel.checkpoint()

    def violation(self, peer: str, reason: str) -> bool:
        """A refused or malformed request; True when it got the peer disconnected."""
        self.stats.violations += 1
        if self.audit is not None:
            self.audit.record("request", peer=peer, outcome="refused", reason=reason)
        entry = self._entry(peer)
        if entry is None:
            return False
        entry.violations += 1
        if entry.violations >= self.config.max_violations:
            self._disconnect(peer, f"{entry.violations} refused requests; last: {reason}")
            return True
        return False

    # -------------------------------------------------------------------- bytes

    async def on_send(self, peer: str, nbytes: int) -> None:
        entry = self._peers.get(peer) if self.config.peer_upload_rate else None
        if entry is not None and entry.up is not None:
            await entry.up.take(nbytes)

    async def on_receive(self, peer: str, nbytes: int) -> None:
        # Shielded: the bytes are read already, and a cancelled read would lose them.
        if self.config.peer_download_rate:
            entry = self._entry(peer)
            if entry is not None and entry.down is not None:
                with trio.CancelScope(shield=True):
                    await entry.down.take(nbytes)
        if self._global_down is not None:
            with trio.CancelScope(shield=True):
                await self._global_down.take(nbytes)

    # ------------------------------------------------------ refused connections

    def refused(self, peer: str, what: str, reason: str) -> None:
        """Count a refused connection or stream (``what``) of ``peer``; audited."""
        entry = self._refused.get(peer)
        now = time.time()
        if entry is None:
            if len(self._refused) >= self.config.max_peers_tracked:
                self._refused.popitem(last=False)
            entry = self._refused[peer] = Refusal(first=now)
        else:
            self._refused.move_to_end(peer)
        entry.count += 1
        entry.last = now
        entry.reason = reason
        log.info("refused a %s from %s: %s", what, peer, reason)
        if self.audit is not None:
            self.audit.record(what, peer=peer, outcome="refused", reason=reason)

    def refusals(self) -> list[dict[str, Any]]:
        """The newest refused peers first, at most ``_REFUSALS_SHOWN``."""
        items = list(self._refused.items())[-_REFUSALS_SHOWN:]
        return [entry.to_json(peer) for peer, entry in reversed(items)]

    def snapshot(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "tracked_peers": len(self._peers),
            "streams": self._streams,
            "banned": [
                {"peer_id": p, "seconds_left": round(until - now, 1), "reason": r}
                for p, (until, r) in list(self._bans.items())[-_REFUSALS_SHOWN:]
                if until > now
            ],
            "slowed": self.stats.slowed,
            "streams_refused": self.stats.streams_refused,
            "violations": self.stats.violations,
            "disconnects": self.stats.disconnects,
        }


def _bucket(rate: int) -> TokenBucket | None:
    # A burst of one largest block, so a block is never split into several waits.
    return TokenBucket(rate, burst=max(rate, 2 << 20)) if rate else None
