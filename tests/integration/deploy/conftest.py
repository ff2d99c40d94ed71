"""Fixtures of the deploy tests: one private dockerd and one image build for the whole package."""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.deploy.debian_base import BaseImageError, base_tarball
from tests.integration.deploy.docker_daemon import DockerDaemon, DockerError

REPO = Path(__file__).resolve().parents[3]
BUILD_TIMEOUT = 900.0
MAX_ADDED_BYTES = 150 << 20
BASE_REPOSITORY = "peermirror-test-base"


def image_name() -> str:
    """The tag docker-compose.yml and the K3s manifests run: peermirror:<project version>."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return f"peermirror:{version['version']}"


def _forward_policy() -> str:
    out = subprocess.run(
        ["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()[0]


def _docker_chains() -> list[str]:
    out = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith("-N DOCKER")]


@pytest.fixture(scope="package")
def docker() -> Iterator[DockerDaemon]:
    """A dockerd of the tests' own, stopped afterwards; the host firewall is left as found."""
    policy, chains = _forward_policy(), _docker_chains()
    try:
        daemon = DockerDaemon()
        daemon.start()
    except DockerError as exc:
        pytest.fail(f"could not start dockerd for the deploy tests: {exc}", pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()
    assert (_forward_policy(), _docker_chains()) == (policy, chains), "dockerd changed iptables"


@pytest.fixture(scope="package")
def peermirror_image(docker: DockerDaemon) -> str:
    """deploy/Dockerfile built from the local Debian base (built once, then cached)."""
    try:
        tarball = base_tarball()
    except BaseImageError as exc:
        pytest.fail(f"could not make the Debian base image: {exc}", pytrace=False)
    base = f"{BASE_REPOSITORY}:{tarball.stem.rsplit('-', 1)[1]}"
    if docker.inspect("image", base) is None:
        # Bases of older inputs, kept in the cached data root, are never used again.
        tags = docker.docker("images", "--format={{.Repository}}:{{.Tag}}", BASE_REPOSITORY).stdout
        for stale in tags.split():
            docker.docker("rmi", stale, check=False)
        # pip inside the build trusts the host's CA bundle, copied into the base (a proxy's CA).
        change = "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
        docker.docker("import", "--change", change, str(tarball), base, timeout=300)
    name = image_name()
    docker.docker(
        "build",
        # dockerd runs without a bridge: build steps (pip) use the host's network.
        "--network=host",
        f"--build-arg=BASE_IMAGE={base}",
        "--file=deploy/Dockerfile",
        f"--tag={name}",
        ".",
        cwd=REPO,
        timeout=BUILD_TIMEOUT,
    )
    # Earlier builds' images, untagged by this one, would pile up in the cached data root.
    docker.docker("image", "prune", "--force")
    built, base_info = docker.inspect("image", name), docker.inspect("image", base)
    assert built is not None and base_info is not None
    added = int(built["Size"]) - int(base_info["Size"])
    # peermirror and its pinned dependencies (grpcio, cryptography, zstandard, uvloop...) in
    # their venv: about 120 MB. A jump past this means something unwanted came in.
    assert added < MAX_ADDED_BYTES, f"the image adds {added >> 20} MiB to its base"
    return name
