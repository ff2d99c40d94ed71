"""Parsing `WWW-Authenticate` challenges (RFC 9110 §11.6.1), pure: scheme plus auth-params."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SPACE = re.compile(r"[ \t]*")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: the scheme in lowercase and its parameters (names in lowercase)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges of one header value, in order; malformed tails are ignored, not raised."""
    challenges: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        pos = _skip(header, pos, " \t,")
        scheme = _TOKEN.match(header, pos)
        if scheme is None:
            break
        pos = scheme.end()
        params: dict[str, str] = {}
        while True:
            pos = _skip(header, pos, " \t")
            name = _TOKEN.match(header, pos)
            if name is None:
                pos = _skip(header, pos, ",")
                if not _starts_param(header, pos):
                    break
                continue
            after = _SPACE.match(header, name.end())
            end = after.end() if after else name.end()
            if end >= n or header[end] != "=":
                # A token not followed by "=" is the scheme of the next challenge.
                break
            pos = _skip(header, end + 1, " \t")
            value, pos = _value(header, pos)
            params[name.group().lower()] = value
            pos = _skip(header, pos, " \t")
            if pos < n and header[pos] == ",":
                pos += 1
                if not _starts_param(header, pos):
                    break
        challenges.append(Challenge(scheme.group().lower(), params))
    return challenges


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _starts_param(text: str, pos: int) -> bool:
    """Whether a `name=` follows (else what follows starts the next challenge)."""
    pos = _skip(text, pos, " \t,")
    name = _TOKEN.match(text, pos)
    if name is None:
        return False
    end = _skip(text, name.end(), " \t")
    return end < len(text) and text[end] == "="


def _value(text: str, pos: int) -> tuple[str, int]:
    """A token or a quoted-string (backslash escapes) starting at `pos`."""
    if pos < len(text) and text[pos] == '"':
        out: list[str] = []
        pos += 1
        while pos < len(text):
            ch = text[pos]
            if ch == "\\" and pos + 1 < len(text):
                out.append(text[pos + 1])
                pos += 2
                continue
            if ch == '"':
                return "".join(out), pos + 1
            out.append(ch)
            pos += 1
        return "".join(out), pos
    token = _TOKEN.match(text, pos)
    if token is None:
        return "", pos
    return token.group(), token.end()
