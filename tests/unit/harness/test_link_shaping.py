"""The tc command that holds a namespace's egress to a rate (tests/harness/netns.py)."""

from __future__ import annotations

import pytest

from tests.harness.netns import INNER_IFACE, shaping_argv


def test_rate_and_a_burst_of_a_hundredth_of_a_second() -> None:
    argv = shaping_argv(800)
    assert argv[:7] == ["tc", "qdisc", "replace", "dev", INNER_IFACE, "root", "tbf"]
    options = dict(zip(argv[7::2], argv[8::2], strict=True))
    assert options["rate"] == "800000000bit"
    assert options["latency"] == "100ms"
    assert int(options["burst"]) == 800 * 10**6 // 8 // 100


def test_slow_links_keep_a_burst_of_at_least_64_kib() -> None:
    options = dict(zip(shaping_argv(1)[7::2], shaping_argv(1)[8::2], strict=True))
    assert int(options["burst"]) == 64 * 1024


@pytest.mark.parametrize("mbit", [0, -5, float("nan")])
def test_a_rate_that_is_not_positive_is_refused(mbit: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        shaping_argv(mbit)


def test_burst_and_latency_can_be_chosen() -> None:
    argv = shaping_argv(0.008, burst=256 * 1024, latency_ms=400)
    options = dict(zip(argv[7::2], argv[8::2], strict=True))
    assert options == {"rate": "8000bit", "burst": str(256 * 1024), "latency": "400ms"}
