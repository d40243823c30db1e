"""Progress bars for long work: bytes, rate and ETA on the terminal, silence elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

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
