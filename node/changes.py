"""A "something observable changed" signal, so waiters re-check a condition at each change
instead of polling with sleeps.

The node notifies it when a connection opens or closes, a manifest is written or deleted,
a version record is new to its book, a gossip announcement arrives or is rejected, or a
replication health round ends. ``wait_until(predicate)``
returns as soon as the predicate holds; callers bound it with ``trio.fail_after``. A
predicate over anything not listed here would wait for an unrelated change: keep the list
and the callers in step.

``notify`` may be called from any thread (store writes happen in worker threads): the
wake-up is handed to the event loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable

import trio

__all__ = ["Changes", "wait_until_any"]


class Changes:
    def __init__(self) -> None:
        self._event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self.count = 0

    def notify(self) -> None:
        """Wake every waiter (safe from any thread)."""
        if threading.get_ident() == self._loop_thread:
            self._wake()
        else:
            # A node that has stopped has nobody waiting.
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self.count += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true, checking it now and after each change."""
        while not predicate():
            await self._event.wait()


async def wait_until_any(sources: Iterable[Changes], predicate: Callable[[], bool]) -> None:
    """``wait_until`` for a condition over several nodes: re-checked when any changes."""
    watched = list(sources)
    while not predicate():
        # Taken right after the check, with no checkpoint between: no change is missed.
        current = [source._event for source in watched]
        async with trio.open_nursery() as nursery:

            async def first(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            for event in current:
                nursery.start_soon(first, event)
