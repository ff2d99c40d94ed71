"""`peermirror demo --once`: three real nodes on loopback, an image seeded on node 1 is pulled
through node 3's registry, every item is reported as served by node 1 and verified, and no
process is left behind."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from services.cli.demo_mesh import ports_in_use
from services.cli.demo_plan import DEMO_IMAGE, PORT_STRIDE, PORTS_PER_NODE, plan_mesh
from services.cli.demo_pull import verify_layout

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES = 3
# Generous: nine services start on two shared cores; only there so a hang fails the test.
DEMO_TIMEOUT_S = 400
ROW = re.compile(r"^  (manifest|index|config|layer)\s+(sha256:[0-9a-f]{12})\s+.*?  (\S.*?)  (\S+)$")


def free_base_port(tmp_path: Path) -> int:
    """A base port whose whole plan is free right now. Random, so parallel runs rarely meet, and
    below the kernel's ephemeral range, where other tests' port-0 binds and outgoing connections
    could take a port between this check and the services' binds."""
    low, _high = (
        int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    )
    top = min(low, 60000) - PORTS_PER_NODE * PORT_STRIDE - NODES
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, top)
        ports = [p for n in plan_mesh(NODES, base, tmp_path) for p in n.ports]
        if not ports_in_use(ports):
            return base
    raise AssertionError("no free port range found")


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of live processes whose command line contains `text`."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def run_demo(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    workdir = tmp_path / "mesh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERMIRROR_")}
    argv = [
        sys.executable,
        "-m",
        "services.cli.main",
        "demo",
        "--once",
        "--workdir",
        str(workdir),
        "--base-port",
        str(free_base_port(tmp_path)),
        "--layers",
        "2",
        "--layer-mib",
        "1",
        *extra,
    ]
    try:
        done = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_S,
            check=False,
        )
    finally:
        # Whatever happened, no service of this mesh may survive the demo.
        left = processes_mentioning(str(workdir))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == {}, f"processes left behind: {left}"
    return done, workdir


def check_summary(done: subprocess.CompletedProcess[str], client_text: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = [ROW.match(line) for line in done.stdout.splitlines()]
    items = [m.groups() for m in rows if m is not None]
    kinds = sorted(kind for kind, _, _, _ in items)
    assert kinds == ["config", "layer", "layer", "manifest"], output
    for kind, digest, served_by, check in items:
        assert served_by == "node1", f"{kind} {digest} served by {served_by}: {output}"
        assert check == "verified", output
    assert "all 3 blobs and 1 manifest verified" in done.stdout, output
    assert "through node3's registry http://127.0.0.1:" in done.stdout, output
    assert f"with {client_text}" in done.stdout, output
    assert "demo: mesh stopped" in done.stdout, output
    # --once: the mesh is not left up waiting for Ctrl-C.
    assert "Ctrl-C" not in done.stdout, output


def check_pulled(workdir: Path, seeded: str) -> None:
    items = verify_layout(workdir / "pulled", seeded)
    assert items and all(item.verified for item in items)


def test_demo_pulls_through_node3_with_skopeo(tmp_path: Path) -> None:
    assert shutil.which("skopeo") is not None, "needs the Debian package `skopeo`"
    done, workdir = run_demo(tmp_path)
    check_summary(done, "skopeo ")
    check_pulled(workdir, DEMO_IMAGE)


def test_demo_pulls_with_the_builtin_client(tmp_path: Path) -> None:
    done, workdir = run_demo(tmp_path, "--client", "builtin")
    check_summary(done, "the built-in Python client")
    check_pulled(workdir, DEMO_IMAGE)


def test_demo_refuses_a_foreign_workdir(tmp_path: Path) -> None:
    foreign = tmp_path / "mesh"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not the demo's")
    done, _ = run_demo(tmp_path)
    assert done.returncode == 1
    assert "not empty and was not made by `peermirror demo`" in done.stderr
    assert (foreign / "precious.txt").read_text() == "not the demo's"
