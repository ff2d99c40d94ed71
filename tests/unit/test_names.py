"""Names a newcomer can trust: a class name means one thing across the packages under
`services/`, and every logger is named for its module (as `logger` in each log line)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
# Loggers are made by these; the name they are given is the `logger` of each line.
LOGGER_FACTORIES = {"get_logger", "getLogger", "LimitLog"}


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(SERVICES.parent).with_suffix("").parts): ast.parse(
            path.read_text(encoding="utf-8"), filename=str(path)
        )
        for path in sorted(SERVICES.rglob("*.py"))
        if "genproto" not in path.parts
    }


def _is_protocol(node: ast.ClassDef) -> bool:
    return any(
        (isinstance(base, ast.Name) and base.id == "Protocol")
        or (isinstance(base, ast.Attribute) and base.attr == "Protocol")
        for base in node.bases
    )


def _package(module: str) -> str:
    """The top package under services/: a service, the CLI or common."""
    return module.split(".")[1]


def test_no_class_name_stands_for_two_things() -> None:
    # A port (a typing.Protocol) may share its name with the one class of its own package that
    # implements it; any other pair of same-named classes is two meanings for one word.
    defined: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                defined[node.name].append((module, _is_protocol(node)))
    clashes = {}
    for name, places in defined.items():
        if len(places) < 2:
            continue
        port_and_its_class = (
            len(places) == 2
            and len({_package(module) for module, _ in places}) == 1
            and sum(is_port for _, is_port in places) == 1
        )
        if not port_and_its_class:
            clashes[name] = sorted(module for module, _ in places)
    assert clashes == {}


def test_every_logger_is_named_for_its_module() -> None:
    named_otherwise = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if called in LOGGER_FACTORIES and isinstance(first, ast.Constant):
                named_otherwise.append(f"{module}: {first.value!r}")
    assert named_otherwise == []
