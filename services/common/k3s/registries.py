"""K3s `registries.yaml`: the one parser and validator, so every error names the file and key."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import InvalidArgumentError

# Registry host keys as image references spell them: a DNS name (components of letters, digits
# and inner dashes), an IPv4 address, or a bracketed IPv6 address, then an optional port.
_DOMAIN_COMPONENT = r"(?:[a-z0-9]|[a-z0-9][a-z0-9-]*[a-z0-9])"
_HOST_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]+))?$"
)

WILDCARD = "*"

_TOP_KEYS = ("mirrors", "configs")
_MIRROR_KEYS = ("endpoint", "rewrite")
_CONFIG_KEYS = ("auth", "tls")
_AUTH_KEYS = ("username", "password", "auth", "identity_token")
_TLS_STR_KEYS = ("ca_file", "cert_file", "key_file")
_TLS_KEYS = (*_TLS_STR_KEYS, "insecure_skip_verify")

# Regex constructs Python accepts but Go's RE2 (which K3s's containerd compiles rewrites with)
# rejects: lookaround, atomic groups, backreferences, conditionals, possessive quantifiers.
_NON_RE2 = re.compile(r"\(\?(?:=|!|<=|<!|>|P=|\()|\\[1-9]|[*+?}]\+")


class RegistriesError(InvalidArgumentError):
    """registries.yaml is invalid; the message names the file and the key path."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)
        self.field = key or None


@dataclass(frozen=True, slots=True)
class EndpointURL:
    """One mirror endpoint as written, split and checked; scheme None means "not given".

    `host` is lowercase (IPv6 keeps its brackets); `path` is as written ("" when absent).
    """

    raw: str
    scheme: str | None
    host: str
    port: int | None
    path: str

    @property
    def hostport(self) -> str:
        """`host[:port]` as written (port kept even when it is the scheme's default)."""
        return self.host if self.port is None else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """`configs.<host>.tls`: files for the connection to that host (absolute paths)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False

    @property
    def empty(self) -> bool:
        return not (self.ca_file or self.cert_file or self.insecure_skip_verify)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """`configs.<host>.auth`: credentials (go to containerd's CRI config, never to hosts.toml)."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    auth: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """`configs.<host>`."""

    auth: AuthConfig | None = None
    tls: TLSConfig | None = None


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """`mirrors.<host>`: endpoints tried in order, and repository rewrites (in file order)."""

    endpoints: tuple[EndpointURL, ...] = ()
    rewrites: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Registries:
    """A whole registries.yaml; host keys are lowercase, `"*"` is the wildcard, order is kept."""

    mirrors: Mapping[str, MirrorConfig] = field(default_factory=dict)
    configs: Mapping[str, RegistryConfig] = field(default_factory=dict)

    def is_mirrored(self, registry: str) -> bool:
        """Whether pulls from `registry` go through mirrors (listed, or `"*"` is listed)."""
        return WILDCARD in self.mirrors or registry.lower() in self.mirrors


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float | bool) or key is None:
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {line})", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)


def load_registries(path: Path, *, missing_ok: bool = False) -> Registries:
    """Read and validate `path`; a missing file is an empty config when `missing_ok` (K3s)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return Registries()
        raise RegistriesError(str(path), "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistriesError(str(path), "", f"cannot read: {exc}") from exc
    return parse_registries(text, source=str(path))


def parse_registries(text: str, *, source: str = "registries.yaml") -> Registries:
    """Parse and validate registries.yaml text; raise RegistriesError naming `source` and key."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RegistriesError(source, "", f"invalid YAML: {exc.problem}{where}") from exc
    except yaml.YAMLError as exc:
        raise RegistriesError(source, "", f"invalid YAML: {exc}") from exc
    if doc is None:
        return Registries()
    top = _mapping(doc, source, "", _TOP_KEYS)
    mirrors: dict[str, MirrorConfig] = {}
    for host, value in _mapping(top.get("mirrors"), source, "mirrors").items():
        key = _host_key(host, source, "mirrors", mirrors)
        mirrors[key] = _parse_mirror(value, source, f"mirrors.{key}")
    configs: dict[str, RegistryConfig] = {}
    for host, value in _mapping(top.get("configs"), source, "configs").items():
        key = _host_key(host, source, "configs", configs)
        configs[key] = _parse_config(value, source, f"configs.{key}")
    return Registries(mirrors=mirrors, configs=configs)


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _mapping(
    value: object, source: str, key: str, allowed: tuple[str, ...] | None = None
) -> dict[Any, Any]:
    """`value` as a mapping (null = empty), refusing keys outside `allowed` when given."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistriesError(
            source, key or "(top level)", f"expected a mapping, got {_type_name(value)}"
        )
    if allowed is not None:
        for k in value:
            if k not in allowed:
                path = f"{key}.{k}" if key else str(k)
                raise RegistriesError(source, path, f"unknown key (allowed: {', '.join(allowed)})")
    return value


def _host_key(host: object, source: str, section: str, seen: Mapping[str, object]) -> str:
    if not isinstance(host, str):
        raise RegistriesError(source, f"{section}.{host}", "registry host must be a string")
    key = host.strip().lower()
    if key != WILDCARD:
        problem = _host_problem(key)
        if problem:
            raise RegistriesError(source, f"{section}.{host}", problem)
    if key in seen:
        raise RegistriesError(source, f"{section}.{host}", f"registry {key!r} is listed twice")
    return key


def _host_problem(hostport: str) -> str | None:
    """Why `hostport` is not a registry host (`name[:port]`, `ip[:port]`, `[v6][:port]`)."""
    if "://" in hostport:
        return (
            "registry host must not include a scheme (write 'docker.io', not 'https://docker.io')"
        )
    if "/" in hostport:
        return "registry host must not include a path"
    m = _HOST_RE.match(hostport)
    if m is None:
        return f"{hostport!r} is not a registry host[:port]"
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return f"port {port} out of range"
    if hostport.startswith("["):
        try:
            ipaddress.IPv6Address(hostport[1 : hostport.index("]")])
        except ValueError:
            return f"{hostport!r} has an invalid IPv6 address"
    return None


def _parse_mirror(value: object, source: str, key: str) -> MirrorConfig:
    body = _mapping(value, source, key, _MIRROR_KEYS)
    endpoints_raw = body.get("endpoint")
    endpoints: list[EndpointURL] = []
    if endpoints_raw is not None:
        if not isinstance(endpoints_raw, list):
            raise RegistriesError(
                source,
                f"{key}.endpoint",
                f"expected a list of URLs, got {_type_name(endpoints_raw)}",
            )
        for i, item in enumerate(endpoints_raw):
            endpoints.append(parse_endpoint(item, source, f"{key}.endpoint[{i}]"))
    rewrites: list[tuple[str, str]] = []
    for pattern, replacement in _mapping(body.get("rewrite"), source, f"{key}.rewrite").items():
        where = f"{key}.rewrite.{pattern}"
        if not isinstance(pattern, str) or not pattern:
            raise RegistriesError(source, where, "pattern must be a non-empty string")
        if not isinstance(replacement, str):
            raise RegistriesError(
                source, where, f"replacement must be a string, got {_type_name(replacement)}"
            )
        _check_regex(pattern, source, where)
        rewrites.append((pattern, replacement))
    return MirrorConfig(endpoints=tuple(endpoints), rewrites=tuple(rewrites))


def _check_regex(pattern: str, source: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RegistriesError(source, where, f"invalid regular expression: {exc}") from exc
    if _NON_RE2.search(pattern.replace("\\\\", "")):
        raise RegistriesError(
            source,
            where,
            "regular expression uses a construct Go's RE2 does not support "
            "(lookaround, backreference, atomic group or possessive quantifier)",
        )


def parse_endpoint(value: object, source: str, key: str) -> EndpointURL:
    """Split and check one endpoint URL (`[scheme://]host[:port][/path]`)."""
    if not isinstance(value, str) or not value.strip():
        raise RegistriesError(source, key, f"expected a URL string, got {_type_name(value)}")
    raw = value.strip()
    text = raw if "://" in raw else "//" + raw
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise RegistriesError(source, key, f"invalid URL {raw!r}: {exc}") from exc
    scheme = parts.scheme.lower() or None
    if scheme is not None and scheme not in ("http", "https"):
        raise RegistriesError(source, key, f"invalid URL {raw!r}: scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise RegistriesError(
            source, key, f"invalid URL {raw!r}: credentials belong in configs.<host>.auth"
        )
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise RegistriesError(source, key, f"invalid URL {raw!r}: no query or fragment allowed")
    hostname = parts.hostname
    if not hostname:
        raise RegistriesError(source, key, f"invalid URL {raw!r}: no host")
    host = f"[{hostname}]" if ":" in hostname else hostname.lower()
    problem = _host_problem(host if port is None else f"{host}:{port}")
    if problem is not None or port == 0:
        raise RegistriesError(source, key, f"invalid URL {raw!r}: {problem or 'port 0'}")
    return EndpointURL(raw=raw, scheme=scheme, host=host, port=port, path=parts.path)


def _parse_config(value: object, source: str, key: str) -> RegistryConfig:
    body = _mapping(value, source, key, _CONFIG_KEYS)
    auth: AuthConfig | None = None
    if body.get("auth") is not None:
        fields = _mapping(body["auth"], source, f"{key}.auth", _AUTH_KEYS)
        for name, v in fields.items():
            if v is not None and not isinstance(v, str):
                raise RegistriesError(
                    source, f"{key}.auth.{name}", f"expected a string, got {_type_name(v)}"
                )
        auth = AuthConfig(**{k: v for k, v in fields.items() if v is not None})
    tls: TLSConfig | None = None
    if body.get("tls") is not None:
        fields = _mapping(body["tls"], source, f"{key}.tls", _TLS_KEYS)
        paths: dict[str, str] = {}
        for name in _TLS_STR_KEYS:
            v = fields.get(name)
            if v is None or v == "":
                continue
            if not isinstance(v, str):
                raise RegistriesError(
                    source, f"{key}.tls.{name}", f"expected a file path, got {_type_name(v)}"
                )
            # containerd would resolve a relative path against certs.d/<host>/, a surprise.
            if not v.startswith("/"):
                raise RegistriesError(source, f"{key}.tls.{name}", f"{v!r} is not an absolute path")
            paths[name] = v
        skip = fields.get("insecure_skip_verify", False)
        if skip is None:
            skip = False
        if not isinstance(skip, bool):
            raise RegistriesError(
                source,
                f"{key}.tls.insecure_skip_verify",
                f"expected true or false, got {_type_name(skip)}",
            )
        if "key_file" in paths and "cert_file" not in paths:
            raise RegistriesError(source, f"{key}.tls.key_file", "key_file needs cert_file")
        tls = TLSConfig(insecure_skip_verify=skip, **paths)
    return RegistryConfig(auth=auth, tls=tls)
