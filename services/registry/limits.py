"""The registry's input and resource limits: what is too long, too many, and how it is refused."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.common.config import RegistrySection
from services.common.oci.errors import ErrorCode, OciError
from services.common.ratelog import LimitLog

URI_TOO_LONG = 414
TOO_MANY_REQUESTS = 429
HEADERS_TOO_LARGE = 431

limit_log = LimitLog("registry.limits")


class TooManyRelays(OciError):
    """The client already has its share of peer relays in flight."""


@dataclass
class ClientSlots:
    """Counts what each client address has in flight, refusing past `limit` (pure bookkeeping;
    an address holding nothing is forgotten, so the table only holds active clients)."""

    limit: int
    active: dict[str, int] = field(default_factory=dict)

    def acquire(self, client: str) -> bool:
        held = self.active.get(client, 0)
        if held >= self.limit:
            return False
        self.active[client] = held + 1
        return True

    def release(self, client: str) -> None:
        held = self.active.get(client, 0) - 1
        if held > 0:
            self.active[client] = held
        else:
            self.active.pop(client, None)

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One slot for the block; raises :class:`TooManyRelays` (logged rate-limited) when the
        client has none left."""
        if not self.acquire(client):
            limit_log.refused(
                "max_relays_per_client",
                client,
                "client refused: too many peer relays in flight",
                max=self.limit,
            )
            raise TooManyRelays(
                ErrorCode.TOOMANYREQUESTS,
                f"at most {self.limit} peer relays in flight per client",
                detail={"limit": "max_relays_per_client", "max": self.limit},
                status=TOO_MANY_REQUESTS,
            )
        try:
            yield
        finally:
            self.release(client)


@dataclass(frozen=True)
class RequestLimits:
    """Path and query bounds of the pull API (header size and timeouts are Sanic's to enforce)."""

    max_path_bytes: int = 2048
    max_query_bytes: int = 1024

    @classmethod
    def of(cls, section: RegistrySection) -> RequestLimits:
        return cls(max_path_bytes=section.max_path_bytes, max_query_bytes=section.max_query_bytes)

    def check(self, path: str, query: str) -> OciError | None:
        """The 414 error for a too-long path or query; None when both fit."""
        for name, value, limit in (
            ("path", path, self.max_path_bytes),
            ("query", query, self.max_query_bytes),
        ):
            size = len(value.encode("utf-8", "surrogateescape"))
            if size > limit:
                return OciError(
                    ErrorCode.UNSUPPORTED,
                    f"request {name} of {size} bytes is longer than the {limit} allowed",
                    detail={"limit": f"max_{name}_bytes", "max": limit, "size": size},
                    status=URI_TOO_LONG,
                )
        return None


def headers_too_large(limit: int) -> OciError:
    """What a client whose request line and headers exceed `limit` bytes is told."""
    return OciError(
        ErrorCode.UNSUPPORTED,
        f"request line and headers exceed the {limit} bytes allowed",
        detail={"limit": "max_header_bytes", "max": limit},
        status=HEADERS_TOO_LARGE,
    )
