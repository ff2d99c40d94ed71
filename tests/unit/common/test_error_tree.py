"""Every exception common, the services and the CLI define descends from PeermirrorError,
so one handler per protocol can answer all of them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import services.cli
import services.common
import services.discovery
import services.pinner
import services.registry
from services.common.errors import PeermirrorError

PACKAGES = (
    services.common,
    services.discovery,
    services.cli,
    services.registry,
    services.pinner,
)
NOT_YET = ("services.common.genproto.",)


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.startswith(NOT_YET):
                names.append(info.name)
    return names


def _exceptions(module_name: str) -> list[type[BaseException]]:
    module = importlib.import_module(module_name)
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module_name
    ]


def test_the_packages_define_exceptions() -> None:
    found = [exc for name in _modules() for exc in _exceptions(name)]
    assert len(found) > 20  # the walk reaches the modules (an empty walk would pass below)


@pytest.mark.parametrize("module_name", _modules())
def test_every_exception_has_the_one_root(module_name: str) -> None:
    unrooted = [
        exc.__qualname__ for exc in _exceptions(module_name) if not issubclass(exc, PeermirrorError)
    ]
    assert unrooted == []
