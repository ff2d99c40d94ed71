"""Network namespaces, a bridge and veth pairs for multi-node tests, built with iproute2 only.

Everything this module creates is named after a random per-mesh token (`pmm-<token>-<label>`
namespaces, `pmb-<token>` bridges, `pmv-<token>-<n>` veths) and addressed inside a private /24
picked from `POOL` that no route of the host uses. The owning process holds an exclusive `flock`
on `STATE_DIR/<token>.lock` for the token's whole life, so `sweep_leftovers()` can tell a crashed
run's debris (lock free) from a mesh another test process is using right now (lock held).

Naming and address arithmetic are pure functions; the rest shells out to `ip` and `iptables`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.wait import eventually

# 10.213/16 is not used by Docker, K3s (10.42/16, 10.43/16), Kubernetes' usual 10.96/12 service
# range or common home routers; each mesh takes one /24 of it that the host routes nowhere.
POOL = ipaddress.IPv4Network("10.213.0.0/16")
SUBNET_PREFIX = 24
# The bridge's own address in each subnet: lets the test process (root namespace) reach nodes.
BRIDGE_HOST = 254

NS_PREFIX = "pmm-"
BRIDGE_PREFIX = "pmb-"
VETH_PREFIX = "pmv-"
# Interface name inside every namespace (the peer end of its veth).
INNER_IFACE = "eth0"
TOKEN_CHARS = 6
# Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
IFNAME_MAX = 15

STATE_DIR = Path("/run/peermirror-mesh")
_ALLOC_LOCK = "alloc.lock"

_TOKEN_RE = f"[0-9a-f]{{{TOKEN_CHARS}}}"
_NS_RE = re.compile(rf"^{NS_PREFIX}(?P<token>{_TOKEN_RE})-(?P<label>[a-z0-9-]+)$")
_BRIDGE_RE = re.compile(rf"^{BRIDGE_PREFIX}(?P<token>{_TOKEN_RE})$")
_VETH_RE = re.compile(rf"^{VETH_PREFIX}(?P<token>{_TOKEN_RE})-(?P<index>[0-9]+)$")
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")

# Comment on every iptables rule `isolate()` adds, so `unisolate()` deletes exactly those.
ISOLATE_COMMENT = "peermirror-mesh-isolate"
# Comment on the host FORWARD rule each bridge gets, so teardown and sweeps find exactly ours.
FORWARD_COMMENT = "peermirror-mesh-forward"


class NetnsError(RuntimeError):
    """An `ip`/`iptables` command failed; the message carries the command and its stderr."""


# --- pure naming and addressing ----------------------------------------------------------------


def new_token() -> str:
    """A random token naming one mesh's namespaces, bridge and veths."""
    return secrets.token_hex(TOKEN_CHARS // 2)


@dataclass(frozen=True)
class MeshNames:
    """Every kernel object name of one mesh, derived from its token."""

    token: str

    def __post_init__(self) -> None:
        if not re.fullmatch(_TOKEN_RE, self.token):
            raise ValueError(f"token must be {TOKEN_CHARS} lowercase hex digits: {self.token!r}")

    @property
    def bridge(self) -> str:
        return f"{BRIDGE_PREFIX}{self.token}"

    def namespace(self, label: str) -> str:
        """Namespace of the host called `label` (e.g. `n1`, `upstream`)."""
        if not _LABEL_RE.match(label):
            raise ValueError(f"host label must be lowercase letters, digits and dashes: {label!r}")
        return f"{NS_PREFIX}{self.token}-{label}"

    def veth(self, index: int) -> str:
        """Root-namespace end of the veth of the host with address number `index`."""
        name = f"{VETH_PREFIX}{self.token}-{index}"
        if len(name) > IFNAME_MAX:
            raise ValueError(f"interface name too long: {name!r}")
        return name

    @property
    def lock_path(self) -> Path:
        return STATE_DIR / f"{self.token}.lock"


def token_of(name: str) -> str | None:
    """The mesh token in a namespace, bridge or veth name this module makes; None otherwise."""
    for pattern in (_NS_RE, _BRIDGE_RE, _VETH_RE):
        match = pattern.match(name)
        if match:
            return match.group("token")
    return None


def pick_subnet(
    used: Iterable[ipaddress.IPv4Network],
    pool: ipaddress.IPv4Network = POOL,
    prefixlen: int = SUBNET_PREFIX,
) -> ipaddress.IPv4Network:
    """The first /`prefixlen` of `pool` overlapping none of `used`; ValueError when all are."""
    taken = list(used)
    for candidate in pool.subnets(new_prefix=prefixlen):
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise ValueError(f"every /{prefixlen} of {pool} is in use")


def host_address(subnet: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Interface:
    """Address number `index` of `subnet` with its prefix (`10.213.4.3/24` for index 3)."""
    if not 1 <= index < subnet.num_addresses - 1:
        raise ValueError(f"host index {index} outside {subnet}")
    return ipaddress.IPv4Interface(f"{subnet.network_address + index}/{subnet.prefixlen}")


def parse_networks(ip_json: str) -> list[ipaddress.IPv4Network]:
    """IPv4 networks named in `ip -j -4 route show table all` or `ip -j -4 addr` output."""
    networks: list[ipaddress.IPv4Network] = []
    for entry in json.loads(ip_json or "[]"):
        dst = entry.get("dst")
        if isinstance(dst, str) and dst not in ("default", "multicast", "broadcast"):
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.IPv4Network(dst, strict=False))
        for info in entry.get("addr_info", []):
            local, plen = info.get("local"), info.get("prefixlen")
            if isinstance(local, str) and isinstance(plen, int):
                networks.append(ipaddress.IPv4Network(f"{local}/{plen}", strict=False))
    return networks


def isolate_rules(iface: str = INNER_IFACE) -> list[list[str]]:
    """iptables rule specs (without -A/-D) that drop all of a namespace's traffic on `iface`."""
    comment = ["-m", "comment", "--comment", ISOLATE_COMMENT]
    return [
        ["INPUT", "-i", iface, *comment, "-j", "DROP"],
        ["OUTPUT", "-o", iface, *comment, "-j", "DROP"],
    ]


def forward_rule(bridge: str) -> list[str]:
    """Host iptables rule spec (without -I/-D) letting traffic between ports of `bridge` through.

    Docker sets the FORWARD policy to DROP and turns on bridge netfilter, after which frames
    between two namespaces on one bridge pass through FORWARD and are dropped: the mesh's nodes
    would never reach each other while a Docker daemon runs.
    """
    return [
        "FORWARD",
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        FORWARD_COMMENT,
        "-j",
        "ACCEPT",
    ]


def forward_rule_bridges(iptables_save: str) -> list[str]:
    """Bridges named by our FORWARD rules in `iptables -S FORWARD` output."""
    found = []
    for line in iptables_save.splitlines():
        if FORWARD_COMMENT not in line:
            continue
        match = re.search(r"(?:^|\s)-i (\S+)", line)
        if match:
            found.append(match.group(1))
    return found


# --- running commands --------------------------------------------------------------------------


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run a host command; returns stdout, raises NetnsError (with stderr) when it fails."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
    )
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def exec_argv(namespace: str, argv: Sequence[str]) -> list[str]:
    """`argv` run inside `namespace` (`ip netns exec` execs it, so the pid is the command's)."""
    return ["ip", "netns", "exec", namespace, *argv]


def require_tools() -> None:
    """Fail loudly (never skip) when the harness cannot work on this machine."""
    if os.geteuid() != 0:
        raise NetnsError("the netns mesh needs root (network namespaces, veths, iptables)")
    for tool in ("ip", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            raise NetnsError(f"{tool!r} not found on PATH (Debian: iproute2, iptables, util-linux)")


# --- kernel objects ----------------------------------------------------------------------------


def list_namespaces() -> list[str]:
    """Names of every named network namespace (`ip netns list`)."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def list_links() -> list[str]:
    """Names of every interface in the root namespace."""
    return [str(entry["ifname"]) for entry in json.loads(run(["ip", "-j", "link", "show"]) or "[]")]


def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks the root namespace has routes or addresses in."""
    routes = run(["ip", "-j", "-4", "route", "show", "table", "all"])
    addresses = run(["ip", "-j", "-4", "addr", "show"])
    return parse_networks(routes) + parse_networks(addresses)


def namespace_pids(namespace: str) -> list[int]:
    """Processes running inside `namespace`."""
    out = run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace_processes(namespace: str, grace: float = 5.0) -> None:
    """SIGTERM every process in `namespace`, SIGKILL whatever is left after `grace` seconds."""
    pids = namespace_pids(namespace)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if eventually(lambda: not namespace_pids(namespace), grace, interval=0.05):
            return
        pids = namespace_pids(namespace)


def create_bridge(name: str, address: ipaddress.IPv4Interface) -> None:
    """A bridge in the root namespace with `address`, up; spanning tree off, so ports forward
    at once."""
    run(["ip", "link", "add", name, "type", "bridge", "stp_state", "0"])
    # No IPv6 on our links: nothing but the addresses we give should appear on them.
    _disable_ipv6(name)
    run(["ip", "addr", "add", str(address), "dev", name])
    # First in the chain: ahead of any DROP a firewall or Docker puts there, now or later.
    run(["iptables", "-w", "-I", *forward_rule(name)])
    run(["ip", "link", "set", name, "up"])


def create_namespace(namespace: str) -> None:
    """A new network namespace with its loopback up."""
    run(["ip", "netns", "add", namespace])
    run(exec_argv(namespace, ["ip", "link", "set", "lo", "up"]))


def attach(namespace: str, bridge: str, veth: str, address: ipaddress.IPv4Interface) -> None:
    """Give `namespace` an `eth0` with `address`, wired by a veth pair to `bridge`."""
    run(
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", INNER_IFACE, "netns", namespace]
    )
    _disable_ipv6(veth)
    run(["ip", "link", "set", veth, "master", bridge])
    run(["ip", "link", "set", veth, "up"])
    run(exec_argv(namespace, ["sysctl", "-qw", f"net.ipv6.conf.{INNER_IFACE}.disable_ipv6=1"]))
    run(exec_argv(namespace, ["ip", "addr", "add", str(address), "dev", INNER_IFACE]))
    run(exec_argv(namespace, ["ip", "link", "set", INNER_IFACE, "up"]))


def _disable_ipv6(iface: str) -> None:
    path = Path(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6")
    if path.exists():
        path.write_text("1\n")


def delete_namespace(namespace: str) -> None:
    """Kill what runs in `namespace`, then delete it (its veth end and iptables rules go too)."""
    if namespace not in list_namespaces():
        return
    kill_namespace_processes(namespace)
    run(["ip", "netns", "delete", namespace], check=False)


def delete_link(name: str) -> None:
    """Delete interface `name` from the root namespace if it exists (deleting one veth end
    deletes the pair); a mesh bridge's FORWARD rule goes with it."""
    run(["ip", "link", "delete", name], check=False)
    if _BRIDGE_RE.match(name):
        remove_forward_rule(name)


def remove_forward_rule(bridge: str) -> None:
    """Delete every copy of `bridge`'s FORWARD rule from the host (none left is fine)."""
    while bridge in forward_rule_bridges(run(["iptables", "-w", "-S", "FORWARD"])):
        run(["iptables", "-w", "-D", *forward_rule(bridge)])


def isolate(namespace: str) -> None:
    """Drop every packet in or out of `namespace`'s eth0 (a node that vanished from the network).

    The rules live in the namespace's own tables: nothing is added to the host's firewall, and
    deleting the namespace deletes them.
    """
    for rule in isolate_rules():
        if not _rule_present(namespace, rule):
            # First in the chain, so no ACCEPT rule a test added can let traffic through.
            run(exec_argv(namespace, ["iptables", "-I", *rule]))


def unisolate(namespace: str) -> None:
    """Remove the rules `isolate()` added; a no-op when there are none."""
    for rule in isolate_rules():
        while _rule_present(namespace, rule):
            run(exec_argv(namespace, ["iptables", "-D", *rule]))


def shaping_argv(
    mbit: float, iface: str = INNER_IFACE, burst: int | None = None, latency_ms: int = 100
) -> list[str]:
    """tc command (to run in a namespace) holding `iface`'s egress to `mbit` Mbit/s: a token
    bucket whose burst is by default a hundredth of a second at that rate (at least 64 KiB), so
    a TCP stream moves at the rate rather than in bursts above it; packets wait at most
    `latency_ms` in its queue."""
    if not mbit > 0:
        raise ValueError(f"link rate must be positive, got {mbit!r} Mbit/s")
    if burst is None:
        burst = max(64 * 1024, int(mbit * 1e6 / 8 / 100))
    return [
        "tc", "qdisc", "replace", "dev", iface, "root", "tbf",
        "rate", f"{round(mbit * 1e6)}bit", "burst", str(burst), "latency", f"{latency_ms}ms",
    ]  # fmt: skip


def limit_egress(
    namespace: str, mbit: float, burst: int | None = None, latency_ms: int = 100
) -> None:
    """Hold what `namespace` sends on its eth0 to `mbit` Mbit/s (see shaping_argv), e.g. an
    upstream registry behind a cluster's internet link; deleting the namespace deletes it."""
    run(exec_argv(namespace, shaping_argv(mbit, burst=burst, latency_ms=latency_ms)))


def unlimit_egress(namespace: str) -> None:
    """Remove what limit_egress installed (a no-op when nothing is)."""
    run(exec_argv(namespace, ["tc", "qdisc", "del", "dev", INNER_IFACE, "root"]), check=False)


def egress_qdisc(namespace: str) -> str:
    """`tc qdisc show` of the namespace's eth0 (what limit_egress installed)."""
    return run(exec_argv(namespace, ["tc", "qdisc", "show", "dev", INNER_IFACE]))


def _rule_present(namespace: str, rule: Sequence[str]) -> bool:
    result = subprocess.run(
        exec_argv(namespace, ["iptables", "-C", *rule]),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )
    return result.returncode == 0


# --- ownership and leftovers -------------------------------------------------------------------


@contextlib.contextmanager
def _alloc_lock() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / _ALLOC_LOCK).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class MeshLease:
    """Ownership of one token and its subnet, held (by flock) until `release()`.

    Creating one takes a fresh token, locks it, and picks a free subnet; the bridge that claims the
    subnet must be created through `claim_bridge()` so two processes never pick the same one.
    """

    def __init__(self, parent_dir: Path | None = None) -> None:
        require_tools()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.names = MeshNames(new_token())
        # Locked before it gets its real name, so a concurrent sweep never sees it unlocked.
        tmp = STATE_DIR / f".{self.token}.tmp"
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Short: unix socket paths below it must stay under 108 bytes.
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"pmm-{self.token}-", dir=parent_dir))
        # Recorded so a sweep after a crash also removes the run's temp dir.
        state = {"pid": os.getpid(), "work_dir": str(self.work_dir)}
        os.write(self._fd, json.dumps(state).encode())
        os.rename(tmp, self.names.lock_path)
        self.subnet: ipaddress.IPv4Network | None = None

    @property
    def token(self) -> str:
        return self.names.token

    def claim_bridge(self) -> ipaddress.IPv4Network:
        """Create this mesh's bridge on a subnet nothing else uses; returns the subnet."""
        with _alloc_lock():
            subnet = pick_subnet(used_networks())
            create_bridge(self.names.bridge, host_address(subnet, BRIDGE_HOST))
        self.subnet = subnet
        return subnet

    def release(self) -> None:
        """Remove the work dir, drop the lock and its file (call once every kernel object and
        process is gone)."""
        if self._fd is None:
            return
        shutil.rmtree(self.work_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.names.lock_path.unlink()
        os.close(self._fd)
        self._fd = None


def _lock_is_free(token: str) -> bool:
    """Whether no live process holds `token`'s lock (so its objects are leftovers)."""
    path = MeshNames(token).lock_path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _recorded_work_dir(token: str) -> Path | None:
    try:
        state = json.loads(MeshNames(token).lock_path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return None
    work = state.get("work_dir") if isinstance(state, dict) else None
    return Path(work) if isinstance(work, str) else None


def sweep_leftovers() -> list[str]:
    """Remove namespaces, links, lock files and temp dirs of meshes whose owner died.

    Returns the names removed. Objects of meshes whose owner still holds its lock are untouched.
    """
    require_tools()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    namespaces = list_namespaces()
    links = list_links()
    lock_tokens = [p.stem for p in STATE_DIR.glob("*.lock") if p.name != _ALLOC_LOCK]
    rule_bridges = forward_rule_bridges(run(["iptables", "-w", "-S", "FORWARD"]))
    tokens = {t for t in (token_of(n) for n in [*namespaces, *links, *rule_bridges]) if t}
    tokens.update(t for t in lock_tokens if re.fullmatch(_TOKEN_RE, t))
    removed: list[str] = []
    for token in sorted(tokens):
        if not _lock_is_free(token):
            continue
        for ns in namespaces:
            if token_of(ns) == token:
                delete_namespace(ns)
                removed.append(ns)
        for link in links:
            if token_of(link) == token and _VETH_RE.match(link):
                delete_link(link)
                removed.append(link)
        for link in links:
            if token_of(link) == token and _BRIDGE_RE.match(link):
                delete_link(link)
                removed.append(link)
        for bridge in forward_rule_bridges(run(["iptables", "-w", "-S", "FORWARD"])):
            # A rule whose bridge is already gone (a crash between the two deletions).
            if token_of(bridge) == token:
                remove_forward_rule(bridge)
                removed.append(f"FORWARD rule of {bridge}")
        work = _recorded_work_dir(token)
        if work is not None and work.is_dir():
            shutil.rmtree(work, ignore_errors=True)
            removed.append(str(work))
        with contextlib.suppress(FileNotFoundError):
            MeshNames(token).lock_path.unlink()
    return removed
