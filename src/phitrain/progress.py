"""Progress of long jobs (DESIGN.md "Conventions": every long job shows progress), one way everywhere.

On a terminal: a rich bar (description, bar, done/total, an info field, time remaining). On a pipe, in
CI or in a log file, where a redrawn bar is noise: one plain line every ~10% of the total, and at the end:

    [pretrain] 120/1200  loss 3.1416  5,210 tok/s

`enabled=False` shows nothing (`--quiet`, ranks other than 0).
"""

from __future__ import annotations

import sys
import threading
from typing import IO


class Progress:
    """`with Progress("pretrain", total=1200, completed=resumed_step, unit="step") as bar: bar.update(step, info)`.

    `file` is where it shows (stderr by default, so a command's stdout stays its result); `unit` names
    what is counted in the plain lines.
    """

    def __init__(self, description: str, total: int, *, completed: int = 0, enabled: bool = True,
                 file: IO[str] | None = None, unit: str = "", transient: bool = False):
        self.description, self.total, self.completed = description, total, completed
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.unit = f"{unit} " if unit else ""
        self.every = max(1, total // 10)
        self._lock = threading.Lock()
        self._bar = None
        if enabled and self.file.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=Console(file=self.file), transient=transient)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    def update(self, completed: int, info: str = "") -> None:
        """Set the number of finished units (and the info shown after the count)."""
        if self.enabled:
            with self._lock:
                self._show(completed, info)

    def advance(self, n: int = 1, info: str = "") -> None:
        """`n` more units finished (safe to call from worker threads)."""
        if self.enabled:
            with self._lock:
                self._show(self.completed + n, info)

    def _show(self, completed: int, info: str) -> None:
        crossed = completed // self.every > self.completed // self.every
        self.completed = completed
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)
        elif crossed or completed == self.total:
            print(f"[{self.description}] {self.unit}{completed}/{self.total}" + (f"  {info}" if info else ""),
                  file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
