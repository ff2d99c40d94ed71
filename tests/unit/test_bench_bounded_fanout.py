"""The bounded fan-out benchmark's report: each wave against the wave without peermirror."""

from __future__ import annotations

from bench.bounded_fanout import Wave, render


def test_each_wave_is_a_ratio_to_the_wave_without_peermirror() -> None:
    report = render(
        [Wave("without", 10.0, 5.0), Wave("unbounded", 20.0, 1.0), Wave("bound1", 12.5, 3.0)],
        bound=1,
    )
    lines = report.splitlines()
    assert lines[1].split()[-3:] == ["s", "1.00x", "5.00x"]
    assert lines[2].split()[-3:] == ["s", "2.00x", "1.00x"]
    assert "max_waiters_per_fetch 1" in lines[3] and lines[3].split()[-2:] == ["1.25x", "3.00x"]
    assert lines[4] == (
        "bounded / unbounded median pull: 0.62x; upstream bytes 3.00x against 1.00x the image"
    )
