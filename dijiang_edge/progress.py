"""Progress of the long steps, on stderr: what stage a run is in and how long it has taken.

``stage("pte int8", "lowering to XNNPACK")`` prints ``[pte int8] lowering to XNNPACK ...``
when the step starts and ``[pte int8] lowering to XNNPACK: done in 12 min 05 s`` when it
ends. While it runs, a terminal sees the time counting up on that line, redrawn every
second. A log (stderr is not a TTY: CI, ``nohup``, ``| tee``) gets one plain line every
``LOG_SECONDS`` instead, so it never fills with carriage returns. ``bar`` does the same
for loops with a known length: a tqdm bar on a terminal, plain lines in a log.

On an exception the stage prints nothing more. It only ends the terminal's half-drawn line,
so the command's one error line starts on a fresh line and stays the last thing printed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
LOG_SECONDS = 60.0          # between plain lines in a log
TTY_SECONDS = 1.0           # between redraws on a terminal


def elapsed(seconds: float) -> str:
    """``41 s``, ``12 min 05 s``, ``1 h 02 min``: a duration as a person reads it."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def is_tty(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal; ``DIJIANG_PROGRESS=plain`` says no."""
    stream = stream or sys.stderr
    if os.environ.get("DIJIANG_PROGRESS") == "plain":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Heartbeat(threading.Thread):
    """Writes the running stage's line every ``every`` seconds until stopped."""

    def __init__(self, line: str, stream: TextIO, tty: bool, every: float):
        super().__init__(daemon=True)
        self.line, self.stream, self.tty, self.every = line, stream, tty, every
        self.t0, self.stopped, self.drawn = time.perf_counter(), threading.Event(), False

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            text = f"{self.line} {elapsed(time.perf_counter() - self.t0)}"
            self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
            self.stream.flush()
            self.drawn = True

    def stop(self) -> float:
        self.stopped.set()
        self.join()
        return time.perf_counter() - self.t0


@contextlib.contextmanager
def stage(label: str, what: str, stream: TextIO | None = None, every: float | None = None,
          heartbeat: bool = True) -> Iterator[None]:
    """Say that step ``what`` of ``label`` runs, how long it has run, and when it is done.
    ``heartbeat=False``: only the first and the last line, for a step whose inner steps
    print lines of their own (a redrawn line would run into theirs)."""
    stream = stream or sys.stderr
    redraw = heartbeat and is_tty(stream)
    line = f"[{label}] {what} ..."
    stream.write(line + ("" if redraw else "\n"))
    stream.flush()
    beat = _Heartbeat(line, stream, redraw, every or (TTY_SECONDS if redraw else LOG_SECONDS))
    if heartbeat:
        beat.start()
    try:
        yield
    except BaseException:
        if heartbeat:
            beat.stop()
        if redraw:
            stream.write("\n")          # the error line starts on a line of its own
            stream.flush()
        raise
    took = beat.stop() if heartbeat else time.perf_counter() - beat.t0
    stream.write(("\r" if redraw else "") + f"[{label}] {what}: done in {elapsed(took)}"
                 + ("\x1b[K\n" if redraw else "\n"))
    stream.flush()


def bar(items: Iterable[T], total: int, label: str, what: str, unit: str = "it",
        stream: TextIO | None = None, every: float | None = None) -> Iterator[T]:
    """``items`` with progress: tqdm on a terminal (where tqdm is installed), else a plain
    ``[label] what: 3/40 unit, 2 min 10 s`` line every ``every`` seconds and, if the loop
    lasted that long, a last one (a short loop adds nothing to a log)."""
    stream = stream or sys.stderr
    meter = tty_meter(total, label, what, unit, stream)
    if meter is not None:
        with meter:
            for item in items:
                yield item
                meter.update()
        return
    every = every or LOG_SECONDS
    t0 = last = time.perf_counter()
    done, said = 0, False
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every and done < total:
            stream.write(f"[{label}] {what}: {done}/{total} {unit}, {elapsed(now - t0)}\n")
            stream.flush()
            last, said = now, True
    if said:
        stream.write(f"[{label}] {what}: {done}/{total} {unit}, done in {elapsed(time.perf_counter() - t0)}\n")
        stream.flush()


def tty_meter(total: int, label: str, what: str = "", unit: str = "it", stream: TextIO | None = None,
              bar_format: str | None = None):
    """A tqdm bar of ``total`` on a terminal, ``None`` in a log or without tqdm (the
    caller then prints its own plain lines)."""
    stream = stream or sys.stderr
    if not is_tty(stream):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    sized = _sized(stream)     # a pty without a size (script, some CI runners) reports 0 x 0,
    return tqdm(total=total, desc=f"[{label}] {what}".rstrip(), unit=unit, file=stream,  # where tqdm
                bar_format=bar_format, dynamic_ncols=sized, disable=False,              # draws nothing;
                # disable=False: the CLI sets TQDM_DISABLE for third-party bars, not for these
                **({} if sized else {"ncols": 100, "nrows": 50}))


def _sized(stream: TextIO) -> bool:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0
