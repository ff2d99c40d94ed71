"""The netns mesh works while a Docker daemon's FORWARD DROP is in force.

dockerd sets the host's FORWARD policy to DROP with bridge netfilter on, so frames between two
namespaces on one bridge are filtered by FORWARD. The harness puts an ACCEPT rule for its bridge
first in FORWARD when it makes the bridge and deletes it with the bridge. The DROP here is scoped
to this test's bridge (appended to FORWARD, so it acts like the policy for it alone): other
engineers' meshes on this machine keep working while the test runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import netns

LISTEN_PORT = 7000
SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {LISTEN_PORT})); s.listen(); print('up', flush=True)\n"
    "while True:\n    c,_=s.accept(); c.sendall(b'ok'); c.close()\n"
)
CLIENT = (
    "import socket,sys\n"
    "try:\n"
    f"    c=socket.create_connection((sys.argv[1], {LISTEN_PORT}), timeout=1.5)\n"
    "    sys.exit(0 if c.recv(2) == b'ok' else 1)\n"
    "except OSError:\n    sys.exit(1)\n"
)


def _drop_rule(bridge: str) -> list[str]:
    return [
        "FORWARD", "-i", bridge, "-o", bridge,
        "-m", "comment", "--comment", "peermirror-test-docker-drop", "-j", "DROP",
    ]  # fmt: skip


def _rule_exists(rule: list[str]) -> bool:
    check = ["iptables", "-w", "-C", *rule]
    return subprocess.run(check, capture_output=True, timeout=10).returncode == 0


def _reaches(namespace: str, ip: str) -> bool:
    argv = netns.exec_argv(namespace, [sys.executable, "-c", CLIENT, ip])
    return subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=15).returncode == 0


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[netns.MeshLease, str, str]]:
    """Namespaces n1 and n2 on a fresh mesh bridge whose frames go through iptables (bridge
    netfilter on for this bridge only, as dockerd turns it on for every bridge); n2 listens."""
    lease = netns.MeshLease(tmp_path)
    names = lease.names
    namespaces = [names.namespace("n1"), names.namespace("n2")]
    server: subprocess.Popen[bytes] | None = None
    try:
        subnet = lease.claim_bridge()
        if not Path("/proc/sys/net/bridge").is_dir() and shutil.which("modprobe"):
            netns.run(["modprobe", "br_netfilter"])
        netns.run(["ip", "link", "set", names.bridge, "type", "bridge", "nf_call_iptables", "1"])
        for index, ns in enumerate(namespaces, start=1):
            netns.create_namespace(ns)
            netns.attach(ns, names.bridge, names.veth(index), netns.host_address(subnet, index))
        server = subprocess.Popen(
            netns.exec_argv(namespaces[1], [sys.executable, "-c", SERVER]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdout.readline() == b"up\n"
        yield lease, namespaces[0], str(netns.host_address(subnet, 2).ip)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in namespaces:
            netns.delete_namespace(ns)
        for index in (1, 2):
            netns.delete_link(names.veth(index))
        netns.delete_link(names.bridge)
        lease.release()


def test_nodes_reach_each_other_under_a_forward_drop(
    two_nodes: tuple[netns.MeshLease, str, str],
) -> None:
    lease, n1, n2_ip = two_nodes
    bridge = lease.names.bridge
    assert bridge in netns.forward_rule_bridges(netns.run(["iptables", "-w", "-S", "FORWARD"]))
    netns.run(["iptables", "-w", "-A", *_drop_rule(bridge)])
    try:
        assert _reaches(n1, n2_ip), "the harness's ACCEPT rule should let mesh traffic through"
        # Without the harness's rule the DROP bites: the check above is not vacuous.
        netns.remove_forward_rule(bridge)
        assert not _reaches(n1, n2_ip), "bridge traffic did not pass FORWARD: test proves nothing"
        netns.run(["iptables", "-w", "-I", *netns.forward_rule(bridge)])
        assert _reaches(n1, n2_ip)
    finally:
        while _rule_exists(_drop_rule(bridge)):
            netns.run(["iptables", "-w", "-D", *_drop_rule(bridge)])


def test_deleting_the_bridge_removes_its_forward_rule(tmp_path: Path) -> None:
    lease = netns.MeshLease(tmp_path)
    try:
        lease.claim_bridge()
        rules = netns.run(["iptables", "-w", "-S", "FORWARD"])
        assert netns.forward_rule_bridges(rules).count(lease.names.bridge) == 1
    finally:
        netns.delete_link(lease.names.bridge)
        lease.release()
    rules = netns.run(["iptables", "-w", "-S", "FORWARD"])
    assert lease.names.bridge not in netns.forward_rule_bridges(rules)


def test_sweep_removes_the_forward_rule_of_a_dead_run() -> None:
    dead = netns.MeshNames(netns.new_token())
    # A crashed run whose bridge is gone but whose rule is still in FORWARD.
    netns.run(["iptables", "-w", "-I", *netns.forward_rule(dead.bridge)])
    try:
        removed = netns.sweep_leftovers()
        assert f"FORWARD rule of {dead.bridge}" in removed
        rules = netns.run(["iptables", "-w", "-S", "FORWARD"])
        assert dead.bridge not in netns.forward_rule_bridges(rules)
    finally:
        netns.remove_forward_rule(dead.bridge)


def test_forward_rule_parsing() -> None:
    save = "\n".join(
        [
            "-P FORWARD DROP",
            "-A FORWARD -j DOCKER-USER",
            '-A FORWARD -i pmb-abc123 -o pmb-abc123 -m comment --comment "peermirror-mesh-forward"'
            " -j ACCEPT",
        ]
    )
    assert netns.forward_rule_bridges(save) == ["pmb-abc123"]
