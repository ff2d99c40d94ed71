"""The progress renderer of long CLI operations: bars and lines, terminal redraws, plain lines."""

from __future__ import annotations

import io

import pytest

from services.cli.progress import (
    BAR_WIDTH,
    PLAIN_INTERVAL,
    ProgressView,
    TaskState,
    fraction,
    render_bar,
    render_frame,
    render_line,
    render_plain,
)
from services.common.units import format_bytes, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 40, "3.0 TiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (185, "3m05s"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_fraction_unknown_total_then_partial_then_done() -> None:
    assert fraction(TaskState("n", done=10)) is None
    assert fraction(TaskState("n", done=25, total=100)) == 0.25
    # Ingest estimates may overshoot a total seen earlier: never beyond a full bar.
    assert fraction(TaskState("n", done=150, total=100)) == 1.0
    assert fraction(TaskState("n", ok=True)) == 1.0


def test_bar_fills_in_proportion() -> None:
    assert render_bar(0.5, width=10) == "[#####.....]"
    assert render_bar(None, width=4) == "[....]"
    assert render_bar(1.0, width=3) == "[###]"


def test_line_shows_label_share_bytes_time_and_phase() -> None:
    line = render_line(
        TaskState("n2", phase="pulling", done=1 << 20, total=4 << 20, elapsed=2.25), label_width=4
    )
    assert line == (f"n2    {render_bar(0.25)}  25%  1.0 MiB/4.0 MiB  2.2s  pulling")


def test_line_of_a_failed_task_says_why() -> None:
    line = render_line(TaskState("n3", ok=False, detail="UNAVAILABLE: no route", elapsed=1.0))
    assert line.endswith("FAILED: UNAVAILABLE: no route")
    assert "  ?%" in line


def test_frame_aligns_labels() -> None:
    lines = render_frame([TaskState("a"), TaskState("longer")])
    assert [ln.index("[") for ln in lines] == [8, 8]


def test_plain_line() -> None:
    state = TaskState("unix:/n2.sock", ok=True, detail="image sha256:abc", done=2048, total=2048)
    assert render_plain(state) == "unix:/n2.sock: done: image sha256:abc 2.0 KiB/2.0 KiB 0.0s"


def test_terminal_view_redraws_its_block_in_place() -> None:
    out = io.StringIO()
    clock = Clock()
    view = ProgressView(out, ["n2", "n3"], tty=True, clock=clock)
    view.update(TaskState("n2", phase="pulling", done=1, total=2))
    first = out.getvalue()
    # First frame: one line per task, no cursor movement yet.
    assert first.count("\n") == 2
    assert "\x1b[2F" not in first
    clock.now += 1
    view.update(TaskState("n3", phase="pulling", done=1, total=4))
    second = out.getvalue()[len(first) :]
    # Later frames go back up over the block and erase each line before rewriting it.
    assert second.startswith("\x1b[2F")
    assert second.count("\x1b[2K") == 2
    assert "50%" in second
    assert "25%" in second


def test_terminal_view_skips_frames_that_come_too_fast_but_not_endings() -> None:
    out = io.StringIO()
    clock = Clock()
    view = ProgressView(out, ["n2"], tty=True, clock=clock)
    view.update(TaskState("n2", phase="pulling", done=1, total=4))
    drawn = out.getvalue()
    view.update(TaskState("n2", phase="pulling", done=2, total=4))
    assert out.getvalue() == drawn
    view.update(TaskState("n2", phase="done", done=4, total=4, ok=True))
    assert out.getvalue().endswith(f"{render_bar(1.0, BAR_WIDTH)} 100%  4 B/4 B  0.0s  done\n")


def test_plain_view_writes_phase_changes_and_throttles_repeats() -> None:
    out = io.StringIO()
    clock = Clock()
    view = ProgressView(out, ["n2", "n3"], tty=False, clock=clock)
    view.update(TaskState("n2", phase="started"))
    view.update(TaskState("n2", phase="pulling", done=1))
    view.update(TaskState("n2", phase="pulling", done=2))  # same phase, too soon: not written
    clock.now += PLAIN_INTERVAL
    view.update(TaskState("n2", phase="pulling", done=3))
    view.fail("n3", "NOT_FOUND: no such image")
    view.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "n2: started - 0.0s",
        "n2: pulling 1 B 0.0s",
        "n2: pulling 3 B 0.0s",
        "n3: FAILED: NOT_FOUND: no such image - 0.0s",
    ]
    assert "\x1b" not in out.getvalue()


def test_view_defaults_to_the_stream_being_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    ProgressView(tty, ["n"]).update(TaskState("n", phase="pulling"))
    assert "\x1b[2K" in tty.getvalue()
    plain = io.StringIO()
    ProgressView(plain, ["n"]).update(TaskState("n", phase="pulling"))
    assert plain.getvalue() == "n: pulling - 0.0s\n"
