"""hosts.toml rendering: one table case per K3s rule and per known K3s bug (REFERENCE.md §2)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

import pytest

from services.common.k3s.endpoints import is_localhost
from services.common.k3s.registries import RegistriesError, parse_registries
from services.pinner.hosts_toml import (
    MARKER,
    HostsOptions,
    RenderedHosts,
    render_hosts_files,
    toml_string,
)

TLS = HostsOptions(ca_file="/ca.crt", client_cert_file="/node.crt", client_key_file="/node.key")
NO_MIRROR = HostsOptions(embedded_mirror=False)

UPSTREAM = '  capabilities = ["pull", "resolve", "push"]'
MIRROR_CAPS = '  capabilities = ["pull", "resolve"]'
EMBEDDED = (
    '[host."https://127.0.0.1:6443/v2"]',
    MIRROR_CAPS,
    '  ca = ["/ca.crt"]',
    '  client = [["/node.crt", "/node.key"]]',
)
# The file K3s also writes for the embedded registry's own address (client cert for its pulls).
SELF = {
    "127.0.0.1:6443": (
        'server = "https://127.0.0.1:6443/v2"',
        'capabilities = ["pull", "resolve"]',
        'ca = ["/ca.crt"]',
        'client = [["/node.crt", "/node.key"]]',
        "",
        "[host]",
    )
}


def server(url: str, *extra: str) -> tuple[str, ...]:
    return (f'server = "{url}"', 'capabilities = ["pull", "resolve", "push"]', *extra)


def host(url: str, *fields: str) -> tuple[str, ...]:
    return ("", f'[host."{url}"]', MIRROR_CAPS, *fields)


def text(*lines: str) -> str:
    return "\n".join((MARKER, *lines)) + "\n"


@dataclass(frozen=True)
class Case:
    id: str
    yaml: str
    opts: HostsOptions
    files: dict[str, tuple[str, ...]]
    warnings: tuple[str, ...] = field(default=())


CASES = [
    # --- the embedded mirror ------------------------------------------------------------------
    Case(
        "embedded mirror first, with cluster CA and node client cert",
        "mirrors:\n  docker.io:\n",
        TLS,
        {
            "docker.io": (*server("https://registry-1.docker.io/v2"), "", *EMBEDDED),
            **SELF,
        },
    ),
    Case(
        "embedded mirror before the user's endpoints",
        "mirrors:\n  quay.io:\n    endpoint: [https://m.example.com]\n",
        TLS,
        {
            "quay.io": (
                *server("https://quay.io/v2"),
                "",
                *EMBEDDED,
                *host("https://m.example.com/v2"),
            ),
            **SELF,
        },
    ),
    Case(
        "embedded mirror on plain http when the node runs without TLS",
        "mirrors:\n  docker.io:\n",
        HostsOptions(mirror_tls=False, ca_file="/ca.crt"),
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2"),
                *host("http://127.0.0.1:6443/v2"),
            ),
            "127.0.0.1:6443": (
                'server = "http://127.0.0.1:6443/v2"',
                'capabilities = ["pull", "resolve"]',
                "",
                "[host]",
            ),
        },
    ),
    Case(
        "embedded mirror address and port are options",
        "mirrors:\n  docker.io:\n",
        HostsOptions(mirror_address="::1", mirror_port=7443, mirror_tls=False),
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2"),
                *host("http://[::1]:7443/v2"),
            ),
            "[::1]:7443": (
                'server = "http://[::1]:7443/v2"',
                'capabilities = ["pull", "resolve"]',
                "",
                "[host]",
            ),
        },
    ),
    Case(
        "embedded mirror only resolves tags when allowed",
        "mirrors:\n  docker.io:\n",
        HostsOptions(mirror_resolve=False, mirror_tls=False),
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2"),
                "",
                '[host."http://127.0.0.1:6443/v2"]',
                '  capabilities = ["pull"]',
            ),
            "127.0.0.1:6443": (
                'server = "http://127.0.0.1:6443/v2"',
                'capabilities = ["pull"]',
                "",
                "[host]",
            ),
        },
    ),
    Case(
        "node not participating: no embedded mirror, nothing containerd would not do anyway",
        "mirrors:\n  docker.io:\n",
        NO_MIRROR,
        {},
    ),
    Case(
        "localhost registries never get the embedded mirror",
        "mirrors:\n  localhost:5000:\n    endpoint: [other.example.com]\n  127.0.0.1:5001:\n",
        TLS,
        {
            "localhost:5000": (
                *server("http://localhost:5000/v2"),
                *host("https://other.example.com/v2"),
            ),
        },
    ),
    Case(
        "an endpoint naming the embedded mirror is the embedded mirror (no duplicate, no rewrites)",
        "mirrors:\n"
        "  docker.io:\n"
        "    endpoint: [127.0.0.1:6443, m.example.com]\n"
        "    rewrite: {'^a/(.*)': 'b/$1'}\n",
        TLS,
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2"),
                "",
                *EMBEDDED,
                *host(
                    "https://m.example.com/v2",
                    '  [host."https://m.example.com/v2".rewrite]',
                    '    "^a/(.*)" = "b/$1"',
                ),
            ),
            **SELF,
        },
        warnings=("docker.io: rewrites are written as",),
    ),
    # --- endpoint normalisation ---------------------------------------------------------------
    Case(
        "scheme defaults: https, http for localhost on other ports than 443",
        "mirrors:\n"
        "  quay.io:\n"
        "    endpoint: [m.example.com, 'localhost:5000', '127.0.0.1:443',\n"
        "               '[::1]:5001', 'localhost']\n",
        NO_MIRROR,
        {
            "quay.io": (
                *server("https://quay.io/v2"),
                *host("https://m.example.com/v2"),
                *host("http://localhost:5000/v2"),
                *host("https://127.0.0.1/v2"),
                *host("http://[::1]:5001/v2"),
                *host("https://localhost/v2"),
            ),
        },
    ),
    Case(
        "paths '', '/', '/v2' (and '/v2/') mean /v2; any other path sets override_path",
        "mirrors:\n"
        "  quay.io:\n"
        "    endpoint:\n"
        "      - https://a.example.com/\n"
        "      - https://b.example.com/v2\n"
        "      - https://c.example.com/v2/\n"
        "      - https://d.example.com/some/path\n",
        NO_MIRROR,
        {
            "quay.io": (
                *server("https://quay.io/v2"),
                *host("https://a.example.com/v2"),
                *host("https://b.example.com/v2"),
                *host("https://c.example.com/v2"),
                *host("https://d.example.com/some/path", "  override_path = true"),
            ),
        },
    ),
    Case(
        "duplicate endpoints dropped: one table each (K3s bug: duplicated TOML tables)",
        "mirrors:\n"
        "  quay.io:\n"
        "    endpoint: [m.example.com, 'https://m.example.com/v2/',\n"
        "               'HTTPS://M.example.com:443', n.example.com, m.example.com]\n",
        NO_MIRROR,
        {
            "quay.io": (
                *server("https://quay.io/v2"),
                *host("https://m.example.com/v2"),
                *host("https://n.example.com/v2"),
            ),
        },
    ),
    Case(
        "bare hostnames as endpoints are normalised (K3s bug)",
        "mirrors:\n  quay.io:\n    endpoint: [mirror.internal, 'mirror2.internal:8443/prefix']\n",
        NO_MIRROR,
        {
            "quay.io": (
                *server("https://quay.io/v2"),
                *host("https://mirror.internal/v2"),
                *host("https://mirror2.internal:8443/prefix", "  override_path = true"),
            ),
        },
    ),
    # --- default endpoint and server ------------------------------------------------------------
    Case(
        "docker.io's default endpoint is registry-1.docker.io, others https://<host>",
        "mirrors:\n"
        "  docker.io:\n"
        "    endpoint: [m.example.com]\n"
        "  r.example.com:5000:\n"
        "    endpoint: [m.example.com]\n",
        NO_MIRROR,
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2"),
                *host("https://m.example.com/v2"),
            ),
            "r.example.com:5000": (
                *server("https://r.example.com:5000/v2"),
                *host("https://m.example.com/v2"),
            ),
        },
    ),
    Case(
        "last endpoint equal to the default endpoint becomes server, not also a table",
        "mirrors:\n"
        "  docker.io:\n"
        "    endpoint: [m.example.com, docker.io]\n"
        "  quay.io:\n"
        "    endpoint: [m.example.com, 'https://quay.io/v2']\n",
        NO_MIRROR,
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2"),
                *host("https://m.example.com/v2"),
            ),
            "quay.io": (*server("https://quay.io/v2"), *host("https://m.example.com/v2")),
        },
    ),
    Case(
        "the default endpoint listed first stays a table (tried first, as written)",
        "mirrors:\n  quay.io:\n    endpoint: [quay.io, m.example.com]\n",
        NO_MIRROR,
        {
            "quay.io": (
                *server("https://quay.io/v2"),
                *host("https://quay.io/v2"),
                *host("https://m.example.com/v2"),
            ),
        },
    ),
    Case(
        "an http registry gets an http server line, never https (K3s bug)",
        "mirrors:\n  r.internal:5000:\n    endpoint: ['http://r.internal:5000']\n",
        TLS,
        {
            "r.internal:5000": (*server("http://r.internal:5000/v2"), "", *EMBEDDED),
            **SELF,
        },
    ),
    Case(
        '"*" is written to _default, falling back to the image\'s own registry',
        "mirrors:\n  '*':\n    endpoint: [m.example.com]\n",
        NO_MIRROR,
        {"_default": (*server(""), *host("https://m.example.com/v2"))},
    ),
    Case(
        "server override (tests: nothing listens on 127.0.0.1:9)",
        "mirrors:\n"
        "  docker.io:\n"
        "    endpoint: [m.example.com]\n"
        "  '*':\n"
        "    endpoint: [m.example.com]\n",
        HostsOptions(embedded_mirror=False, server_override="http://127.0.0.1:9"),
        {
            "docker.io": (*server("http://127.0.0.1:9/v2"), *host("https://m.example.com/v2")),
            "_default": (*server("http://127.0.0.1:9/v2"), *host("https://m.example.com/v2")),
        },
    ),
    Case(
        "default endpoint disabled (upstream containerd): last endpoint becomes server",
        "mirrors:\n"
        "  docker.io:\n"
        "    endpoint: [a.example.com, b.example.com]\n"
        "    rewrite: {'^x': 'y'}\n",
        HostsOptions(embedded_mirror=False, disable_default_endpoint=True),
        {
            "docker.io": (
                'server = "https://b.example.com/v2"',
                'capabilities = ["pull", "resolve"]',
                *host(
                    "https://a.example.com/v2",
                    '  [host."https://a.example.com/v2".rewrite]',
                    '    "^x" = "y"',
                ),
            ),
        },
        warnings=("docker.io: rewrites are written as",),
    ),
    Case(
        "default endpoint disabled with only the embedded mirror: it is the server",
        "mirrors:\n  docker.io:\n",
        HostsOptions(
            disable_default_endpoint=True,
            ca_file="/ca.crt",
            client_cert_file="/node.crt",
            client_key_file="/node.key",
        ),
        {"docker.io": SELF["127.0.0.1:6443"], **SELF},
    ),
    Case(
        "default endpoint disabled, nothing left: no file and a warning",
        "mirrors:\n  docker.io:\n",
        HostsOptions(embedded_mirror=False, disable_default_endpoint=True),
        {},
        warnings=("docker.io: default endpoint disabled but no endpoint is left",),
    ),
    Case(
        "default endpoint disabled (K3s's containerd): server omitted",
        "mirrors:\n  docker.io:\n    endpoint: [a.example.com]\n    rewrite: {'^x': 'y'}\n",
        HostsOptions(embedded_mirror=False, disable_default_endpoint=True, flavour="k3s"),
        {
            "docker.io": (
                "",
                '[host."https://a.example.com/v2"]',
                MIRROR_CAPS,
                '  [host."https://a.example.com/v2".rewrite]',
                '    "^x" = "y"',
            ),
        },
    ),
    Case(
        "default endpoint disabled only applies to mirrors, not to configs-only registries",
        "configs:\n  quay.io:\n    tls: {insecure_skip_verify: true}\n",
        HostsOptions(embedded_mirror=False, disable_default_endpoint=True),
        {"quay.io": (*server("https://quay.io/v2", "skip_verify = true"), "", "[host]")},
    ),
    # --- TLS and credentials --------------------------------------------------------------------
    Case(
        "TLS comes from configs[<endpoint host>] for every endpoint and the server (K3s bug)",
        """
mirrors:
  docker.io:
    endpoint: ['https://m.example.com:8443', 'n.example.com']
configs:
  m.example.com:8443:
    tls: {ca_file: /m-ca.pem}
  n.example.com:
    tls: {cert_file: /n.pem}
  docker.io:
    tls: {ca_file: /hub-ca.pem, insecure_skip_verify: false}
""",
        NO_MIRROR,
        {
            "docker.io": (
                *server("https://registry-1.docker.io/v2", 'ca = ["/hub-ca.pem"]'),
                *host("https://m.example.com:8443/v2", '  ca = ["/m-ca.pem"]'),
                *host("https://n.example.com/v2", '  client = [["/n.pem", ""]]'),
            ),
            "m.example.com:8443": (
                *server("https://m.example.com:8443/v2", 'ca = ["/m-ca.pem"]'),
                "",
                "[host]",
            ),
            "n.example.com": (
                *server("https://n.example.com/v2", 'client = [["/n.pem", ""]]'),
                "",
                "[host]",
            ),
        },
    ),
    Case(
        "configs-only entries give a tree containerd 1.6 accepts (K3s bug: invalid host tree)",
        "configs:\n"
        "  r.example.com:\n"
        "    tls: {ca_file: /ca.pem, cert_file: /c.pem, key_file: /k.pem}\n",
        NO_MIRROR,
        {
            "r.example.com": (
                *server(
                    "https://r.example.com/v2",
                    'ca = ["/ca.pem"]',
                    'client = [["/c.pem", "/k.pem"]]',
                ),
                "",
                "[host]",
            ),
        },
    ),
    Case(
        "configs '*' goes to _default",
        "configs:\n  '*':\n    tls: {insecure_skip_verify: true}\n",
        NO_MIRROR,
        {"_default": (*server("", "skip_verify = true"), "", "[host]")},
    ),
    Case(
        "credentials never go into hosts.toml; an auth-only config writes nothing",
        "configs:\n"
        "  r.example.com:\n"
        "    auth: {username: alice, password: s3cret, auth: YWxpY2U6czNjcmV0,\n"
        "           identity_token: tok}\n",
        NO_MIRROR,
        {},
    ),
    Case(
        "TLS files are not written for plain-http endpoints",
        "mirrors:\n"
        "  quay.io:\n"
        "    endpoint: ['http://m.example.com']\n"
        "configs:\n"
        "  m.example.com:\n"
        "    tls: {ca_file: /ca.pem}\n",
        NO_MIRROR,
        {
            "quay.io": (*server("https://quay.io/v2"), *host("http://m.example.com/v2")),
            "m.example.com": (
                *server("https://m.example.com/v2", 'ca = ["/ca.pem"]'),
                "",
                "[host]",
            ),
        },
    ),
    Case(
        "a mirror with nothing to add writes no file",
        "mirrors:\n  quay.io:\n    endpoint: [quay.io]\n",
        NO_MIRROR,
        {},
    ),
    # --- containerd version -----------------------------------------------------------------------
    Case(
        "dial_timeout written for containerd >= 2.1",
        "mirrors:\n  quay.io:\n    endpoint: [m.example.com]\n",
        HostsOptions(embedded_mirror=False, dial_timeout=0.5, containerd_version=(2, 1)),
        {
            "quay.io": (
                *server("https://quay.io/v2", 'dial_timeout = "500ms"'),
                *host("https://m.example.com/v2", '  dial_timeout = "500ms"'),
            ),
        },
    ),
    Case(
        "dial_timeout not written for containerd 1.6",
        "mirrors:\n  quay.io:\n    endpoint: [m.example.com]\n",
        HostsOptions(embedded_mirror=False, dial_timeout=2),
        {"quay.io": (*server("https://quay.io/v2"), *host("https://m.example.com/v2"))},
        warnings=("dial_timeout not written: containerd 1.6",),
    ),
]


def render(yaml_text: str, opts: HostsOptions) -> RenderedHosts:
    return render_hosts_files(parse_registries(yaml_text), opts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rendering(case: Case) -> None:
    out = render(case.yaml, case.opts)
    assert out.files == {d: text(*lines) for d, lines in case.files.items()}
    assert len(out.warnings) == len(case.warnings)
    for got, expected in zip(out.warnings, case.warnings, strict=True):
        assert got.startswith(expected)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_file_is_toml_with_hosts_in_file_order(case: Case) -> None:
    out = render(case.yaml, case.opts)
    for plan in out.plans:
        body = out.files[plan.directory]
        assert body.splitlines()[0] == MARKER
        doc = tomllib.loads(body)
        urls = [h.url for h in plan.hosts]
        # containerd tries hosts in the order their tables appear in the text.
        assert re.findall(r'^\[host\."([^"]*)"\]$', body, flags=re.M) == urls
        assert list(doc.get("host", {})) == urls
        assert "host" in doc  # containerd 1.6 ignores a file without a host tree
        for entry in plan.hosts:
            table = doc["host"][entry.url]
            assert table["capabilities"] == list(entry.capabilities)
            assert table.get("rewrite", {}) == dict(entry.rewrites)
        if plan.server is not None:
            assert doc["server"] == plan.server.url
            assert doc["capabilities"] == list(plan.server.capabilities)
            assert "rewrite" not in doc  # the default endpoint is tried without rewrites
        else:
            assert "server" not in doc


def test_credentials_never_reach_the_text() -> None:
    out = render(
        "mirrors:\n  r.example.com:\n    endpoint: [m.example.com]\n"
        "configs:\n  r.example.com:\n    auth: {username: alice, password: s3cret}\n"
        "    tls: {ca_file: /ca.pem}\n",
        TLS,
    )
    assert out.files
    for body in out.files.values():
        assert "s3cret" not in body and "alice" not in body


def test_files_come_out_in_directory_order() -> None:
    out = render("mirrors:\n  quay.io:\n  docker.io:\n  '*':\n", TLS)
    assert (
        list(out.files)
        == sorted(out.files)
        == [
            "127.0.0.1:6443",
            "_default",
            "docker.io",
            "quay.io",
        ]
    )


def test_rewrite_patterns_with_quotes_and_backslashes_round_trip() -> None:
    pattern = r'^library/(\w+)"\.x$'
    out = render(
        "mirrors:\n  quay.io:\n    endpoint: [m.example.com]\n    rewrite:\n"
        f"      {toml_string(pattern)}: 'a\\b'\n",
        NO_MIRROR,
    )
    doc = tomllib.loads(out.files["quay.io"])
    assert doc["host"]["https://m.example.com/v2"]["rewrite"] == {pattern: "a\\b"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("a\nb\x01", '"a\\nb\\u0001"'),
    ],
)
def test_toml_string_escapes(value: str, expected: str) -> None:
    assert toml_string(value) == expected
    assert tomllib.loads(f"k = {toml_string(value)}")["k"] == value


@pytest.mark.parametrize(
    ("hostport", "local"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:80", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("10.0.0.1:5000", False),
        ("docker.io", False),
        ("localhost.example.com", False),
    ],
)
def test_is_localhost(hostport: str, local: bool) -> None:
    assert is_localhost(hostport) is local


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        (HostsOptions(server_override="ftp://x"), "server_override"),
        (HostsOptions(dial_timeout=0), "dial_timeout"),
    ],
)
def test_bad_options_are_errors(opts: HostsOptions, fragment: str) -> None:
    with pytest.raises(RegistriesError, match=fragment):
        render("mirrors:\n  docker.io:\n", opts)
