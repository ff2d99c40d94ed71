"""`peermirror health registry` probes the registry's HTTP health paths the way the deploy files
use it: over mutual TLS with the node's certificate, which a client without one cannot do."""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.harness.service_procs import (
    NodePorts,
    cli_argv,
    running,
    wait_serving,
    write_node_config,
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, timeout=60, check=False)


def test_registry_probe_over_mutual_tls(tmp_path: Path) -> None:
    ports = NodePorts.pick()
    config = write_node_config(tmp_path, ports)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["tls"] = {"enabled": True}  # files at the default place: <node.data_dir>/tls
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    ca_dir = tmp_path / "ca"
    assert cli("certs", "init", "--out", str(ca_dir)).returncode == 0
    made = cli(
        "certs", "node", "--name", "test-node", "--ip", "127.0.0.1",
        "--ca-dir", str(ca_dir), "--out", str(tmp_path / "data" / "tls"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr

    with running(cli_argv("registry", "--config", str(config)), tmp_path / "logs", "r") as proc:
        wait_serving(ports.grpc_address("registry"), proc)
        for extra, path in (([], "/readyz"), (["--live"], "/livez")):
            probe = cli("health", "registry", *extra, "--config", str(config))
            assert probe.returncode == 0, probe.stdout + probe.stderr
            assert (
                probe.stdout.strip() == f"https://127.0.0.1:{ports.registry_http}{path}: HTTP 200"
            )
        # What kubelet's httpGet probe does: TLS without a client certificate. Refused.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{ports.registry_http}/readyz"
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            # No proxy from the environment: the request stays on loopback.
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
            opener.open(url, timeout=5).read()
        assert proc.terminate() == 0

    stopped = cli("health", "registry", "--timeout", "1", "--config", str(config))
    assert stopped.returncode == 1
    assert "UNREACHABLE" in stopped.stdout
