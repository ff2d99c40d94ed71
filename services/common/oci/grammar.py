"""OCI names, tags, digests and image references, validated exactly per the distribution spec.

Pure functions: everything that reaches the store or a peer from a URL, a config file or an
image record passes through here first. Failures raise :class:`GrammarError` subclasses, which
are :class:`OciError` (so the registry can answer with them directly) and ``ValueError``.

Decisions the spec leaves open:

- Tags have no error code of their own in the spec (distribution's TAG_INVALID means "tag does
  not match the URI" on push). A syntactically invalid tag names no manifest that can exist, so
  :class:`TagInvalidError` carries MANIFEST_UNKNOWN / 404, which also lets containerd fall back
  to its next endpoint.
- Digests follow the general grammar (``algorithm ":" encoded``). Only sha256 and sha512 are
  supported; a well-formed digest with another algorithm raises
  :class:`UnsupportedDigestError` (DIGEST_INVALID / 400, as distribution answers it).
- The 255-character cap applies, as in clients, to registry host + "/" + repository name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.oci.errors import ErrorCode, OciError

# --- the spec's regular expressions ----------------------------------------------------------

NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_PATTERN = rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*"
TAG_PATTERN = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
DIGEST_ALGORITHM_PATTERN = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*"
DIGEST_ENCODED_PATTERN = r"[a-zA-Z0-9=_-]+"
DIGEST_PATTERN = rf"{DIGEST_ALGORITHM_PATTERN}:{DIGEST_ENCODED_PATTERN}"
# Registry host as image references spell it: DNS name or IPv4, or bracketed IPv6, plus port.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
REGISTRY_PATTERN = (
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:.]+\])(?::[0-9]+)?"
)

NAME_RE = re.compile(NAME_PATTERN)
TAG_RE = re.compile(TAG_PATTERN)
DIGEST_RE = re.compile(DIGEST_PATTERN)
REGISTRY_RE = re.compile(REGISTRY_PATTERN)

NAME_TOTAL_LENGTH_MAX = 255

# Encoded-part rules of the registered algorithms we can verify.
SUPPORTED_ALGORITHMS: dict[str, re.Pattern[str]] = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}

DOCKER_HUB = "docker.io"
# Spellings of Docker Hub that image references normalise to docker.io (as distribution does).
_DOCKER_HUB_ALIASES = frozenset({"index.docker.io"})
DOCKER_OFFICIAL_PREFIX = "library/"


# --- errors ----------------------------------------------------------------------------------


class GrammarError(OciError, ValueError):
    """An input does not follow the OCI grammar; carries the OCI error code to answer with."""

    code_for_class: ErrorCode = ErrorCode.NAME_INVALID

    def __init__(self, message: str, value: str) -> None:
        super().__init__(self.code_for_class, message, detail={"value": value[:300]})
        self.value = value


class NameInvalidError(GrammarError):
    """Repository name (or registry host) does not match the spec."""

    code_for_class = ErrorCode.NAME_INVALID


class TagInvalidError(GrammarError):
    """Tag does not match the spec (answered as MANIFEST_UNKNOWN; see module docstring)."""

    code_for_class = ErrorCode.MANIFEST_UNKNOWN


class DigestInvalidError(GrammarError):
    """Digest is malformed."""

    code_for_class = ErrorCode.DIGEST_INVALID


class UnsupportedDigestError(DigestInvalidError):
    """Digest is well formed but uses an algorithm we cannot verify."""


class ReferenceInvalidError(NameInvalidError):
    """An image reference string cannot be parsed at all (e.g. empty, bad registry host)."""


# --- single tokens -----------------------------------------------------------------------------


def validate_name(name: str, registry: str | None = None) -> str:
    """Return ``name`` if it is a valid repository name; with ``registry``, also apply the
    255-character cap to ``registry/name``. Raises :class:`NameInvalidError`."""
    total = len(name) + (len(registry) + 1 if registry else 0)
    if total > NAME_TOTAL_LENGTH_MAX:
        raise NameInvalidError(
            f"repository name longer than {NAME_TOTAL_LENGTH_MAX} characters", name
        )
    if not NAME_RE.fullmatch(name):
        raise NameInvalidError(f"invalid repository name {_show(name)}", name)
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if valid, else raise :class:`TagInvalidError`."""
    if not TAG_RE.fullmatch(tag):
        raise TagInvalidError(f"invalid tag {_show(tag)}", tag)
    return tag


def validate_registry(host: str) -> str:
    """Return ``host`` if it is a valid registry host[:port], else raise NameInvalidError."""
    if not REGISTRY_RE.fullmatch(host):
        raise NameInvalidError(f"invalid registry host {_show(host)}", host)
    return host


@dataclass(frozen=True, slots=True)
class Digest:
    """A parsed, supported content digest."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


def is_digest_syntax(s: str) -> bool:
    """Whether ``s`` follows the general digest grammar (any algorithm)."""
    return DIGEST_RE.fullmatch(s) is not None


def parse_digest(s: str) -> Digest:
    """Parse a supported digest (sha256: 64, sha512: 128 lowercase hex).

    Raises :class:`DigestInvalidError` for malformed input and :class:`UnsupportedDigestError`
    for a well-formed digest with another algorithm.
    """
    if not DIGEST_RE.fullmatch(s):
        raise DigestInvalidError(f"invalid digest {_show(s)}", s)
    algorithm, _, encoded = s.partition(":")
    rule = SUPPORTED_ALGORITHMS.get(algorithm)
    if rule is None:
        raise UnsupportedDigestError(f"unsupported digest algorithm {_show(algorithm)}", s)
    if not rule.fullmatch(encoded):
        raise DigestInvalidError(
            f"invalid {algorithm} digest: expected {rule.pattern} after '{algorithm}:'", s
        )
    return Digest(algorithm, encoded)


def validate_digest(s: str) -> str:
    """Return ``s`` if it is a supported digest, else raise (see :func:`parse_digest`)."""
    parse_digest(s)
    return s


def is_valid_name(s: str) -> bool:
    return NAME_RE.fullmatch(s) is not None and len(s) <= NAME_TOTAL_LENGTH_MAX


def is_valid_tag(s: str) -> bool:
    return TAG_RE.fullmatch(s) is not None


def is_valid_digest(s: str) -> bool:
    try:
        parse_digest(s)
    except DigestInvalidError:
        return False
    return True


# --- registries and references -----------------------------------------------------------------


def looks_like_registry(component: str) -> bool:
    """Whether the first path component of a reference is a registry host.

    As container clients decide it: it contains '.' or ':', is 'localhost', or has uppercase
    letters (which repository names cannot).
    """
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component != component.lower()
    )


def normalize_registry(host: str) -> str:
    """Canonical registry host: Docker Hub aliases become ``docker.io``."""
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def normalize_name(registry: str, name: str) -> str:
    """Docker Hub's single-component names live under ``library/`` (``nginx`` ->
    ``library/nginx``); other registries' names are unchanged."""
    if normalize_registry(registry) == DOCKER_HUB and "/" not in name:
        return DOCKER_OFFICIAL_PREFIX + name
    return name


def store_key(registry: str, name: str, tag: str) -> str:
    """The image name the stores (and containerd) use: ``<registry>/<name>:<tag>``."""
    return f"{registry}/{name}:{tag}"


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed image reference ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` (no tag or digest)."""
        return f"{self.registry}/{self.repository}"

    def store_key(self) -> str:
        """``registry/repository:tag``; raises ValueError when the reference has no tag."""
        if self.tag is None:
            raise ValueError(f"reference {self} has no tag")
        return store_key(self.registry, self.repository, self.tag)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(
    s: str, *, default_registry: str = DOCKER_HUB, normalize: bool = True
) -> Reference:
    """Parse ``[registry/]repository[:tag][@digest]``.

    Without a registry component, ``default_registry`` is used. With ``normalize`` (the
    default), Docker Hub aliases become ``docker.io`` and single-component Docker Hub names get
    ``library/``. No tag and no digest leaves both None (no implicit ``latest``).
    Raises a :class:`GrammarError` subclass naming the part that is wrong.
    """
    if not s:
        raise ReferenceInvalidError("empty image reference", s)
    remainder, at, digest = s.partition("@")
    if at:
        validate_digest(digest)
    tag: str | None = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        validate_tag(tag)
    first, sep, rest = remainder.partition("/")
    if sep and looks_like_registry(first):
        registry, repository = first, rest
        validate_registry(registry)
    else:
        registry, repository = default_registry, remainder
    if normalize:
        registry = normalize_registry(registry)
        repository = normalize_name(registry, repository)
    validate_name(repository, registry)
    return Reference(registry, repository, tag, digest if at else None)


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")
