"""A real containerd (Debian package), isolated in its own temp dir, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.harness.logs import log_tail
from tests.harness.wait import eventually

# Plugins that need kernel features or host setup we never use; disabling them keeps start-up quiet
# and independent of the machine (no devmapper pool, no zfs dataset, no btrfs root).
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

# Where CRI would fetch its sandbox image from: a loopback port where nothing listens, so nothing
# in a test can make containerd reach beyond this machine.
SANDBOX_IMAGE = "127.0.0.1:9/pause:3.6"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class ContainerdError(RuntimeError):
    """containerd could not be started, or a `ctr` command failed (message carries its output)."""


def render_config(
    *,
    root: Path,
    state: Path,
    address: Path,
    hosts_dir: Path,
    work: Path,
    snapshotter: str,
    extra: str = "",
) -> str:
    """Return a containerd 1.6 config (version 2) that keeps every path inside `work`."""
    disabled = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
    return f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{work / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{work / "cni" / "bin"}"
    conf_dir = "{work / "cni" / "conf"}"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    discard_unpacked_layers = false

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts_dir}"
{extra}"""


class ContainerdDaemon:
    """One containerd process with its own root, state, socket and registry hosts dir.

    Several can run at once: nothing is shared with the host's containerd or with each other.
    `wrap` prefixes the command line (e.g. `ip netns exec node1`) to start it inside a namespace.
    """

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        binary: str = "containerd",
        ctr_binary: str = "ctr",
        snapshotter: str = "overlayfs",
        wrap: Sequence[str] = (),
        extra_config: str = "",
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise ContainerdError(
                f"{binary!r} not found on PATH: install the Debian package `containerd`"
            )
        ctr_found = shutil.which(ctr_binary)
        if ctr_found is None:
            raise ContainerdError(
                f"{ctr_binary!r} not found on PATH: install the Debian package `containerd`"
            )
        self._binary = found
        self._ctr = ctr_found
        self._wrap = list(wrap)
        self._owns_dir = base_dir is None
        # A short prefix keeps the socket path well under the 108-byte unix socket limit.
        self.work = Path(tempfile.mkdtemp(prefix="pm-ctd-")) if base_dir is None else base_dir
        self.work.mkdir(parents=True, exist_ok=True)
        self.root = self.work / "root"
        self.state = self.work / "state"
        self.address = str(self.work / "containerd.sock")
        self.hosts_dir = self.work / "certs.d"
        self.config_path = self.work / "config.toml"
        self.log_path = self.work / "containerd.log"
        self.snapshotter = snapshotter
        for d in (self.root, self.state, self.hosts_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_config(
                root=self.root,
                state=self.state,
                address=Path(self.address),
                hosts_dir=self.hosts_dir,
                work=self.work,
                snapshotter=snapshotter,
                extra=extra_config,
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def content_root(self) -> Path:
        """Directory of the content store plugin; blobs live in `blobs/sha256/<hex>` below it."""
        return self.root / "io.containerd.content.v1.content"

    def blob_path(self, digest: str) -> Path:
        """The on-disk file of `digest` (`sha256:<hex>`) in this daemon's content store."""
        algorithm, _, encoded = digest.partition(":")
        return self.content_root / "blobs" / algorithm / encoded

    @property
    def pid(self) -> int | None:
        """Process id of the running daemon, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start containerd, return once its gRPC socket answers; raise with its log if it dies."""
        if self.running:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [*self._reaper(), *self._wrap, self._binary, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C aimed at pytest must not kill containerd before we stop it.
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()

    @staticmethod
    def _reaper() -> list[str]:
        # A test run killed before its fixtures tear down must not leave daemons behind: the
        # kernel sends containerd SIGTERM when the thread that started it dies. So start and
        # restart from a long-lived thread (the main one), not from a worker thread.
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "TERM"] if setpriv else []

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None

        def answers() -> bool:
            if proc.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with {proc.returncode} during start-up:\n" + self.log_tail()
                )
            # The socket accepts before every service is registered; `ctr version` proves gRPC.
            return self._socket_answers() and (
                self._run_ctr(["version"], namespace="default", check=False).returncode == 0
            )

        if eventually(answers, START_TIMEOUT_S, interval=0.05):
            return
        self._terminate()
        raise ContainerdError(
            f"containerd did not answer on {self.address} within {START_TIMEOUT_S}s:\n"
            + self.log_tail()
        )

    def _socket_answers(self) -> bool:
        if not os.path.exists(self.address):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.address)
            except OSError:
                return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of containerd's own log, for error messages."""
        return log_tail(self.log_path, lines)

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same root, state and socket (content and images survive)."""
        self._terminate()
        self.start()

    def kill(self) -> None:
        """Stop containerd abruptly (SIGKILL), keeping its state; `start()` brings it back."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def stop(self) -> None:
        """Stop containerd (SIGTERM, then SIGKILL) and remove everything under its work dir."""
        self._terminate()
        if self._owns_dir:
            self._unmount_below(self.work)
            shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def _unmount_below(path: Path) -> None:
        # Snapshotters may leave mounts behind when killed; rmtree must never descend into them.
        prefix = str(path.resolve()) + "/"
        mounts: list[str] = []
        with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].startswith(prefix):
                    mounts.append(fields[4])
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)

    def __enter__(self) -> ContainerdDaemon:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- ctr ----------------------------------------------------------------------------------

    def ctr_argv(self, args: Sequence[str], namespace: str) -> list[str]:
        """The full `ctr` command line for `args` against this daemon and `namespace`."""
        return [self._ctr, "--address", self.address, "--namespace", namespace, *args]

    def _run_ctr(
        self, args: Sequence[str], *, namespace: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.ctr_argv(args, namespace),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise ContainerdError(
                f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def ctr(self, *args: str, namespace: str = "k8s.io") -> str:
        """Run `ctr --address S -n NS args...` and return stdout; raise ContainerdError on failure.

        Blocks the caller: from async code whose own loop serves containerd (e.g. a registry
        under test), use `ctr_async` instead.
        """
        return self._run_ctr(args, namespace=namespace).stdout

    async def ctr_async(self, *args: str, namespace: str = "k8s.io") -> str:
        """`ctr` without blocking the event loop; returns stdout, raises ContainerdError."""
        proc = await asyncio.create_subprocess_exec(
            *self.ctr_argv(args, namespace),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise ContainerdError(
                f"ctr {' '.join(args)} failed ({proc.returncode}): {err.decode().strip()}"
            )
        return out.decode()

    @staticmethod
    def import_args(
        path: Path | str,
        *,
        base_name: str | None,
        all_platforms: bool,
        unpack: bool,
        digests: bool,
        index_name: str | None,
    ) -> list[str]:
        """Arguments of `ctr images import` for one archive (docker-save or OCI tar)."""
        args = ["images", "import"]
        if base_name:
            args += ["--base-name", base_name]
        if index_name:
            args += ["--index-name", index_name]
        if all_platforms:
            args.append("--all-platforms")
        if digests:
            args.append("--digests")
        if not unpack:
            args.append("--no-unpack")
        args.append(str(path))
        return args

    def import_archive(
        self,
        path: Path | str,
        namespace: str = "k8s.io",
        *,
        base_name: str | None = None,
        all_platforms: bool = True,
        unpack: bool = False,
        digests: bool = False,
        index_name: str | None = None,
    ) -> str:
        """Import an image archive with `ctr images import`; returns ctr's output.

        Unpacking is off by default: synthetic layers are random bytes, not file systems, and
        serving content never needs snapshots.
        """
        args = self.import_args(
            path,
            base_name=base_name,
            all_platforms=all_platforms,
            unpack=unpack,
            digests=digests,
            index_name=index_name,
        )
        return self.ctr(*args, namespace=namespace)

    async def import_archive_async(
        self,
        path: Path | str,
        namespace: str = "k8s.io",
        *,
        base_name: str | None = None,
        all_platforms: bool = True,
        unpack: bool = False,
        digests: bool = False,
        index_name: str | None = None,
    ) -> str:
        """`import_archive` without blocking the event loop."""
        args = self.import_args(
            path,
            base_name=base_name,
            all_platforms=all_platforms,
            unpack=unpack,
            digests=digests,
            index_name=index_name,
        )
        return await self.ctr_async(*args, namespace=namespace)

    def image_names(self, namespace: str = "k8s.io") -> list[str]:
        """Names of every image record in `namespace`."""
        out = self.ctr("images", "list", "--quiet", namespace=namespace)
        return [line for line in out.splitlines() if line]

    def purge_namespace(self, namespace: str) -> None:
        """Delete every image and content label set of `namespace`, then the namespace itself."""
        names = self.image_names(namespace)
        if names:
            self.ctr("images", "rm", "--sync", *names, namespace=namespace)
        digests = [
            line
            for line in self.ctr("content", "list", "--quiet", namespace=namespace).splitlines()
            if line
        ]
        if digests:
            self.ctr("content", "rm", *digests, namespace=namespace)
        self._run_ctr(["namespaces", "remove", namespace], namespace="default", check=False)
