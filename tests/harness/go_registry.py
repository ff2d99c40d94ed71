"""The Go `docker-registry` (Debian package) on a loopback port as a mirror containerd pulls from
through hosts.toml, logging every request, with skopeo to push and `ctr` to pull through it."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import build_image
from tests.harness.service_procs import free_port

# Where containerd may fall back to in tests: nothing listens there.
DEAD_SERVER = "http://127.0.0.1:9"
START_TIMEOUT_S = 15.0


@dataclass
class MirrorRegistry:
    """A `docker-registry` serving plain http on 127.0.0.1:<port>, logging every request."""

    port: int
    log_path: Path

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request_lines(self) -> list[str]:
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if "http.request.uri=" in line
        ]


@contextlib.contextmanager
def running_registry(work: Path) -> Iterator[MirrorRegistry]:
    """Start a `docker-registry` with its storage under `work`; stopped when the block ends."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("needs the Debian package `docker-registry`", pytrace=False)
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: peermirror-test\n"
    )
    log_path = work / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"docker-registry exited: {log_path.read_text()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("docker-registry did not answer", pytrace=False)
            time.sleep(0.05)
        yield MirrorRegistry(port, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push(tmp_path: Path, registry: MirrorRegistry, repo_tag: str, named: str = "docker.io") -> str:
    """Build a synthetic image `<named>/<repo_tag>` and push it to `registry` as `repo_tag`;
    returns its digest."""
    image = build_image(tmp_path / "layout", name=f"{named}/{repo_tag}")
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{image.layout_dir}:{image.name}",
            f"docker://{registry.hostport}/{repo_tag}",
        ],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return image.target.digest


def ctr_pull(
    daemon: ContainerdDaemon, namespace: str, hosts_dir: Path, ref: str
) -> subprocess.CompletedProcess[str]:
    """`ctr images pull` of `ref` configured by the hosts.toml files under `hosts_dir`."""
    return subprocess.run(
        daemon.ctr_argv(
            ["images", "pull", "--all-platforms", "--hosts-dir", str(hosts_dir), ref], namespace
        ),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def hosts_tried(stderr: str) -> list[str]:
    """The hosts ctr reports moving on from, in order."""
    return re.findall(r'host="?([0-9.:]+)"?', stderr)
