"""What the node is doing now: transfers in flight and a short history of events.

``dmm status`` draws from this (through ``/api/status``). Transfers are learnt from the
pull's own progress events, so every pull — CLI, API, followed model — shows up without
the pull code knowing about it. The history is a bounded ring: it never grows.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from node.pull import Emit

MAX_EVENTS = 100
# Weight of the newest sample in a transfer's rate: steady within a second or two.
_RATE_ALPHA = 0.3


@dataclass(slots=True)
class Event:
    at: float  # unix time
    kind: str
    text: str
    model: str = ""
    peer: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind,
            "text": self.text,
            "model": self.model,
            "peer": self.peer,
        }


@dataclass(slots=True)
class Transfer:
    model: str
    started: float
    status: str = "starting"
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # digest -> (done, total)
    peers: int = 0
    rate: float = 0.0  # bytes/s, smoothed
    _last: tuple[float, int] = (0.0, 0)

    @property
    def completed(self) -> int:
        return sum(done for done, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(total for _, total in self.layers.values())

    def update(self, event: dict[str, Any], now: float) -> None:
        self.status = str(event.get("status", self.status))
        digest = event.get("digest")
        if isinstance(digest, str) and isinstance(event.get("total"), int):
            self.layers[digest] = (int(event.get("completed", 0)), int(event["total"]))
            peers = event.get("peers")
            if isinstance(peers, int):
                self.peers = peers
        then, was = self._last
        done = self.completed
        if then and now > then:
            sample = max(done - was, 0) / (now - then)
            self.rate = (
                sample if self.rate == 0 else ((1 - _RATE_ALPHA) * self.rate + _RATE_ALPHA * sample)
            )
        self._last = (now, done)

    def to_json(self) -> dict[str, Any]:
        remaining = self.total - self.completed
        return {
            "model": self.model,
            "status": self.status,
            "completed": self.completed,
            "total": self.total,
            "peers": self.peers,
            "rate": round(self.rate, 1),
            "eta": round(remaining / self.rate, 1) if self.rate > 0 and remaining > 0 else None,
            "started": self.started,
        }


class Activity:
    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.events: deque[Event] = deque(maxlen=max_events)
        self.transfers: dict[int, Transfer] = {}
        self._next_id = 0

    def event(self, kind: str, text: str, *, model: str = "", peer: str = "") -> None:
        self.events.append(Event(time.time(), kind, text, model, peer))

    def track(self, model: str, emit: Emit) -> tuple[int, Emit]:
        """Register a transfer of ``model``; returns its id and an ``emit`` that also
        updates it. Call ``finish(id)`` when the pull ends, however it ends."""
        self._next_id += 1
        tid = self._next_id
        transfer = Transfer(model, time.time())
        self.transfers[tid] = transfer

        async def tracked(event: dict[str, Any]) -> None:
            transfer.update(event, time.monotonic())
            await emit(event)

        return tid, tracked

    def finish(self, tid: int) -> None:
        self.transfers.pop(tid, None)

    def snapshot(self, events: int = 20) -> dict[str, Any]:
        recent = list(self.events)[-events:] if events > 0 else []
        return {
            "transfers": [t.to_json() for t in self.transfers.values()],
            "events": [e.to_json() for e in reversed(recent)],
        }
