"""A local Debian base image with python3, to build deploy/Dockerfile where nothing can be pulled.

`debootstrap --variant=minbase` builds the root filesystem from the Debian mirror apt already
uses; the tarball is cached under `CACHE_DIR`, named by a hash of everything that goes into it, so
only the first run on a machine pays for debootstrap (minutes), and `docker import` reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path("/var/cache/peermirror-test")
SUITE = "bookworm"
# python3-venv: deploy/Dockerfile installs peermirror into a venv (Debian's python3 refuses
# system-wide pip installs); passwd: useradd/groupadd for the image's service user;
# ca-certificates: pip reaches PyPI over HTTPS.
PACKAGES = ("python3", "python3-venv", "passwd", "ca-certificates")
# Bumped when the way the tarball is made changes, so old cache entries are not reused.
RECIPE = 2
# Documentation a service image never reads (as the Debian "slim" images leave it out).
DROPPED_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
# Where pip inside the image finds the CA bundle copied from the host (which may hold a proxy CA).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = [Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")]

_DEB_LINE = re.compile(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s+(?P<comps>.*)$")


class BaseImageError(RuntimeError):
    """The base image could not be made (the message carries the failing command's output)."""


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_one_line_sources(text: str) -> list[AptSource]:
    """`deb URI SUITE COMPONENTS...` lines of a sources.list file."""
    found = []
    for line in text.splitlines():
        match = _DEB_LINE.match(line.split("#", 1)[0])
        if match:
            comps = tuple(match.group("comps").split())
            found.append(AptSource(match.group("uri"), (match.group("suite"),), comps))
    return found


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Stanzas of a deb822 `.sources` file that are `Types: deb` and not `Enabled: no`."""
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            found.append(
                AptSource(
                    uri,
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "").split()),
                )
            )
    return found


def debian_mirror(sources: Iterable[AptSource], suite: str = SUITE) -> str:
    """The first mirror serving `suite` main (not the security archive, which has no base)."""
    for source in sources:
        if suite in source.suites and "main" in source.components:
            return source.uri.rstrip("/")
    raise BaseImageError(f"no apt source serves {suite} main; debootstrap needs a Debian mirror")


def read_apt_sources(paths: Iterable[Path] = APT_SOURCES) -> list[AptSource]:
    """Every apt source of this machine, one-line and deb822 files alike."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources")))
        elif path.is_file():
            files.append(path)
    sources: list[AptSource] = []
    for file in files:
        text = file.read_text(errors="replace")
        parse = parse_deb822_sources if file.suffix == ".sources" else parse_one_line_sources
        sources.extend(parse(text))
    return sources


def cache_key(mirror: str, ca_bundle: bytes, suite: str = SUITE) -> str:
    """Hash of every input of the tarball: changing any makes a new cache entry."""
    recipe = {
        "recipe": RECIPE,
        "suite": suite,
        "variant": "minbase",
        "mirror": mirror,
        "packages": sorted(PACKAGES),
        "ca_bundle": hashlib.sha256(ca_bundle).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: list[str], timeout: float) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise BaseImageError(f"{' '.join(argv)} failed ({result.returncode}):\n{tail}")


def base_tarball(cache_dir: Path = CACHE_DIR) -> Path:
    """The cached root filesystem tarball, made with debootstrap when it is not there yet."""
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap not found: install the Debian package `debootstrap`")
    mirror = debian_mirror(read_apt_sources())
    ca_bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
    tarball = cache_dir / f"debian-{SUITE}-python3-{cache_key(mirror, ca_bundle)}.tar"
    if tarball.is_file():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pm-debootstrap-", dir=cache_dir) as tmp:
        root = Path(tmp) / "root"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            timeout=1200,
        )
        # apt's lists and the downloaded .debs are not part of a base image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / junk).glob("*.deb" if "archives" in junk else "*_*"):
                entry.unlink()
        for dropped in DROPPED_DIRS:
            for entry in (root / dropped).iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if ca_bundle:
            # The host's bundle: PyPI may be reached through a proxy whose CA only the host has.
            (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(ca_bundle)
        partial = Path(tmp) / "base.tar"
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
        os.replace(partial, tarball)
    # Entries of older inputs are never asked for again.
    for stale in cache_dir.glob(f"debian-{SUITE}-python3-*.tar"):
        if stale != tarball:
            stale.unlink()
    return tarball
