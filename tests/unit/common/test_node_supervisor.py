"""The node's restart policy: who is restarted, how the backoff grows, caps and resets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.node_supervisor import (
    SERVICES,
    RestartPlanner,
    RestartPolicy,
    child_command,
)

POLICY = RestartPolicy(initial_delay=0.5, max_delay=4.0, stable_after=10.0)


def planner() -> RestartPlanner:
    p = RestartPlanner(list(SERVICES), POLICY)
    for name in SERVICES:
        p.started(name, 0.0)
    return p


def test_only_the_dead_child_is_restarted() -> None:
    p = planner()
    restart = p.exited("registry", 1, now=1.0)
    assert restart is not None
    assert restart.name == "registry"
    assert restart.returncode == 1
    assert restart.uptime == 1.0
    assert p.running() == ["discovery", "pinner"]


def test_backoff_doubles_on_quick_deaths_and_is_capped() -> None:
    p = planner()
    delays = []
    now = 0.0
    for _ in range(6):
        now += 1.0
        restart = p.exited("pinner", -9, now)
        assert restart is not None
        delays.append(restart.delay)
        p.started("pinner", now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert p.children["pinner"].restarts == 6


def test_backoff_resets_after_a_stable_run() -> None:
    p = planner()
    first = p.exited("discovery", 1, now=1.0)
    p.started("discovery", 2.0)
    second = p.exited("discovery", 1, now=3.0)
    p.started("discovery", 4.0)
    after_stable = p.exited("discovery", 1, now=4.0 + POLICY.stable_after)
    assert first is not None and second is not None and after_stable is not None
    assert (first.delay, second.delay, after_stable.delay) == (0.5, 1.0, 0.5)
    assert after_stable.attempt == 1


def test_children_back_off_independently() -> None:
    p = planner()
    p.exited("registry", 1, now=1.0)
    p.started("registry", 1.5)
    registry_again = p.exited("registry", 1, now=2.0)
    discovery_first = p.exited("discovery", 1, now=2.0)
    assert registry_again is not None and discovery_first is not None
    assert registry_again.delay == 1.0
    assert discovery_first.delay == 0.5


def test_clean_exit_outside_shutdown_is_still_restarted() -> None:
    p = planner()
    restart = p.exited("registry", 0, now=20.0)
    assert restart is not None
    assert restart.delay == POLICY.initial_delay


def test_nothing_restarts_during_shutdown() -> None:
    p = planner()
    p.begin_shutdown()
    assert [p.exited(name, 0, now=1.0) for name in SERVICES] == [None, None, None]
    assert p.running() == []


def test_exit_status_is_zero_only_when_every_child_exited_cleanly() -> None:
    clean = planner()
    clean.begin_shutdown()
    for name in SERVICES:
        clean.exited(name, 0, now=1.0)
    assert clean.exit_status() == 0

    killed = planner()
    killed.begin_shutdown()
    killed.exited("discovery", 0, now=1.0)
    killed.exited("registry", -9, now=1.0)
    killed.exited("pinner", 0, now=1.0)
    assert killed.exit_status() == 1


def test_exit_status_counts_a_child_that_never_reported_as_unclean() -> None:
    p = planner()
    p.begin_shutdown()
    p.exited("discovery", 0, now=1.0)
    assert p.exit_status() == 1


@pytest.mark.parametrize(
    ("initial", "maximum", "stable"),
    [(0.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0.5, 1.0, -1.0)],
)
def test_policy_rejects_nonsense(initial: float, maximum: float, stable: float) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial_delay=initial, max_delay=maximum, stable_after=stable)


def test_duplicate_child_names_rejected() -> None:
    with pytest.raises(ValueError):
        RestartPlanner(["registry", "registry"])


@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=30))
def test_delay_always_within_bounds(uptimes: list[float]) -> None:
    p = RestartPlanner(["x"], POLICY)
    now = 0.0
    for uptime in uptimes:
        p.started("x", now)
        now += uptime
        restart = p.exited("x", 1, now)
        assert restart is not None
        assert POLICY.initial_delay <= restart.delay <= POLICY.max_delay
        assert restart.uptime == pytest.approx(uptime)
        if restart.uptime >= POLICY.stable_after:
            assert restart.delay == POLICY.initial_delay


def test_child_command_runs_the_cli_with_this_interpreter() -> None:
    assert child_command("pinner", Path("/etc/pm.yaml")) == [
        sys.executable,
        "-m",
        "services.cli.main",
        "pinner",
        "--config",
        "/etc/pm.yaml",
    ]
    assert child_command("registry", None)[-1] == "registry"
