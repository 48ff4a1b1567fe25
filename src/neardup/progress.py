"""Bottom layer: progress of long work, reported the way the place it runs in can show it.

The library reports progress as `(done, total)` calls of a stage (`Progress.stage`), and never decides how it
is shown: `SILENT` (the default of every library function) shows nothing. The command line passes
`Progress.auto()`: a tqdm bar when stderr is a terminal; otherwise (cron, a nightly job's log) one line at
most every `interval` seconds with done/total, rate and ETA, and a last line when a stage that wrote one ends
(a stage shorter than the interval writes nothing, so a quick command's log stays as it was); nothing with
--quiet.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from .config import DEFAULTS, ENV_PROGRESS_INTERVAL

#: What a library function that reports one stage takes: called with (done, total).
Callback = Callable[[int, int], None]

MODES = ("quiet", "bar", "log")


def interval_s() -> float:
    """Seconds between progress lines: NEARDUP_PROGRESS_INTERVAL when set (a number >= 0), else the default."""
    text = os.environ.get(ENV_PROGRESS_INTERVAL, "").strip()
    try:
        value = float(text) if text else DEFAULTS.progress_interval_s
    except ValueError:
        value = DEFAULTS.progress_interval_s  # a bad value is ignored rather than failing a nightly job
    return value if math.isfinite(value) and value >= 0 else DEFAULTS.progress_interval_s


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _columns(stream: IO[str]) -> int | None:
    """None when the terminal reports its width (the bar follows it), else a width to use."""
    try:
        return None if os.get_terminal_size(stream.fileno()).columns > 0 else 80
    except (AttributeError, OSError, ValueError):
        return 80


class Stage:
    """One stage of work: call it with (done, total), or `update(n)` by n more; `close()` (or the end of a
    `with` block) ends it. Silent unless its Progress shows something."""

    def __init__(self, progress: Progress, name: str, total: int | None, unit: str) -> None:
        self.progress, self.name, self.total, self.unit = progress, name, total, unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.lines = 0  #: progress lines written (log mode)
        self.bar: Any = None
        self.closed = False

    def __call__(self, done: int, total: int | None = None) -> None:
        if self.closed:
            return
        if total is not None:
            self.total = int(total)
        self.done = int(done)
        mode = self.progress.mode
        if mode == "bar":
            self._bar()
        elif mode == "log":
            now = time.monotonic()
            if (now - self.last >= self.progress.interval and self.done > 0
                    and (self.total is None or self.done < self.total)):
                self.last = now
                self._line(now)

    def update(self, n: int = 1) -> None:
        """n more items done."""
        self(self.done + n)

    def _bar(self) -> None:
        if self.bar is None:
            from tqdm import tqdm

            width = _columns(self.progress.stream)  # a terminal that reports no size (0x0) gets 80x24
            self.bar = tqdm(total=self.total, desc=self.name, unit=self.unit, file=self.progress.stream,
                            dynamic_ncols=width is None, ncols=width, nrows=None if width is None else 24,
                            disable=False)
        if self.total is not None and self.bar.total != self.total:
            self.bar.total = self.total
            self.bar.refresh()
        self.bar.update(self.done - self.bar.n)

    def _line(self, now: float, last: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        if last:
            text = f"{self.name}: {self.done}{of} {self.unit} done in {_duration(elapsed)} ({rate:.1f} {self.unit}/s)"
        else:
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            eta = (f", ETA {_duration((self.total - self.done) / rate)}" if self.total is not None and rate > 0
                   else "")
            text = f"{self.name}: {self.done}{of} {self.unit}{share}, {rate:.1f} {self.unit}/s{eta}"
        self.progress.write(text)
        self.lines += 1

    def close(self) -> None:
        """End the stage: the bar is closed; a stage that wrote progress lines writes its last one."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.progress.mode == "log" and self.lines:
            self._line(time.monotonic(), last=True)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Where progress goes: `mode` quiet (nothing), bar (tqdm on `stream`) or log (lines on `stream` at most
    every `interval` seconds, default interval_s())."""

    def __init__(self, mode: str = "quiet", *, stream: IO[str] | None = None, interval: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self._stream = stream
        self.interval = interval_s() if interval is None else float(interval)

    @classmethod
    def auto(cls, quiet: bool = False, stream: IO[str] | None = None) -> Progress:
        """The command line's: nothing when `quiet`, a bar when the stream (stderr) is a terminal, else lines."""
        if quiet:
            return cls("quiet")
        s = stream or sys.stderr
        try:
            tty = s.isatty()
        except (AttributeError, ValueError):  # a closed or odd stream
            tty = False
        return cls("bar" if tty else "log", stream=stream)

    @property
    def stream(self) -> IO[str]:
        """The stream written to: the one given, else sys.stderr as it is now (a test may have replaced it)."""
        return self._stream or sys.stderr

    def stage(self, name: str, total: int | None = None, unit: str = "it") -> Stage:
        """A new stage of `total` items (None: not known yet; the first call gives it)."""
        return Stage(self, name, total, unit)

    def write(self, text: str) -> None:
        """One line, prefixed as neardup's log lines are."""
        try:
            self.stream.write(f"neardup: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed log must not end the work
            pass


#: The default of every library function: reports nothing.
SILENT = Progress("quiet")


def stage_of(progress: Progress | None, name: str, total: int | None = None, unit: str = "it") -> Stage:
    """A stage of `progress`, or a silent one when it is None."""
    return (progress or SILENT).stage(name, total, unit)
