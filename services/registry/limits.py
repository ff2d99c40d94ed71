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

limit_log = LimitLog(__name__)


class TooManyRelays(OciError):
    """The client already has its share of peer relays in flight."""


# The addresses the node's own containerd reaches the registry from (hosts.toml names
# https://127.0.0.1:<port>; the kernel answers a loopback dial from the same address).
LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1"})
_LOCAL = "local containerd"


@dataclass
class ClientSlots:
    """Counts the relays in flight and refuses past the caps: the node's own containerd (clients
    at LOCAL_CLIENTS) shares `local_limit`, every other address has `limit` of its own (pure
    bookkeeping; an address holding nothing is forgotten, so the table only holds active ones)."""

    limit: int
    local_limit: int
    active: dict[str, int] = field(default_factory=dict)

    def _key(self, client: str) -> tuple[str, int, str]:
        """The budget `client` draws from: its key, size and config key."""
        if client in LOCAL_CLIENTS:
            return _LOCAL, self.local_limit, "max_local_relays"
        return client, self.limit, "max_relays_per_client"

    def acquire(self, client: str) -> bool:
        key, limit, _ = self._key(client)
        held = self.active.get(key, 0)
        if held >= limit:
            return False
        self.active[key] = held + 1
        return True

    def release(self, client: str) -> None:
        key, _, _ = self._key(client)
        held = self.active.get(key, 0) - 1
        if held > 0:
            self.active[key] = held
        else:
            self.active.pop(key, None)

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One slot for the block; raises :class:`TooManyRelays` (logged rate-limited) when the
        client's budget is spent."""
        if not self.acquire(client):
            _, limit, name = self._key(client)
            limit_log.refused(
                name, client, "client refused: too many peer relays in flight", max=limit
            )
            whose = "for the local containerd" if name == "max_local_relays" else "per client"
            raise TooManyRelays(
                ErrorCode.TOOMANYREQUESTS,
                f"at most {limit} peer relays in flight {whose}",
                detail={"limit": name, "max": limit},
                status=TOO_MANY_REQUESTS,
            )
        try:
            yield
        finally:
            self.release(client)


@dataclass(frozen=True)
class RequestLimits:
    """Path and query bounds of the pull API (registry.max_path_bytes and max_query_bytes;
    header size and timeouts are Sanic's to enforce)."""

    max_path_bytes: int
    max_query_bytes: int

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
