"""The audit log: append-only JSON lines of what peers and users did, and what was refused.

One line per event::

    {"time": "2026-11-29T02:31:07.123Z", "peer": "12D3KooW...", "action": "pull",
     "model": "llama3:8b", "version": "9f2c...", "outcome": "ok", "reason": null}

Actions in use: ``pull``, ``push``, ``delete``, ``replicate``, ``policy``, ``connect``
(refused connections), ``stream``, ``request``, ``catalog``, ``fetch``, ``record`` (refused
version records), ``limit`` (a peer slowed past its limits and disconnected), ``api``
(refused API requests). Outcomes: ``ok``, ``failed``, ``refused``.

``record`` never blocks and may be called from any thread: lines go into a bounded buffer
and the ``run`` task writes them from a worker thread, in batches. Past ``MAX_PENDING``
unwritten lines new ones are dropped and counted, and the count is written as a line of
its own once there is room. The file is rotated when the next batch would take it past
``max_size``: ``audit.log`` becomes ``audit.log.1``, ``.1`` becomes ``.2``, and so on up
to ``keep`` old files. Callers pass names, ids and short reasons, never secrets; reasons
are cut to ``MAX_REASON`` characters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Final

import trio

__all__ = ["MAX_PENDING", "MAX_REASON", "AuditLog"]

log = logging.getLogger("dmm.audit")

MAX_PENDING: Final = 10_000
MAX_REASON: Final = 300
# How long a line may wait in the buffer before the writer wakes up for it.
_FLUSH_INTERVAL: Final = 0.5


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class AuditLog:
    """Start ``run`` in a nursery; ``record`` from anywhere; ``flush`` to wait for the disk.

    A disabled log (``path=None``) accepts and forgets every record.
    """

    def __init__(self, path: Path | None, *, max_size: int = 10 << 20, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.path = path
        self.max_size = max_size
        self.keep = keep
        self.dropped = 0
        self.written = 0
        self._lock = threading.Lock()
        self._pending: list[str] = []
        # Lines are numbered as queued; flush waits until the writer has taken its number.
        self._lines_queued = 0
        self._lines_done = 0
        self._wakeup = trio.Event()  # flush: write now
        self._queued = trio.Event()  # the first line since the last write
        self._flushed = trio.Event()
        self._write_lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(
        self,
        action: str,
        *,
        peer: str | None = None,
        model: str | None = None,
        version: str | None = None,
        outcome: str = "ok",
        reason: str | None = None,
    ) -> None:
        """Queue one line. Never blocks, never raises for a full buffer (it counts instead)."""
        if self.path is None:
            return
        entry: dict[str, Any] = {
            "time": _now(),
            "peer": peer,
            "action": action,
            "model": model,
            "version": version,
            "outcome": outcome,
            "reason": None if reason is None else " ".join(reason.split())[:MAX_REASON],
        }
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            first = not self._pending
            self._pending.append(line)
            self._lines_queued += 1
        if first:
            self._wake_writer()

    def _wake_writer(self) -> None:
        # An idle log sleeps until a line comes (a node must not wake twice a second for
        # nothing); lines come from worker threads too.
        token = self._token
        if token is None:
            return  # `run` has not started: it looks at what is queued when it does
        if threading.get_ident() == self._loop_thread:
            self._queued.set()
        else:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(lambda: self._queued.set())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued lines until cancelled; what is queued then is written before returning."""
        if self.path is None:
            task_status.started()
            await trio.sleep_forever()
        await trio.to_thread.run_sync(self._prepare)
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                if not self._pending:
                    await self._queued.wait()
                self._queued = trio.Event()
                # Lines that follow within the interval go out in the same write.
                with trio.move_on_after(_FLUSH_INTERVAL):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self._write_pending()
        finally:
            with trio.CancelScope(shield=True):
                await self._write_pending()

    async def flush(self) -> None:
        """Return once everything recorded before the call is on disk (``run`` must run)."""
        with self._lock:
            target = self._lines_queued
        # A batch already on its way may predate our lines: wait for as many as it takes.
        while self._lines_done < target:
            flushed = self._flushed
            self._wakeup.set()
            await flushed.wait()

    def _prepare(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def _write_pending(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
            dropped, self.dropped = self.dropped, 0
            taken = self._lines_queued
        if dropped:
            lines.append(
                json.dumps(
                    {
                        "time": _now(),
                        "peer": None,
                        "action": "audit",
                        "model": None,
                        "version": None,
                        "outcome": "failed",
                        "reason": f"{dropped} audit lines dropped: the writer fell behind",
                    },
                    separators=(",", ":"),
                )
            )
        if lines:
            try:
                await trio.to_thread.run_sync(self._write, lines)
            except OSError as exc:
                log.error(
                    "audit log %s not written (%d lines lost): %s", self.path, len(lines), exc
                )
        self._lines_done = taken
        flushed, self._flushed = self._flushed, trio.Event()
        flushed.set()

    def _write(self, lines: list[str]) -> None:
        assert self.path is not None
        data = ("\n".join(lines) + "\n").encode()
        with self._write_lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.max_size:
                self._rotate()
            # O_APPEND: lines from this writer never interleave with a partial line.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self.written += len(lines)

    def _rotate(self) -> None:
        assert self.path is not None
        oldest = self._rotated(self.keep)
        oldest.unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            src = self._rotated(n)
            if src.exists():
                os.replace(src, self._rotated(n + 1))
        os.replace(self.path, self._rotated(1))
        log.info("audit log rotated: %s", self._rotated(1))

    def _rotated(self, n: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.name}.{n}")

    def files(self) -> list[Path]:
        """The current file and the rotated ones that exist, newest first."""
        if self.path is None:
            return []
        found = [self.path] if self.path.exists() else []
        return found + [p for n in range(1, self.keep + 1) if (p := self._rotated(n)).exists()]
