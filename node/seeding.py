"""Super-seeding: a holder that many peers pull one blob from sends each chunk about once.

Without it, N pullers that start together each ask the holder for most of the blob
before they have found one another, and the holder's link carries the model N times.
BitTorrent's answer is super-seeding: the seed hands each piece to one peer and lets the
swarm spread it. Here the holder keeps, per blob, which peers it sent each chunk to and
when. A request for a chunk that went to another peer a moment ago, while other peers
are fetching the same blob from us, is answered ``Elsewhere(those peers)`` instead of
with the chunk; the client fetches it from them (pullers serve what they hold mid-fetch,
node/live_chunks.py) and spends our link on chunks nobody has yet.

Progress is never at risk: a peer is sent elsewhere at most once per chunk, and asking
again gets the chunk. One peer alone fetching a blob is always served directly.

Runs on the event loop only; every table is bounded.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from protocols.blocks import MAX_ELSEWHERE_PEERS

__all__ = ["SuperSeeder"]

# A peer we started sending a chunk this long ago is named for it. It may not hold it yet
# (the bytes may sit in buffers; it verifies before serving): a client asks it again a few
# times before coming back to us (node/transfer.py).
DEFAULT_MIN_AGE = 0.5
# Chunks smaller than this are always served: the Elsewhere reply, and the client's round
# trips to the peers it names (which may not have checked the chunk yet, and answer
# DontHave until they have), cost more than the chunk. A model's config blob is one
# such chunk of a few hundred bytes, and a swarm of 8 spent seconds on it.
MIN_REDIRECT_BYTES = 64 * 1024
# A peer that asked for a block of the blob this recently is still fetching it.
DEFAULT_ACTIVE_FOR = 10.0
# Blobs tracked at once (least recently used go first), hints kept per blob, and
# (peer, chunk) sends remembered over all blobs: a few MiB at most.
MAX_BLOBS = 32
MAX_HINTS_PER_BLOB = 200_000
MAX_SENT_ENTRIES = 100_000


@dataclass(slots=True)
class _Blob:
    # peer -> when it last asked us for a block of this blob
    fetchers: dict[str, float] = field(default_factory=dict)
    # chunk id -> the latest peers we sent it to, oldest first, with when
    sent: dict[bytes, list[tuple[str, float]]] = field(default_factory=dict)
    # (peer, chunk id) already sent elsewhere once: served if asked again
    hinted: set[tuple[str, bytes]] = field(default_factory=set)


class SuperSeeder:
    """Decides, per block request, whether to serve it or name peers that have it.

    ``reachable(peer)`` says whether a peer is still connected to us (a peer that left is
    never named). ``sent`` records a block as it goes out; ``elsewhere`` answers a request.
    """

    def __init__(
        self,
        reachable: Callable[[str], bool],
        *,
        min_age: float = DEFAULT_MIN_AGE,
        active_for: float = DEFAULT_ACTIVE_FOR,
        max_blobs: int = MAX_BLOBS,
        max_hints: int = MAX_HINTS_PER_BLOB,
        max_sent: int = MAX_SENT_ENTRIES,
    ) -> None:
        self.reachable = reachable
        self.min_age = min_age
        self.active_for = active_for
        self.max_blobs = max_blobs
        self.max_hints = max_hints
        self.max_sent = max_sent
        self._sent_entries = 0
        self._blobs: collections.OrderedDict[str, _Blob] = collections.OrderedDict()
        self.redirected = 0  # requests answered Elsewhere

    def _blob(self, digest: str) -> _Blob:
        blob = self._blobs.get(digest)
        if blob is None:
            blob = self._blobs[digest] = _Blob()
            while len(self._blobs) > self.max_blobs:
                _, gone = self._blobs.popitem(last=False)
                self._sent_entries -= sum(len(r) for r in gone.sent.values())
        else:
            self._blobs.move_to_end(digest)
        return blob

    def elsewhere(
        self, peer: str, digest: str, chunk_id: bytes, now: float, *, length: int
    ) -> tuple[str, ...]:
        """Peers to send ``peer`` to for this chunk of ``length`` bytes, or ``()`` to
        serve it now."""
        blob = self._blob(digest)
        blob.fetchers[peer] = now
        if length < MIN_REDIRECT_BYTES:
            return ()
        if (peer, chunk_id) in blob.hinted or len(blob.hinted) >= self.max_hints:
            return ()
        if self._fetching(blob, now) < 2:  # no contention: one puller gets everything from us
            return ()
        # A recipient that has finished the blob since is as good: it serves it whole.
        named = tuple(
            other
            for other, at in blob.sent.get(chunk_id, ())
            if other != peer and now - at >= self.min_age and self.reachable(other)
        )
        if named:
            blob.hinted.add((peer, chunk_id))
            self.redirected += 1
        return named

    def sending(self, peer: str, digest: str, chunk_id: bytes, now: float) -> None:
        """We are about to send ``chunk_id`` of ``digest`` to ``peer``."""
        blob = self._blob(digest)
        recipients = blob.sent.get(chunk_id)
        if recipients is None:
            if self._sent_entries >= self.max_sent:
                return  # the table is full: this chunk is simply served again if asked
            recipients = blob.sent[chunk_id] = []
        before = len(recipients)
        recipients[:] = [(p, at) for p, at in recipients if p != peer]
        recipients.append((peer, now))
        del recipients[:-MAX_ELSEWHERE_PEERS]
        self._sent_entries += len(recipients) - before

    def _fetching(self, blob: _Blob, now: float) -> int:
        """How many peers are fetching the blob from us now."""
        for peer, at in list(blob.fetchers.items()):
            if now - at > self.active_for or not self.reachable(peer):
                del blob.fetchers[peer]
        return len(blob.fetchers)
