"""The rate-limited refusal log: once per client and limit per interval, bounded memory."""

from __future__ import annotations

from services.common.ratelog import LimitLog, RateLimiter


def test_first_event_logged_then_quiet_until_interval_passes() -> None:
    limiter = RateLimiter(interval=60.0)
    assert limiter.check("a", 0.0) == 0
    assert limiter.check("a", 1.0) is None
    assert limiter.check("a", 59.0) is None
    # Logged again, saying how many were suppressed meanwhile.
    assert limiter.check("a", 60.0) == 2
    assert limiter.check("b", 60.0) == 0


def test_memory_bounded_oldest_forgotten() -> None:
    limiter = RateLimiter(interval=60.0, capacity=3)
    for i in range(10):
        limiter.check(str(i), 0.0)
    assert len(limiter) == 3
    # "0" was forgotten, so it is logged again at once.
    assert limiter.check("0", 1.0) == 0


def test_limit_log_writes_once_per_client_and_limit() -> None:
    now = [0.0]
    log = LimitLog("test.limits", RateLimiter(interval=10.0), clock=lambda: now[0])
    assert log.refused("max_path_bytes", "10.0.0.1", "refused")
    assert not log.refused("max_path_bytes", "10.0.0.1", "refused")
    assert log.refused("max_query_bytes", "10.0.0.1", "refused")
    assert log.refused("max_path_bytes", "10.0.0.2", "refused")
    now[0] = 10.0
    assert log.refused("max_path_bytes", "10.0.0.1", "refused")
