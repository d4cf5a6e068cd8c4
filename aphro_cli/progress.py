"""Progress for long commands: a rich bar on a terminal, a plain line every few seconds in a log
(a bar redrawn in place is invisible in a file)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_EVERY_S = 5.0


@contextlib.contextmanager
def progress(console: Console, description: str, total: int,
             every_s: float = LOG_EVERY_S) -> Iterator[Callable[[int, int], None]]:
    """Yields update(done, total); call it as work completes."""
    if console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    start = last = time.monotonic()

    def update(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            console.print(f"{description}: {done}/{total} done, {now - start:.0f} s",
                          highlight=False, soft_wrap=True)

    yield update
