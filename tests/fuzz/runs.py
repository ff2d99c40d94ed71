"""How every fuzz test runs Hypothesis, in one place."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, Phase, settings


def fuzz_settings(examples: int | None = None) -> settings:
    """Hypothesis settings for the fuzz tests: `examples` generated examples (Hypothesis's own
    default when None), the same cases on every run (derandomized, no example database), no
    deadline and no health checks (an example is a batch of real requests to real services),
    and no shrinking: a failing example is reported as found, within the test's time bound."""
    extra: dict[str, Any] = {} if examples is None else {"max_examples": examples}
    return settings(
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        **extra,
    )
