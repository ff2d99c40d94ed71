"""Progress output of long `peermirror` operations: a redrawn bar per task on a terminal, plain
lines otherwise (logs, pipes, CI). Every long command reports through `ProgressView`.

Rendering is pure (`render_line`, `render_frame`, `render_plain`); `ProgressView` only decides
when to write and where the cursor goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TextIO

from services.common.units import format_bytes

BAR_WIDTH = 24
# Plain output repeats an unchanged phase at most this often, so logs stay short.
PLAIN_INTERVAL = 5.0
# A terminal is redrawn at most this often (updates may arrive much faster).
TTY_INTERVAL = 0.1
# ANSI: cursor to the start of the line N lines up; erase the whole line.
_UP = "\x1b[{n}F"
_ERASE = "\x1b[2K"


@dataclass(frozen=True, slots=True)
class TaskState:
    """Where one task (e.g. one node's prefetch) stands."""

    label: str
    phase: str = "waiting"
    done: int = 0
    total: int = 0
    elapsed: float = 0.0
    # Set once the task ended: True succeeded, False failed (`detail` says why).
    ok: bool | None = None
    detail: str = ""

    @property
    def finished(self) -> bool:
        return self.ok is not None


def fraction(state: TaskState) -> float | None:
    """Share done in [0, 1]; 1 once succeeded; None when the total is unknown."""
    if state.ok:
        return 1.0
    if state.total <= 0:
        return None
    return min(1.0, state.done / state.total)


def render_bar(share: float | None, width: int = BAR_WIDTH) -> str:
    """`[#####.....]`; an unknown share draws an empty bar (nothing claimed)."""
    filled = 0 if share is None else round(share * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _amount(state: TaskState) -> str:
    if state.total > 0:
        return f"{format_bytes(state.done)}/{format_bytes(state.total)}"
    return format_bytes(state.done) if state.done else "-"


def _status(state: TaskState) -> str:
    if state.ok is None:
        return state.phase
    word = "done" if state.ok else "FAILED"
    return f"{word}: {state.detail}" if state.detail else word


def render_line(state: TaskState, label_width: int = 0, width: int = BAR_WIDTH) -> str:
    """One terminal line: label, bar, percent, bytes, elapsed, phase or outcome."""
    share = fraction(state)
    percent = "  ?%" if share is None else f"{share * 100:3.0f}%"
    return (
        f"{state.label.ljust(label_width)}  {render_bar(share, width)} {percent}  "
        f"{_amount(state)}  {state.elapsed:.1f}s  {_status(state)}"
    )


def render_frame(states: Sequence[TaskState], width: int = BAR_WIDTH) -> list[str]:
    """The terminal lines for every task, labels aligned."""
    label_width = max((len(s.label) for s in states), default=0)
    return [render_line(s, label_width, width) for s in states]


def render_plain(state: TaskState) -> str:
    """One log-friendly line: `label: phase bytes elapsed`."""
    return f"{state.label}: {_status(state)} {_amount(state)} {state.elapsed:.1f}s"


class ProgressView:
    """Shows the progress of several concurrent tasks on `stream`.

    On a terminal (`tty`, default: `stream.isatty()`) the block of task lines is redrawn in place;
    otherwise a task gets a line when its phase changes, when it ends, and at most every
    PLAIN_INTERVAL seconds in between.
    """

    def __init__(
        self,
        stream: TextIO,
        labels: Sequence[str],
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._states = {label: TaskState(label) for label in labels}
        self._drawn = 0
        self._last_draw = float("-inf")
        self._last_plain: dict[str, tuple[str, float]] = {}

    @property
    def states(self) -> list[TaskState]:
        return list(self._states.values())

    def update(self, state: TaskState) -> None:
        """Record `state` (by label) and show it if due."""
        self._states[state.label] = state
        if self._tty:
            now = self._clock()
            if state.finished or now - self._last_draw >= TTY_INTERVAL:
                self._draw(now)
        else:
            self._plain(state)

    def fail(self, label: str, detail: str) -> None:
        """Mark `label` failed with `detail`."""
        self.update(replace(self._states[label], ok=False, detail=detail))

    def close(self) -> None:
        """Final redraw on a terminal (every task as it ended)."""
        if self._tty:
            self._draw(self._clock())

    def _draw(self, now: float) -> None:
        self._last_draw = now
        out = [_UP.format(n=self._drawn)] if self._drawn else []
        out += [f"{_ERASE}{line}\n" for line in render_frame(self.states)]
        self._drawn = len(self._states)
        self._stream.write("".join(out))
        self._stream.flush()

    def _plain(self, state: TaskState) -> None:
        now = self._clock()
        key = _status(state)
        last = self._last_plain.get(state.label)
        if last is not None and last[0] == key and now - last[1] < PLAIN_INTERVAL:
            return
        self._last_plain[state.label] = (key, now)
        self._stream.write(render_plain(state) + "\n")
        self._stream.flush()
