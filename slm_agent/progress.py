"""Progress reporting: library code takes a callback, the CLI and daemon draw it with rich."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

ProgressFn = Callable[[int, int], None]
"""Called with (done, total) units of work."""


@contextmanager
def rich_progress(description: str, unit: Literal["bytes", "items"] = "bytes") -> Iterator[ProgressFn]:
    """A rich progress bar on stderr (silent when stderr is not a terminal)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counters: list[ProgressColumn] = (
        [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *counters,
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
    )
    task_id = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task_id, completed=done, total=total)

    with progress:
        yield update
