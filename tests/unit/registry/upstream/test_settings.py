"""The `upstream` config section and the settings the client takes from a node config."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import ConfigError, load_config
from services.registry.upstream import UpstreamSettings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_from_config(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "node: {address: 10.0.0.7}\nregistry: {port: 6445}\n"
            "pinner: {disable_default_endpoint: true}\n"
            "upstream: {max_concurrent_fetches: 3, max_bandwidth: 1048576, queue_wait: 0.2}\n",
        ),
        env={},
    )
    settings = UpstreamSettings.from_config(cfg)
    limits = settings.limits
    assert (limits.max_concurrent_fetches, limits.max_bandwidth, limits.queue_wait) == (
        3,
        1048576,
        0.2,
    )
    assert settings.disable_default_endpoint is True
    assert settings.own_hosts == {
        "127.0.0.1:6445",
        "localhost:6445",
        "[::1]:6445",
        "10.0.0.7:6445",
    }


def test_k3s_switch_disables_the_default_endpoint_for_upstream_fetches_too(
    tmp_path: Path,
) -> None:
    cfg = load_config(write(tmp_path, "k3s: {disable-default-registry-endpoint: true}\n"), env={})
    assert UpstreamSettings.from_config(cfg).disable_default_endpoint is True


def test_defaults_and_environment_override(tmp_path: Path) -> None:
    cfg = load_config(None, env={"PEERMIRROR_UPSTREAM__MAX_BANDWIDTH": "5000"})
    assert cfg.upstream.max_bandwidth == 5000
    assert cfg.upstream.max_concurrent_fetches == 8


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("upstream: {max_bandwidth: -1}\n", "upstream.max_bandwidth"),
        ("upstream: {max_concurrent_fetches: 0}\n", "upstream.max_concurrent_fetches"),
        ("upstream: {read_timeout: fast}\n", "upstream.read_timeout"),
    ],
)
def test_bad_values_name_the_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert key in str(err.value) and str(path) in str(err.value)
