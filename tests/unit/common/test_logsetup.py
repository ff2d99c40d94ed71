"""Logging setup: JSON lines with service and context, stdlib loggers routed through structlog."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from services.common.logsetup import FOREIGN_LOGGERS, configure_logging, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Logging is process-global; put it back as it was for the tests that follow."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_line_carries_service_level_timestamp_and_fields() -> None:
    out = io.StringIO()
    configure_logging("registry", stream=out)
    get_logger("peermirror.test").info("blob served", digest="sha256:ab", bytes=12)
    [line] = lines(out)
    assert line["event"] == "blob served"
    assert line["service"] == "registry"
    assert line["level"] == "info"
    assert line["logger"] == "peermirror.test"
    assert line["digest"] == "sha256:ab"
    assert line["bytes"] == 12
    stamp = str(line["timestamp"])
    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None


def test_context_vars_bind_per_request() -> None:
    out = io.StringIO()
    configure_logging("registry", stream=out)
    log = get_logger("peermirror.test")
    with structlog.contextvars.bound_contextvars(request_id="r-1", peer="10.0.0.2"):
        log.info("inside")
    log.info("outside")
    inside, outside = lines(out)
    assert inside["request_id"] == "r-1"
    assert inside["peer"] == "10.0.0.2"
    assert "request_id" not in outside


@pytest.mark.parametrize("name", ["sanic.access", "sanic.error", "sanic.root", "grpc", "asyncio"])
def test_stdlib_loggers_are_rendered_as_json(name: str) -> None:
    # Frameworks attach their own handlers; configure must take them over.
    logging.getLogger(name).addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger(name).propagate = False
    out = io.StringIO()
    configure_logging("registry", stream=out)
    with structlog.contextvars.bound_contextvars(request_id="r-2"):
        logging.getLogger(name).warning("%s happened", "something", extra={"status": 404})
    [line] = lines(out)
    assert line["event"] == "something happened"
    assert line["logger"] == name
    assert line["level"] == "warning"
    assert line["service"] == "registry"
    assert line["status"] == 404
    assert line["request_id"] == "r-2"
    assert logging.getLogger(name).handlers == []


def test_foreign_logger_list_names_sanic_and_grpc() -> None:
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server", "grpc", "asyncio"):
        assert name in FOREIGN_LOGGERS


def test_level_filters_ours_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("pinner", level="warning", stream=out)
    log = get_logger("peermirror.test")
    log.info("dropped")
    logging.getLogger("sanic.server").info("dropped too")
    log.warning("kept")
    assert [line["event"] for line in lines(out)] == ["kept"]


def test_exceptions_are_rendered_into_the_line() -> None:
    out = io.StringIO()
    configure_logging("discovery", stream=out)
    try:
        raise RuntimeError("peer vanished")
    except RuntimeError:
        get_logger("peermirror.test").exception("lookup failed")
    [line] = lines(out)
    assert line["level"] == "error"
    assert "RuntimeError: peer vanished" in str(line["exception"])


def test_configure_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("registry", stream=first)
    log = get_logger("peermirror.test")
    log.info("one")
    configure_logging("pinner", stream=second)
    log.info("two")
    logging.getLogger("sanic.root").info("three")
    assert [line["event"] for line in lines(first)] == ["one"]
    second_lines = lines(second)
    assert [line["event"] for line in second_lines] == ["two", "three"]
    # Loggers created before the second call pick up the new service name.
    assert {line["service"] for line in second_lines} == {"pinner"}


def test_console_format_is_readable_text() -> None:
    out = io.StringIO()
    configure_logging("cli", fmt="console", stream=out)
    get_logger("peermirror.cli").info("pinned image", ref="docker.io/library/nginx:1.25")
    text = out.getvalue()
    assert "pinned image" in text
    assert "ref=docker.io/library/nginx:1.25" in text
    assert "service=cli" in text
    assert "\x1b[" not in text  # no colour codes when the stream is not a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_warnings_are_routed() -> None:
    out = io.StringIO()
    configure_logging("registry", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    [line] = lines(out)
    assert line["logger"] == "py.warnings"
    assert "deprecated thing" in str(line["event"])


@pytest.mark.parametrize(("kwargs"), [{"level": "verbose"}, {"fmt": "xml"}])
def test_bad_arguments_are_rejected(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        configure_logging("registry", stream=io.StringIO(), **kwargs)  # type: ignore[arg-type]
