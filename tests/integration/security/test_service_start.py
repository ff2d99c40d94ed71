"""The real service processes: TLS unless turned off explicitly, and plain mode said in the log."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

import yaml

from services.common import pki
from services.common.tls import client_context
from tests.harness.service_procs import (
    NodePorts,
    cli_argv,
    running,
    wait_serving,
    write_node_config,
)
from tests.integration.security.conftest import ClusterPki

START_TIMEOUT = 30.0


def _config(tmp_path: Path, tls: dict[str, object] | None) -> tuple[NodePorts, Path]:
    ports = NodePorts.pick()
    path = write_node_config(tmp_path, ports)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if tls is None:
        del data["tls"]  # the default: mutual TLS
    else:
        data["tls"] = tls
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return ports, path


def _plain_warnings(lines: list[dict[str, object]]) -> list[str]:
    return [
        str(r["event"])
        for r in lines
        if r.get("level") == "warning" and "tls.enabled is false" in str(r.get("event"))
    ]


def test_without_certificates_the_services_refuse_to_start(tmp_path: Path) -> None:
    _, config = _config(tmp_path, None)
    for service in ("registry", "discovery"):
        result = subprocess.run(
            cli_argv(service, "--config", str(config)),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert "tls." in result.stderr and "peermirror certs node" in result.stderr


def test_plain_mode_is_explicit_and_logged(tmp_path: Path) -> None:
    ports, config = _config(tmp_path, {"enabled": False})
    for service in ("registry", "discovery"):
        argv = cli_argv(service, "--config", str(config))
        with running(argv, tmp_path / "logs", service) as proc:
            wait_serving(ports.grpc_address(service), proc)
            assert len(_plain_warnings(proc.json_lines())) == 1


def test_the_registry_serves_mutual_tls_from_the_default_files(
    tmp_path: Path, cluster: ClusterPki
) -> None:
    ports, config = _config(tmp_path, None)
    # `peermirror certs node --out <node.data_dir>/tls` puts them where the defaults look.
    issued = pki.issue_node(cluster.ca, "n", "127.0.0.1")
    pki.write_node(tmp_path / "data" / "tls", issued, cluster.ca.cert)
    with running(cli_argv("registry", "--config", str(config)), tmp_path / "logs", "r") as proc:
        wait_serving(ports.grpc_address("registry"), proc)
        url = f"https://127.0.0.1:{ports.registry_http}/readyz"
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=client_context(cluster.peer)),
        )
        with opener.open(url, timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ready"}
        refused = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        refused.load_verify_locations(cafile=str(cluster.peer.ca_file))
        bare = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=refused)
        )
        try:
            bare.open(url, timeout=5)
        except OSError:
            pass
        else:
            raise AssertionError("a client without a certificate was answered")
        assert _plain_warnings(proc.json_lines()) == []
