"""The netns mesh harness itself: nodes come up wired as documented and vanish without a trace.

One shared 3-node mesh serves the checks of what a running mesh offers (addresses, reachability,
containerd, health on node-local sockets, bootstrap, hosts.toml, isolation, service control);
separate short-lived meshes check teardown and the sweep of a crashed run's debris.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from tests.harness import netns
from tests.harness.fixtures_mesh import MeshFactory
from tests.harness.mesh import (
    DEFAULT_MIRRORS,
    NOWHERE,
    SERVICES,
    Mesh,
    MeshError,
    MeshNode,
    pull_via_mirror,
)
from tests.harness.service_procs import REPO_ROOT, health_status, http_get
from tests.harness.wait import eventually

pytestmark = pytest.mark.containerd


def peer_addresses(node: MeshNode) -> set[str]:
    """Addresses in `node`'s discovery routing table, asked over its node-local unix socket."""
    with grpc.insecure_channel(node.grpc_address("discovery")) as channel:
        reply = lpb_grpc.LocalDiscoveryStub(channel).ListPeers(lpb.ListPeersRequest(), timeout=5)
    return {p.contact.address for p in reply.peers}


def knows_exactly(node: MeshNode, ips: set[str]) -> bool:
    return peer_addresses(node) == ips


def test_nodes_have_own_namespace_and_address_in_one_private_subnet(mesh: Mesh) -> None:
    subnet = mesh.lease.subnet if mesh.lease else None
    assert subnet is not None and subnet.subnet_of(netns.POOL)
    ips = [node.ip for node in mesh.nodes]
    assert [node.name for node in mesh.nodes] == ["n1", "n2", "n3"]
    assert len(set(ips)) == 3 and all(ipaddress.ip_address(ip) in subnet for ip in ips)
    assert set(mesh.namespaces) <= set(netns.list_namespaces())
    for node in mesh.nodes:
        links = node.exec(["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"inet {node.ip}/24" in links
        # Only loopback and the veth: nothing else of the host leaks into a node.
        names = {line.split()[1] for line in links.splitlines()}
        assert names == {"lo", "eth0"}


def test_every_node_reaches_every_other_registry_on_its_ip(mesh: Mesh) -> None:
    for client in mesh.nodes:
        for server in mesh.nodes:
            if server is client:
                continue
            status, _ = client.http_get(f"{server.registry_url}/v2/")
            assert status == 200, (client.name, server.name)


def test_registry_answers_on_node_loopback_for_its_own_containerd(mesh: Mesh) -> None:
    for node in mesh.nodes:
        status, _ = node.http_get(f"http://127.0.0.1:{node.registry_port}/v2/")
        assert status == 200


def test_each_containerd_answers_ctr_version(mesh: Mesh) -> None:
    for node in mesh.nodes:
        out = node.ctr("version")
        server_part = out.split("Server:", 1)[1]
        assert "Version:" in server_part
        # And from inside the namespace, as pulls run.
        inside = node.exec(node.containerd.ctr_argv(["version"], "k8s.io")).stdout
        assert "Server:" in inside


def test_services_report_serving_on_node_local_unix_sockets(mesh: Mesh) -> None:
    for node in mesh.nodes:
        for service in ("discovery", "pinner"):
            address = node.grpc_address(service)
            assert address.startswith(f"unix:{node.dir}/")
            assert health_status(address) == "SERVING"
        status, _ = http_get(f"{node.registry_url}/readyz")
        assert status == 200
        assert all(node.service_running(s) for s in SERVICES)


def test_nodes_bootstrap_through_node_one_and_find_each_other(mesh: Mesh) -> None:
    assert mesh.nodes[1].config["discovery"]["bootstrap_peers"] == [f"{mesh.nodes[0].ip}:5001"]
    assert mesh.nodes[0].config["discovery"]["bootstrap_peers"] == []
    for node in mesh.nodes:
        others = {n.ip for n in mesh.nodes if n is not node}
        assert eventually(functools.partial(knows_exactly, node, others)), node.name


def test_containerd_reads_generated_hosts_toml_that_points_nowhere_but_the_mirror(
    mesh: Mesh,
) -> None:
    for node in mesh.nodes:
        assert node.containerd.config_path.read_text().count(f'config_path = "{node.hosts_dir}"')
        for registry in DEFAULT_MIRRORS:
            hosts = tomllib.loads((node.hosts_dir / registry / "hosts.toml").read_text())
            assert hosts["server"] == f"{NOWHERE}/v2"
            assert set(hosts["host"]) == {f"http://127.0.0.1:{node.registry_port}/v2"}


def test_pull_of_content_nobody_has_ends_at_the_dead_endpoint(mesh: Mesh) -> None:
    result = pull_via_mirror(mesh.nodes[2], "docker.io/library/nobody-has-this:1", check=False)
    assert result.returncode != 0
    # containerd tried its mirror, then the default endpoint, which is 127.0.0.1:9.
    assert "127.0.0.1:9" in result.stderr
    assert "registry-1.docker.io" not in result.stderr


def test_isolate_cuts_a_node_off_and_unisolate_brings_it_back(mesh: Mesh) -> None:
    n1, _, n3 = mesh.nodes
    n1.isolate()
    try:
        with pytest.raises(ConnectionError):
            n3.http_get(f"{n1.registry_url}/v2/", timeout=1.0)
        with pytest.raises(ConnectionError):
            n1.http_get(f"{n3.registry_url}/v2/", timeout=1.0)
        # Its own loopback still works: the node is cut off, not dead.
        assert n1.http_get(f"http://127.0.0.1:{n1.registry_port}/v2/")[0] == 200
        assert n1.service_running("registry")
    finally:
        n1.unisolate()
    assert n3.http_get(f"{n1.registry_url}/v2/")[0] == 200
    rules = n1.exec(["iptables", "-S"]).stdout
    assert netns.ISOLATE_COMMENT not in rules


def test_services_stop_start_and_kill_individually(mesh: Mesh) -> None:
    _, n2, n3 = mesh.nodes
    assert n2.stop_service("registry") == 0
    assert not n2.service_running("registry")
    with pytest.raises(ConnectionError):
        n3.http_get(f"{n2.registry_url}/v2/")
    assert n2.service_running("discovery") and n2.service_running("pinner")
    n2.start_service("registry")
    assert n3.http_get(f"{n2.registry_url}/v2/")[0] == 200

    n2.kill_service("pinner")
    assert not n2.service_running("pinner")
    n2.start_service("pinner")
    assert health_status(n2.grpc_address("pinner")) == "SERVING"
    starts = [r for r in n2.log_records("pinner") if r.get("event") == "grpc server listening"]
    assert len(starts) == 2


def test_service_logs_are_json_lines_per_service(mesh: Mesh) -> None:
    for node in mesh.nodes:
        assert set(node.logs) == {*SERVICES, "containerd"}
        for service in SERVICES:
            records = node.log_records(service)
            assert records, service
            assert any(node.name == r.get("node") for r in records), service


def test_extra_host_on_the_bridge_is_reachable_from_nodes(mesh: Mesh) -> None:
    host = mesh.add_host("upstream")
    assert host.ip not in {n.ip for n in mesh.nodes}
    (host.dir / "www").mkdir()
    (host.dir / "www" / "hello.txt").write_text("hi")
    server = host.popen(
        "http",
        ["python3", "-m", "http.server", "--bind", host.ip, "8080", "-d", str(host.dir / "www")],
    )
    assert eventually(lambda: _answers(mesh.nodes[0], f"http://{host.ip}:8080/hello.txt"))
    assert mesh.nodes[0].http_get(f"http://{host.ip}:8080/hello.txt") == (200, b"hi")
    # A link limit (bench.first_pull's upstream behind a cluster's internet link) is installed
    # on the host's own eth0 and traffic still flows through it.
    host.limit_egress(200)
    assert "tbf" in netns.egress_qdisc(host.ns) and "200Mbit" in netns.egress_qdisc(host.ns)
    assert mesh.nodes[0].http_get(f"http://{host.ip}:8080/hello.txt") == (200, b"hi")
    host.unlimit_egress()
    assert "tbf" not in netns.egress_qdisc(host.ns)
    assert server.stop() is not None


def _answers(node: MeshNode, url: str) -> bool:
    try:
        node.http_get(url, timeout=1.0)
    except ConnectionError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_teardown_leaves_no_namespace_link_process_or_file(mesh_factory: MeshFactory) -> None:
    m = mesh_factory(2, registry_ports=[6443, 7443])
    n1, n2 = m.nodes
    # Different registry ports per node work too (K3s servers keep 6443 for themselves).
    assert n1.http_get(f"{n2.registry_url}/v2/")[0] == 200
    assert n2.registry_url.endswith(":7443")
    pids = [p for n in m.nodes for p in (n.containerd.pid, *(s.pid for s in n.services.values()))]
    assert all(p is not None for p in pids)
    straggler = n1.popen("sleeper", ["sleep", "300"])
    assert straggler.pid is not None
    token, work = m.token, m.work_dir
    namespaces, bridge = m.namespaces, m.bridge
    lock = netns.MeshNames(token).lock_path
    assert lock.exists() and work.is_dir()

    m.close()

    assert not set(namespaces) & set(netns.list_namespaces())
    assert not [name for name in netns.list_links() if netns.token_of(name) == token]
    assert bridge not in netns.list_links()
    assert not [p for p in [*pids, straggler.pid] if p is not None and _alive(p)]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(work) not in ps
    assert not work.exists() and not lock.exists()
    m.close()  # idempotent


def test_sweep_removes_a_dead_runs_debris_but_not_a_live_mesh(tmp_path: Path) -> None:
    # A run that crashed: objects named with a token whose lock nobody holds, a process inside.
    dead = netns.MeshNames(netns.new_token())
    netns.STATE_DIR.mkdir(parents=True, exist_ok=True)
    (netns.STATE_DIR / f"{dead.token}.lock").write_text(f'{{"work_dir": "{tmp_path / "w"}"}}')
    (tmp_path / "w").mkdir()
    ns = dead.namespace("n1")
    netns.create_namespace(ns)
    netns.run(["ip", "link", "add", dead.bridge, "type", "bridge"])
    netns.attach(ns, dead.bridge, dead.veth(1), ipaddress.IPv4Interface("10.213.255.1/24"))
    orphan = subprocess.Popen(
        netns.exec_argv(ns, ["sleep", "300"]), stdin=subprocess.DEVNULL, start_new_session=True
    )
    # A live mesh owner: its lock is held, so the sweep must leave its bridge alone.
    live = netns.MeshLease(tmp_path)
    try:
        live.claim_bridge()
        removed = netns.sweep_leftovers()
        assert {ns, dead.veth(1), dead.bridge, str(tmp_path / "w")} <= set(removed)
        assert orphan.wait(timeout=10) is not None
        assert ns not in netns.list_namespaces()
        links = netns.list_links()
        assert dead.bridge not in links and dead.veth(1) not in links
        assert live.names.bridge in links
        assert not (tmp_path / "w").exists()
        assert not dead.lock_path.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        netns.delete_namespace(ns)
        netns.delete_link(dead.bridge)
        netns.delete_link(live.names.bridge)
        live.release()


def _objects_of(token: str) -> list[str]:
    return [
        n for n in [*netns.list_namespaces(), *netns.list_links()] if netns.token_of(n) == token
    ]


def test_a_failed_start_tears_down_what_it_made() -> None:
    # The registry listening on an address the node does not have (TEST-NET-1, never
    # dialled: the bind fails at once): discovery starts first, so start-up fails late, after
    # the namespace, containerd and discovery exist. (Two services on one port no longer get
    # this far: the config loader refuses that combination.)
    m = Mesh(1, overrides={"registry": {"host": "192.0.2.1"}})
    with pytest.raises(MeshError, match="n1/registry exited"):
        m.start()
    assert not _objects_of(m.token)
    assert m.lease is None


CRASHING_RUN = """
import sys, time
from tests.harness.mesh import Mesh
m = Mesh(1, services=["registry"]).start()
n = m.nodes[0]
print(m.token, m.work_dir, n.containerd.pid, n.services["registry"].pid, flush=True)
time.sleep(600)  # alive, mesh and all, until the test kills it: that kill is the crash
"""


def test_a_killed_run_leaves_nothing_running_and_the_sweep_removes_its_debris() -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUN],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert run.stdout is not None
        token, work, *pid_texts = run.stdout.readline().split()
    finally:
        run.kill()  # no teardown, no atexit: a crash
        run.wait()
    pids = [int(p) for p in pid_texts]
    assert _objects_of(token)
    # The kernel ends the children of the dead run (PR_SET_PDEATHSIG)...
    assert eventually(lambda: not any(_alive(p) for p in pids))
    # ...and the next run's sweep removes its namespace, links and files.
    netns.sweep_leftovers()
    assert not _objects_of(token)
    assert not Path(work).exists()
    assert not netns.MeshNames(token).lock_path.exists()


def test_cpu_cap_holds_every_process_of_a_node_and_counts_its_cpu(
    mesh_factory: MeshFactory,
) -> None:
    m = mesh_factory(1)
    (node,) = m.nodes
    group = m.cap_cpu(0.5)[node.name]
    assert group.quota_cpus() == 0.5
    members = set(group.pids())
    service_pids = {s.pid for s in node.services.values()}
    assert node.containerd.pid in members
    assert service_pids <= members
    before = group.cpu_seconds()
    for _ in range(20):
        assert node.registry_get("/v2/")[0] == 200
    assert group.cpu_seconds() > before
    # A restarted service is a child of the test, not of the node: it joins on regroup().
    node.stop_service("registry")
    node.start_service("registry")
    assert node.services["registry"].pid not in group.pids()
    m.regroup()
    assert node.services["registry"].pid in group.pids()
    dirs = list(group.dirs)
    m.close()
    assert not [d for d in dirs if d.exists()]
