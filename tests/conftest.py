"""Fixtures shared by every test: the real containerd harness lives in tests/harness."""

pytest_plugins = ["tests.harness.fixtures_containerd", "tests.harness.fixtures_mesh"]
