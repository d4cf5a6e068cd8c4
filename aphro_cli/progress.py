"""Progress for long commands: a rich bar on a terminal, a plain line every few seconds in a log
(a bar redrawn in place is invisible in a file)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_EVERY_S = 5.0


def log_lines(console: Console, description: str,
              every_s: float = LOG_EVERY_S) -> Callable[[int, int], None]:
    """update(done, total) that prints a line at most every `every_s` seconds (and at the end)
    when the console is not a terminal; on a terminal it does nothing (a bar shows it)."""
    start = last = time.monotonic()

    def update(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if not console.is_terminal and (now - last >= every_s or done == total):
            last = now
            console.print(f"{description}: {done}/{total} done, {now - start:.0f} s",
                          highlight=False, soft_wrap=True)

    return update


@contextlib.contextmanager
def progress(console: Console, description: str, total: int,
             every_s: float = LOG_EVERY_S) -> Iterator[Callable[[int, int], None]]:
    """Yields update(done, total): a bar on a terminal, log_lines otherwise."""
    if console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    yield log_lines(console, description, every_s)
