"""Progress of long work on stderr (never stdout, so `--json` output stays clean).

`Progress(label, total, unit, mode)`: on a terminal a rich bar when rich is installed (the train
extra has it; the verifier's light install need not), otherwise plain lines
`label: done/total unit (pct%)`. Modes: `auto` shows a bar on a terminal and, elsewhere (a log
file, CI), plain lines only for work still running after `QUIET_S` seconds, then one every
`EVERY_S`; `always` prints plain lines (or the bar) from the start; `never` prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

MODES = ("auto", "always", "never")
QUIET_S = 2.0
EVERY_S = 5.0


class Progress:
    def __init__(self, label: str, total: float, unit: str = "", mode: str = "auto",
                 stream: TextIO | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress must be one of {', '.join(MODES)}, got {mode!r}")
        self.label, self.total, self.unit, self.mode = label, total, unit, mode
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.t0 = self.last = time.monotonic()
        self.printed = False
        self.bar: Any = None
        if mode != "never" and self.stream.isatty():
            self.bar = _rich_bar(label, total, self.stream)

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)

    def update(self, done: float, total: float | None = None) -> None:
        """Set how much is done (and the total, when it is learnt as the work goes)."""
        self.done = done
        if total is not None:
            self.total = total
        if self.bar is not None:
            self.bar[0].update(self.bar[1], completed=self.done, total=self.total)
            return
        now = time.monotonic()
        if self.mode == "never" or (self.mode == "auto" and now - self.t0 < QUIET_S):
            return
        if not self.printed or now - self.last >= (EVERY_S if self.mode == "auto" else 0.5) or self.done >= self.total:
            self._line()
            self.last = now

    def note(self, message: str) -> None:
        """A log line that does not break the bar."""
        if self.bar is not None:
            self.bar[0].console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar[0].stop()
        elif self.printed and self.done != getattr(self, "_shown", None):
            self._line()

    def _line(self) -> None:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        print(f"{self.label}: {_num(self.done)}/{_num(self.total)}{unit}{pct}", file=self.stream, flush=True)
        self.printed, self._shown = True, self.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _num(x: float) -> str:
    return f"{x:,.0f}" if x == int(x) else f"{x:,.1f}"


def _rich_bar(label: str, total: float, stream: TextIO) -> Any:
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeRemainingColumn
    except ImportError:
        return None
    bar = Bar(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
              console=Console(file=stream), transient=False)
    task = bar.add_task(label, total=total)
    bar.start()
    return bar, task
