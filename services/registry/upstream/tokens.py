"""Bearer tokens cached per (endpoint, scope) until they expire (pure: time is passed in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import InvalidArgumentError

# distribution's token spec: a response without `expires_in` lasts 60 seconds.
DEFAULT_EXPIRES_IN = 60.0
# Renew this long before expiry, so a token does not run out between check and use.
EXPIRY_MARGIN = 5.0
# Entries kept at most; past it the soonest to expire go first (tokens are cheap to refetch).
MAX_ENTRIES = 1024


class TokenResponseError(InvalidArgumentError):
    """The token endpoint answered something that is not a token response."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float


def parse_token_response(doc: object, now: float) -> Token:
    """`token` or `access_token` and `expires_in` from the realm's JSON answer."""
    if not isinstance(doc, Mapping):
        raise TokenResponseError("token response is not a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise TokenResponseError("token response has no token or access_token")
    expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return Token(value, now + float(expires_in))


class TokenCache:
    """Tokens by (endpoint host, scope); an entry is given out until EXPIRY_MARGIN before expiry."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._tokens: dict[tuple[str, str], Token] = {}
        self._max = max_entries

    def get(self, host: str, scope: str, now: float) -> str | None:
        token = self._tokens.get((host, scope))
        if token is None:
            return None
        if token.expires_at - EXPIRY_MARGIN <= now:
            del self._tokens[(host, scope)]
            return None
        return token.value

    def put(self, host: str, scope: str, token: Token, now: float) -> None:
        if token.expires_at - EXPIRY_MARGIN <= now:
            return  # would be stale on arrival; the next request fetches another
        self._tokens[(host, scope)] = token
        if len(self._tokens) > self._max:
            for key in sorted(self._tokens, key=lambda k: self._tokens[k].expires_at)[
                : len(self._tokens) - self._max
            ]:
                del self._tokens[key]

    def drop(self, host: str, scope: str, value: str) -> None:
        """Forget the token `value` the registry refused (a newer one for the key stays)."""
        token = self._tokens.get((host, scope))
        if token is not None and token.value == value:
            del self._tokens[(host, scope)]

    def __len__(self) -> int:
        return len(self._tokens)
