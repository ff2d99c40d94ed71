"""Pytest fixtures for multi-node tests: a shared 3-node netns mesh per module, or meshes on demand.

Both fail (never skip) when the machine cannot run them (not root, iproute2/iptables missing),
and tear everything down even when the test fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.containerd import ContainerdError
from tests.harness.mesh import Mesh, MeshError
from tests.harness.netns import NetnsError

MeshFactory = Callable[..., Mesh]


def _start(mesh: Mesh) -> Mesh:
    try:
        return mesh.start()
    except (NetnsError, MeshError, ContainerdError) as exc:
        pytest.fail(f"could not start the netns mesh: {exc}", pytrace=False)


@contextlib.contextmanager
def running_mesh(mesh: Mesh, what: str = "netns mesh") -> Iterator[Mesh]:
    """Start `mesh` for a `with` block and close it afterwards, even on failure; a mesh that
    cannot start fails the test (never skips) and is cleaned up first."""
    try:
        mesh.start()
    except Exception as exc:
        mesh.close()
        pytest.fail(f"could not start the {what}: {exc}", pytrace=False)
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """Three nodes `n1..n3` with default config, shared by the tests of one module."""
    with running_mesh(Mesh(3)) as started:
        yield started


@pytest.fixture
def mesh_factory() -> Iterator[MeshFactory]:
    """`make(size=3, **Mesh options)` starts a mesh owned by this test, closed after it."""
    made: list[Mesh] = []

    def make(size: int = 3, **options: Any) -> Mesh:
        m = Mesh(size, **options)
        made.append(m)
        return _start(m)

    yield make
    problems: list[str] = []
    for m in reversed(made):
        try:
            m.close()
        except MeshError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
