"""Progress bars for long work: bytes, rate and ETA on the terminal, silence elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from storage.store import Reporter


class _Bars:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._current: TaskID | None = None

    def __call__(self, label: str, total: int) -> Callable[[int], None]:
        # One bar at a time: the finished one stays on screen, the next starts below.
        if self._current is not None:
            self._progress.stop_task(self._current)
        task = self._progress.add_task(label, total=max(total, 1))
        self._current = task

        def advance(n: int) -> None:
            self._progress.advance(task, n)

        return advance


@contextlib.contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[Reporter]:
    """A Reporter that draws bars on stderr when it is a terminal and ``enabled``."""
    console = Console(file=sys.stderr)
    if not enabled or not console.is_terminal:
        yield lambda label, total: lambda n: None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield _Bars(progress)


@contextlib.contextmanager
def pull_progress(enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Draws Ollama-style pull events: a bar per blob with bytes, rate, ETA and peers."""
    console = Console(file=sys.stderr)
    if not enabled:
        yield lambda event: None
        return
    if not console.is_terminal:
        seen: set[str] = set()

        def plain(event: dict[str, Any]) -> None:
            # No terminal: one line per step, not a line per progress tick.
            status = str(event.get("status", ""))
            if status not in seen:
                seen.add(status)
                print(status, file=sys.stderr)

        yield plain
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[peers]}"),
        console=console,
    )
    tasks: dict[str, TaskID] = {}

    def draw(event: dict[str, Any]) -> None:
        digest = event.get("digest")
        if digest is None or "total" not in event:
            progress.console.print(str(event.get("status", "")))
            return
        peers = event.get("peers", 0)
        label = f"{peers} peer{'s' if peers != 1 else ''}" if peers else "local"
        if digest not in tasks:
            tasks[digest] = progress.add_task(
                str(event["status"]), total=event["total"], peers=label
            )
        progress.update(tasks[digest], completed=event.get("completed", 0), peers=label)

    with progress:
        yield draw
