"""The mirror's quarantine of misbehaving peers: expiry and bounds (pure, fake clock)."""

from __future__ import annotations

from services.registry.mirror.quarantine import Quarantine


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_quarantined_until_its_time_runs_out() -> None:
    clock = Clock()
    q: Quarantine[str] = Quarantine(30.0, clock=clock)
    assert "a" not in q
    q.add("a")
    assert "a" in q
    assert q.remaining("a") == 30.0
    clock.now += 29.9
    assert "a" in q
    clock.now += 0.1
    assert "a" not in q
    assert q.remaining("a") == 0.0
    assert len(q) == 0


def test_adding_again_extends_the_quarantine() -> None:
    clock = Clock()
    q: Quarantine[str] = Quarantine(10.0, clock=clock)
    q.add("a")
    q.add("b")
    clock.now += 8
    q.add("a")
    clock.now += 5
    assert "b" not in q
    assert "a" in q
    assert q.remaining("a") == 5.0


def test_the_oldest_entries_go_beyond_the_bound() -> None:
    clock = Clock()
    q: Quarantine[int] = Quarantine(10.0, clock=clock, max_entries=3)
    for key in range(5):
        q.add(key)
    assert [k for k in range(5) if k in q] == [2, 3, 4]
