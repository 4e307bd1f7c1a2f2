"""What the benchmark shows while it runs: which workload and run, how far, how long left.

The run is a list of sections (one per workload, start-up timing, ...), each with
the number of steps it reports and an estimate of its seconds. Progress is
counted in those estimated seconds, so a slow section weighs more than a quick
one; the time left is the time so far scaled by the share still to do, which
corrects itself on a machine faster or slower than the estimates.

On a terminal with ``tqdm`` installed (``pip install 'poolloader[bench]'``) this
is a progress bar; otherwise (a pipe, a log file, no tqdm) one plain line per
step, which reads well in CI logs too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

#: What each measuring function calls at the start of each of its steps, with a
#: label such as ``"tensor_19mb: stock run 2/3"``.
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Section:
    """A part of the run as the display counts it."""

    name: str
    steps: int  # how many times it calls progress()
    estimate: float  # its seconds on the reference machine (relative weights suffice)


class ProgressDisplay:
    """A progress bar (or plain lines) over a run of sections.

    ``begin(name)`` starts a section; ``step(label)`` (a :data:`Progress`) marks
    the start of its next step and completes the one before. A section that
    reports more steps than it announced does not move past its own share.
    """

    def __init__(self, sections: list[Section], stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._sections = {s.name: s for s in sections}
        self._starts: dict[str, float] = {}
        total = 0.0
        for section in sections:
            self._starts[section.name] = total
            total += section.estimate
        self.total = total
        self.done = 0.0
        self._current: Section | None = None
        self._steps_seen = 0
        self._started = time.monotonic()
        self._bar = _tqdm_bar(self._stream, total)

    def begin(self, name: str) -> None:
        self._current = self._sections[name]
        self._steps_seen = 0
        self._advance_to(self._starts[name])

    def step(self, label: str) -> None:
        section = self._current
        if section is not None and section.steps:
            start = self._starts[section.name]
            share = section.estimate * min(self._steps_seen, section.steps) / section.steps
            self._advance_to(start + share)
            self._steps_seen += 1
        self._show(label)

    def close(self) -> None:
        self._advance_to(self.total)
        if self._bar is not None:
            self._bar.set_description_str("done")
            self._bar.close()
        else:
            self._line(f"done in {_clock(time.monotonic() - self._started)}")

    def left(self) -> str:
        """The time left, in words, from the pace so far."""
        if self.done <= 0:
            return "estimating time left"
        elapsed = time.monotonic() - self._started
        return f"about {_clock(elapsed * (self.total - self.done) / self.done)} left"

    def _advance_to(self, value: float) -> None:
        value = max(self.done, min(value, self.total))
        if self._bar is not None and value > self.done:
            self._bar.update(value - self.done)
        self.done = value

    def _show(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(label)
        else:
            share = self.done / self.total if self.total else 1.0
            self._line(f"[{share:4.0%}, {self.left()}] {label}")

    def _line(self, text: str) -> None:
        print(f"  {text}", file=self._stream, flush=True)


def _tqdm_bar(stream: TextIO, total: float) -> Any:
    """A tqdm bar on ``stream`` when it is a terminal of some width and tqdm is
    installed, else None. (A terminal that reports 0 columns, as a pseudo-terminal
    nobody sized does, would show tqdm's bar as nothing at all.)"""
    if not stream.isatty() or _columns(stream) == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        file=stream,
        smoothing=0,  # time left from the average pace: sections differ too much for a recent one
        bar_format="{percentage:3.0f}%|{bar:24}| {elapsed}<{remaining}  {desc}",
        dynamic_ncols=True,
    )


def _columns(stream: TextIO) -> int | None:
    """The terminal's width, or None where the stream cannot say."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return None


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"
