"""Each service and the node supervisor start, serve health, survive a crash and stop on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.harness.service_procs import (
    START_TIMEOUT,
    NodePorts,
    ServiceProcess,
    cli_argv,
    health_status,
    http_get,
    running,
    wait_http_ok,
    wait_serving,
    write_node_config,
)
from tests.harness.wait import eventually

SERVICES = ("discovery", "registry", "pinner")


@pytest.fixture
def node(tmp_path: Path) -> tuple[NodePorts, Path]:
    ports = NodePorts.pick()
    return ports, write_node_config(tmp_path, ports)


@pytest.mark.parametrize("service", SERVICES)
def test_service_serves_health_and_stops_cleanly_on_sigterm(
    service: str, node: tuple[NodePorts, Path], tmp_path: Path
) -> None:
    ports, config = node
    with running(cli_argv(service, "--config", str(config)), tmp_path / "logs", service) as proc:
        wait_serving(ports.grpc_address(service), proc)
        if service == "registry":
            assert json.loads(wait_http_ok(f"{ports.registry_url}/livez")) == {"status": "ok"}
            status, body = http_get(f"{ports.registry_url}/readyz")
            assert (status, json.loads(body)) == (200, {"status": "ready"})
        assert proc.terminate(timeout=5.0) == 0

        records = proc.json_lines()
        assert records, "the service logged nothing"
        assert {r["service"] for r in records} == {service}
        started = [r for r in records if r["event"] == f"{service} started"]
        assert len(started) == 1
        assert ports.grpc_address(service) in json.dumps(started[0])
        assert records[-1]["event"] == f"{service} stopped"


@pytest.mark.parametrize("service", SERVICES)
def test_a_second_sigterm_does_not_cut_the_stop_short(
    service: str, node: tuple[NodePorts, Path], tmp_path: Path
) -> None:
    # A SIGKILLed node's children can be sent their parent-death SIGTERM more than once.
    ports, config = node
    with running(cli_argv(service, "--config", str(config)), tmp_path / "logs", service) as proc:
        wait_serving(ports.grpc_address(service), proc)
        proc.proc.send_signal(signal.SIGTERM)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=START_TIMEOUT) == 0
        assert proc.json_lines()[-1]["event"] == f"{service} stopped"


def test_registry_unknown_path_is_a_json_404(node: tuple[NodePorts, Path], tmp_path: Path) -> None:
    ports, config = node
    with running(cli_argv("registry", "--config", str(config)), tmp_path / "logs", "r") as proc:
        wait_http_ok(f"{ports.registry_url}/livez")
        status, body = http_get(f"{ports.registry_url}/no/such/path")
        assert status == 404
        assert isinstance(json.loads(body), dict)
        assert proc.terminate() == 0


def test_each_request_is_one_json_line_and_sanics_access_log_stays_off(
    node: tuple[NodePorts, Path], tmp_path: Path
) -> None:
    ports, config = node
    data = yaml.safe_load(config.read_text())
    data["log"]["level"] = "debug"  # where Sanic's own access log would add a second line
    config.write_text(yaml.safe_dump(data))
    with running(cli_argv("registry", "--config", str(config)), tmp_path / "logs", "r") as proc:
        wait_http_ok(f"{ports.registry_url}/livez")
        assert proc.terminate() == 0
    records = proc.json_lines()
    assert not [r for r in records if r.get("logger") == "sanic.access"]
    livez = [r for r in records if r.get("event") == "request" and r.get("path") == "/livez"]
    assert livez, "no request line for /livez"
    assert all(
        r["service"] == "registry" and "timestamp" in r and r.get("request_id") for r in livez
    ), livez


@pytest.mark.parametrize("service", SERVICES)
def test_taken_port_fails_loudly_naming_the_address(
    service: str, node: tuple[NodePorts, Path], tmp_path: Path
) -> None:
    ports, config = node
    taken = (
        ports.registry_http
        if service == "registry"
        else int(ports.grpc_address(service).rsplit(":", 1)[1])
    )
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        proc = ServiceProcess(cli_argv(service, "--config", str(config)), tmp_path, service)
        try:
            code = proc.proc.wait(timeout=START_TIMEOUT)
        finally:
            proc.kill()
    assert code != 0
    failures = [line for line in proc.output_lines() if "failed to start" in line]
    assert len(failures) == 1
    assert f"127.0.0.1:{taken}" in failures[0]
    assert "already in use" in failures[0]


def _children(node_pid: int) -> dict[str, psutil.Process]:
    """The node's live children by the service they run."""
    found: dict[str, psutil.Process] = {}
    for child in psutil.Process(node_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            cmdline = child.cmdline()
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            for service in SERVICES:
                if service in cmdline:
                    found[service] = child
    return found


def _wait_for_child(node_pid: int, service: str, not_pid: int | None = None) -> psutil.Process:

    def child() -> psutil.Process | None:
        found = _children(node_pid).get(service)
        return found if found is not None and found.pid != not_pid else None

    if not eventually(child, START_TIMEOUT, interval=0.1):
        raise TimeoutError(f"no {service} child of {node_pid} (other than {not_pid})")
    found = child()
    assert found is not None
    return found


@pytest.fixture
def node_process(node: tuple[NodePorts, Path], tmp_path: Path) -> Iterator[ServiceProcess]:
    _ports, config = node
    proc = ServiceProcess(cli_argv("node", "--config", str(config)), tmp_path / "logs", "node")
    try:
        yield proc
    finally:
        # Never leave a child behind, even when the test failed half way.
        with contextlib.suppress(psutil.NoSuchProcess):
            leftovers = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            for child in leftovers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            psutil.wait_procs(leftovers, timeout=START_TIMEOUT)
        proc.kill()


def test_node_runs_all_three_restarts_a_killed_child_and_stops_everyone(
    node: tuple[NodePorts, Path], node_process: ServiceProcess
) -> None:
    ports, _config = node
    for service in SERVICES:
        wait_serving(ports.grpc_address(service), node_process)
    wait_http_ok(f"{ports.registry_url}/livez")

    victim = _wait_for_child(node_process.pid, "registry")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=START_TIMEOUT)
    replacement = _wait_for_child(node_process.pid, "registry", not_pid=victim.pid)
    assert replacement.pid != victim.pid
    wait_serving(ports.grpc_address("registry"), node_process)
    wait_http_ok(f"{ports.registry_url}/livez")
    # The others were left alone.
    assert health_status(ports.grpc_address("discovery")) == "SERVING"

    children = list(_children(node_process.pid).values())
    assert sorted(c.cmdline()[3] for c in children) == sorted(SERVICES)
    assert node_process.terminate(timeout=5.0) == 0
    gone, alive = psutil.wait_procs(children, timeout=1.0)
    assert alive == []
    assert {c.pid for c in gone} == {c.pid for c in children}

    records = node_process.json_lines()
    restarts = [r for r in records if r["event"] == "child exited, restarting"]
    assert [(r["child"], r["returncode"]) for r in restarts] == [("registry", -9)]
    assert {r["service"] for r in records} == {"node", *SERVICES}


def test_children_stop_when_the_node_is_killed(
    node: tuple[NodePorts, Path], node_process: ServiceProcess
) -> None:
    ports, _config = node
    for service in SERVICES:
        wait_serving(ports.grpc_address(service), node_process)
    children = list(_children(node_process.pid).values())
    assert len(children) == len(SERVICES)

    node_process.proc.send_signal(signal.SIGKILL)
    node_process.proc.wait(timeout=START_TIMEOUT)
    _gone, alive = psutil.wait_procs(children, timeout=START_TIMEOUT)
    assert alive == []
    # They were told to stop (SIGTERM from the kernel) and stopped cleanly.
    records = node_process.json_lines()
    signalled = {r["service"] for r in records if r.get("signal") == "SIGTERM"}
    stopped = {r["service"] for r in records if r["event"] == f"{r['service']} stopped"}
    assert signalled == stopped == set(SERVICES)
