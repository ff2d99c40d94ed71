"""The upstream client's one exception tree: each type says how the caller answers its client.

Every failure the registry's request path can see is an :class:`UpstreamError`; its subclass
decides the answer: :class:`UpstreamAuthError` and :class:`UpstreamBusy` are a fast 404 (containerd
then pulls from upstream itself, with its own credentials, as without peermirror),
:class:`UpstreamNotFound` is a 404 too, :class:`UpstreamUnavailable` may be retried later.
"""

from __future__ import annotations

from services.common.errors import PeermirrorError


class UpstreamError(PeermirrorError, http_status=404):
    """An upstream fetch failed; `attempts` lists what each endpoint answered, for logs.

    Answered 404 whatever the kind, so containerd falls back to upstream itself."""

    def __init__(self, message: str, attempts: tuple[str, ...] = ()) -> None:
        self.attempts = attempts
        detail = f" ({'; '.join(attempts)})" if attempts else ""
        super().__init__(message + detail)


class UpstreamAuthError(UpstreamError):
    """Every endpoint that answered refused this node (401/403, or no usable credentials)."""


class UpstreamNotFound(UpstreamError):
    """The endpoints answered, and none has the content (404, or 416 for a range past the end)."""


class UpstreamUnavailable(UpstreamError):
    """No endpoint could be reached or gave a usable answer (connection, TLS, 5xx, bad redirect)."""


class UpstreamBusy(UpstreamError):
    """This node's upstream caps (fetches in flight, bandwidth) stayed full for the whole wait."""
