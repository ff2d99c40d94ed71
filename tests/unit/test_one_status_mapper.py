"""gRPC statuses are chosen in one place: servicers raise errors that carry their status
(services/common/errors.py) and the ErrorStatuses interceptor of services/common/grpc_server.py
aborts the call with it. A servicer aborting by hand would be a second mapping to keep in step."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
THE_ONE_PLACE = SERVICES / "common" / "grpc_server.py"


def test_no_servicer_aborts_a_call_by_hand() -> None:
    aborts = []
    for path in sorted(SERVICES.rglob("*.py")):
        if "genproto" in path.parts or path == THE_ONE_PLACE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("abort", "set_code")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "context"
            ):
                aborts.append(f"{path.relative_to(SERVICES.parent)}:{node.lineno}")
    assert aborts == []
