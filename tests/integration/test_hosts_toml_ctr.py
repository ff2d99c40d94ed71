"""Generated hosts.toml on a real containerd: `ctr images pull --hosts-dir` goes through the mirror.

A Go `docker-registry` on a loopback port plays the mirror of docker.io. The embedded mirror is
configured on a loopback port where nothing listens, and `server` is http://127.0.0.1:9, so a pull
can only succeed through the test registry, and nothing ever leaves the machine.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.pinner.hosts_toml import HostsOptions
from services.pinner.hosts_writer import write_containerd_config
from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import build_image

pytestmark = pytest.mark.containerd

DEAD_SERVER = "http://127.0.0.1:9"
START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


@pytest.fixture
def test_registry(tmp_path: Path) -> Iterator[MirrorRegistry]:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("needs the Debian package `docker-registry`", pytrace=False)
    port = free_port()
    work = tmp_path / "registry"
    work.mkdir()
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


def push(tmp_path: Path, registry: MirrorRegistry, repo_tag: str) -> str:
    """Build a synthetic image and push it as `<registry>/<repo_tag>`; returns its digest."""
    image = build_image(tmp_path / "layout", name=f"docker.io/{repo_tag}")
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


def render(tmp_path: Path, registry: MirrorRegistry, dead_mirror_port: int) -> Path:
    reg_file = tmp_path / "registries.yaml"
    reg_file.write_text(
        "mirrors:\n"
        "  docker.io:\n"
        f"    endpoint: ['http://{registry.hostport}']\n"
        # Upstream containerd ignores rewrite tables: the file must still be accepted.
        "    rewrite: {'^nothing/(.*)': 'never/$1'}\n"
    )
    out = tmp_path / "certs.d"
    opts = HostsOptions(mirror_port=dead_mirror_port, mirror_tls=False, server_override=DEAD_SERVER)
    paths = write_containerd_config(reg_file, out, opts)
    assert out / "docker.io" / "hosts.toml" in paths
    return out


def ctr_pull(
    daemon: ContainerdDaemon, namespace: str, hosts_dir: Path, ref: str
) -> subprocess.CompletedProcess[str]:
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


def test_pull_goes_through_generated_mirror_config(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    test_registry: MirrorRegistry,
    tmp_path: Path,
) -> None:
    digest = push(tmp_path, test_registry, "library/test:1.0")
    dead_mirror = free_port()
    hosts_dir = render(tmp_path, test_registry, dead_mirror)

    result = ctr_pull(
        containerd_daemon, containerd_namespace, hosts_dir, "docker.io/library/test:1.0"
    )
    assert result.returncode == 0, result.stderr
    listing = containerd_daemon.ctr("images", "list", namespace=containerd_namespace)
    assert "docker.io/library/test:1.0" in listing and digest in listing
    # The embedded mirror (first) was tried and refused; then the test registry answered.
    assert hosts_tried(result.stderr) == [f"127.0.0.1:{dead_mirror}"]
    requests = test_registry.request_lines()
    assert any("/v2/library/test/manifests/1.0?ns=docker.io" in line for line in requests), requests


def test_server_is_tried_last(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    test_registry: MirrorRegistry,
    tmp_path: Path,
) -> None:
    dead_mirror = free_port()
    hosts_dir = render(tmp_path, test_registry, dead_mirror)

    result = ctr_pull(
        containerd_daemon, containerd_namespace, hosts_dir, "docker.io/library/absent:1.0"
    )
    assert result.returncode != 0
    # Mirror first, then the test registry (404), and the dead server last.
    assert hosts_tried(result.stderr) == [
        f"127.0.0.1:{dead_mirror}",
        test_registry.hostport,
        "127.0.0.1:9",
    ]
    assert any(
        "/v2/library/absent/manifests/1.0?ns=docker.io" in line
        for line in test_registry.request_lines()
    )
