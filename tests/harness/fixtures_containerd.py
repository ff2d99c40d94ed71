"""Pytest fixtures giving tests one real containerd per session and a fresh namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.harness.containerd import ContainerdDaemon, ContainerdError


@pytest.fixture(scope="session")
def containerd_daemon() -> Iterator[ContainerdDaemon]:
    """A containerd started for this test session; fails (never skips) when it cannot run."""
    try:
        daemon = ContainerdDaemon()
    except ContainerdError as exc:
        pytest.fail(f"containerd tests need the Debian package `containerd`: {exc}", pytrace=False)
    try:
        daemon.start()
    except ContainerdError as exc:
        daemon.stop()
        pytest.fail(f"could not start containerd for the tests: {exc}", pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def containerd_namespace(containerd_daemon: ContainerdDaemon) -> Iterator[str]:
    """A namespace name used by this test only, emptied and removed afterwards."""
    namespace = f"pmtest-{uuid.uuid4().hex[:12]}"
    yield namespace
    # A test may have restarted or killed the daemon; bring it back so the next test has one.
    if not containerd_daemon.running:
        containerd_daemon.start()
    containerd_daemon.purge_namespace(namespace)
