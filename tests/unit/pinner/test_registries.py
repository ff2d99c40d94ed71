"""registries.yaml parsing: the K3s schema, and errors that name the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.k3s.registries import (
    EndpointURL,
    Registries,
    RegistriesError,
    TLSConfig,
    load_registries,
    parse_registries,
)


def test_full_schema_is_parsed_in_file_order() -> None:
    reg = parse_registries(
        """
mirrors:
  docker.io:
    endpoint: ["https://b.example.com", "a.example.com:5000/path"]
    rewrite:
      "^rancher/(.*)": "mirrored/$1"
      "^library/(.*)": "lib/$1"
  "*":
configs:
  b.example.com:
    auth: {username: u, password: p, auth: x, identity_token: t}
    tls:
      ca_file: /etc/ca.pem
      cert_file: /etc/c.pem
      key_file: /etc/k.pem
      insecure_skip_verify: true
"""
    )
    assert list(reg.mirrors) == ["docker.io", "*"]
    hub = reg.mirrors["docker.io"]
    assert hub.endpoints == (
        EndpointURL("https://b.example.com", "https", "b.example.com", None, ""),
        EndpointURL("a.example.com:5000/path", None, "a.example.com", 5000, "/path"),
    )
    assert hub.rewrites == (("^rancher/(.*)", "mirrored/$1"), ("^library/(.*)", "lib/$1"))
    assert reg.mirrors["*"].endpoints == ()
    cfg = reg.configs["b.example.com"]
    assert cfg.tls == TLSConfig("/etc/ca.pem", "/etc/c.pem", "/etc/k.pem", True)
    assert cfg.auth is not None and cfg.auth.username == "u"
    assert "p" not in repr(cfg.auth)  # secrets stay out of logs


@pytest.mark.parametrize("text", ["", "# nothing\n", "mirrors:\nconfigs:\n"])
def test_empty_documents_mean_no_registries(text: str) -> None:
    assert parse_registries(text) == Registries()


def test_null_mirror_entry_is_valid_and_mirrored() -> None:
    reg = parse_registries("mirrors:\n  docker.io:\n")
    assert reg.mirrors["docker.io"].endpoints == ()
    assert reg.is_mirrored("docker.io")
    assert not reg.is_mirrored("quay.io")
    assert parse_registries('mirrors:\n  "*":\n').is_mirrored("quay.io")


def test_host_keys_are_lowercased() -> None:
    assert list(parse_registries("mirrors:\n  Registry.Example.com:5000:\n").mirrors) == [
        "registry.example.com:5000"
    ]


def test_ipv6_endpoint_keeps_brackets() -> None:
    reg = parse_registries('mirrors:\n  docker.io:\n    endpoint: ["http://[::1]:5000"]\n')
    assert reg.mirrors["docker.io"].endpoints[0].hostport == "[::1]:5000"


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("mirrors: []\n", "mirrors", "expected a mapping, got a list"),
        ("- a\n", "(top level)", "expected a mapping"),
        ("auths: {}\n", "auths", "unknown key"),
        (
            "mirrors:\n  docker.io:\n    endpoints: []\n",
            "mirrors.docker.io.endpoints",
            "unknown key",
        ),
        ("mirrors:\n  docker.io: 3\n", "mirrors.docker.io", "expected a mapping"),
        (
            "mirrors:\n  docker.io:\n    endpoint: https://x.example.com\n",
            "mirrors.docker.io.endpoint",
            "expected a list of URLs",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: [https://ok.example.com, ftp://x]\n",
            "mirrors.docker.io.endpoint[1]",
            "scheme must be http or https",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: [5]\n",
            "mirrors.docker.io.endpoint[0]",
            "expected a URL string",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: ['https://u:p@x.example.com']\n",
            "mirrors.docker.io.endpoint[0]",
            "credentials belong in configs",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: ['https://x.example.com:99999']\n",
            "mirrors.docker.io.endpoint[0]",
            "invalid URL",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: ['https://x.example.com/v2?a=b']\n",
            "mirrors.docker.io.endpoint[0]",
            "no query",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: ['https://']\n",
            "mirrors.docker.io.endpoint[0]",
            "no host",
        ),
        (
            "mirrors:\n  docker.io:\n    endpoint: ['https://bad_host!/']\n",
            "mirrors.docker.io.endpoint[0]",
            "not a registry host",
        ),
        (
            "mirrors:\n  docker.io:\n    rewrite: {'(unclosed': x}\n",
            "mirrors.docker.io.rewrite.(unclosed",
            "invalid regular expression",
        ),
        (
            "mirrors:\n  docker.io:\n    rewrite: {'^(?=a)b': x}\n",
            "mirrors.docker.io.rewrite.^(?=a)b",
            "RE2",
        ),
        (
            "mirrors:\n  docker.io:\n    rewrite: {'(a)\\1': x}\n",
            "mirrors.docker.io.rewrite.(a)\\1",
            "RE2",
        ),
        (
            "mirrors:\n  docker.io:\n    rewrite: {'^a': 3}\n",
            "mirrors.docker.io.rewrite.^a",
            "replacement must be a string",
        ),
        (
            "mirrors:\n  https://docker.io:\n",
            "mirrors.https://docker.io",
            "must not include a scheme",
        ),
        (
            "mirrors:\n  docker.io/library:\n",
            "mirrors.docker.io/library",
            "must not include a path",
        ),
        ("mirrors:\n  'bad host':\n", "mirrors.bad host", "not a registry host"),
        ("mirrors:\n  x.io:70000:\n", "mirrors.x.io:70000", "out of range"),
        ("mirrors:\n  5000:\n", "mirrors.5000", "must be a string"),
        ("mirrors:\n  Docker.io:\n  docker.io:\n", "mirrors.docker.io", "listed twice"),
        ("mirrors:\n  docker.io:\n  docker.io:\n", "", "given twice"),
        ("configs:\n  x.io:\n    tls: {ca_file: 5}\n", "configs.x.io.tls.ca_file", "file path"),
        ("configs:\n  x.io:\n    tls: {ca_file: ca.pem}\n", "configs.x.io.tls.ca_file", "absolute"),
        ("configs:\n  x.io:\n    tls: {key_file: /k}\n", "configs.x.io.tls.key_file", "cert_file"),
        (
            "configs:\n  x.io:\n    tls: {insecure_skip_verify: 'yes please'}\n",
            "configs.x.io.tls.insecure_skip_verify",
            "true or false",
        ),
        ("configs:\n  x.io:\n    tls: {verify: true}\n", "configs.x.io.tls.verify", "unknown key"),
        ("configs:\n  x.io:\n    auth: {username: 5}\n", "configs.x.io.auth.username", "string"),
        ("configs:\n  x.io:\n    auth: {token: t}\n", "configs.x.io.auth.token", "unknown key"),
        ("configs:\n  x.io:\n    proxy: {}\n", "configs.x.io.proxy", "unknown key"),
        ("mirrors: {a: [}\n", "", "invalid YAML"),
    ],
)
def test_invalid_documents_name_file_and_key(text: str, key: str, fragment: str) -> None:
    with pytest.raises(RegistriesError) as info:
        parse_registries(text, source="/etc/rancher/k3s/registries.yaml")
    err = info.value
    assert err.source == "/etc/rancher/k3s/registries.yaml"
    assert err.key == key
    assert fragment in err.message
    prefix = f"/etc/rancher/k3s/registries.yaml: {key}: " if key else "/etc/rancher/k3s/"
    assert str(err).startswith(prefix)


def test_error_message_format_matches_brief() -> None:
    text = "mirrors:\n  docker.io:\n    endpoint: ['https://ok.example.com', 'gopher://x']\n"
    with pytest.raises(
        RegistriesError, match=r"^registries\.yaml: mirrors\.docker\.io\.endpoint\[1\]: "
    ):
        parse_registries(text)


def test_yaml_error_names_line() -> None:
    with pytest.raises(RegistriesError, match="line 2"):
        parse_registries("mirrors:\n  a: b: c\n")


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "registries.yaml"
    with pytest.raises(RegistriesError, match="file not found") as info:
        load_registries(missing)
    assert info.value.source == str(missing)
    assert load_registries(missing, missing_ok=True) == Registries()


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text("mirrors:\n  docker.io:\n    endpoint: [':bad']\n")
    with pytest.raises(RegistriesError) as info:
        load_registries(path)
    assert str(info.value).startswith(f"{path}: mirrors.docker.io.endpoint[0]: ")
