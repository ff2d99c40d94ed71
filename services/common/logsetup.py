"""The one logging setup: structlog for our code, with Sanic, gRPC and asyncio logs routed in.

Services log one JSON object per line (machine readable, with a ``service`` key so a node's three
processes can share a log stream); the CLI logs in structlog's readable console format. Standard
library loggers are rendered by the same processors via ``ProcessorFormatter`` so third-party
lines look like ours. Request context bound with ``structlog.contextvars.bind_contextvars`` shows
up on every line logged while handling that request.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Standard-library loggers of the frameworks we run on. Their own handlers are removed and they
# propagate to the root handler installed here, so nothing prints in a second format.
FOREIGN_LOGGERS = (
    "sanic",
    "sanic.root",
    "sanic.error",
    "sanic.access",
    "sanic.server",
    "sanic.websockets",
    "grpc",
    "grpc._cython.cygrpc",
    "grpc.aio",
    "asyncio",
    "py.warnings",
)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Read by a processor at log time, so loggers cached before a reconfiguration still get the
# current service name.
_service_name = ""


def _add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("service", _service_name)
    return event_dict


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed so a second configure call replaces it."""


def configure_logging(
    service: str,
    *,
    fmt: Literal["json", "console"] = "json",
    level: str = "info",
    stream: IO[str] | None = None,
) -> None:
    """Configure structlog and the standard library for ``service``; safe to call repeatedly.

    ``level`` is one of debug/info/warning/error. ``stream`` defaults to ``sys.stderr`` (stdout
    stays free for CLI output).
    """
    global _service_name
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}"
        ) from None
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'json' or 'console'")
    _service_name = service
    out = stream if stream is not None else sys.stderr

    # Applied to both our events and foreign LogRecords before rendering.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_service,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        tail: list[Processor] = [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
        tail = []

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = _OurHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    for name in FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        for h in list(foreign.handlers):
            foreign.removeHandler(h)
        foreign.propagate = True
        foreign.setLevel(logging.NOTSET)
    logging.captureWarnings(True)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (shown as ``logger``), with optional bound values."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial)
    return logger
