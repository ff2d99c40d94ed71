"""K3s static pod manifests (deploy/k3s/*.yaml) turned into OCI runtime specs for `ctr run`.

No kubelet runs on the test machines, so the deploy test does what kubelet would with each
container of a manifest: the same image, the manifest's command and args on top of the image's
entrypoint, its mounts (hostPath binds, memory emptyDirs), its security context (user, dropped
capabilities, no privilege escalation, read-only root), its memory limit and the host's network
namespace. Everything here is pure: manifests and an image config in, a spec dict out.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CAPABILITY_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")
_QUANTITY = re.compile(r"^(?P<n>[0-9]+)(?P<unit>Ki|Mi|Gi|k|M|G)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


class PodSpecError(ValueError):
    """A manifest uses something this runner does not do (named in the message)."""


@dataclass(frozen=True)
class Volume:
    name: str
    host_path: str | None = None
    host_path_type: str = ""
    memory: bool = False
    size_limit: int | None = None


@dataclass(frozen=True)
class Mount:
    volume: Volume
    container_path: str
    read_only: bool


@dataclass(frozen=True)
class Container:
    pod: str
    name: str
    image: str
    command: tuple[str, ...] | None
    args: tuple[str, ...] | None
    run_as_user: int | None
    run_as_group: int | None
    read_only_root: bool
    allow_privilege_escalation: bool
    drop: tuple[str, ...]
    add: tuple[str, ...]
    memory_limit: int | None
    mounts: tuple[Mount, ...]
    host_network: bool
    readiness: tuple[str, ...] | None
    liveness: tuple[str, ...] | None
    grace_period: float


def quantity(text: str | int) -> int:
    """A Kubernetes quantity (`128Mi`, `16Mi`, `1G`) in bytes."""
    match = _QUANTITY.match(str(text))
    if match is None:
        raise PodSpecError(f"unsupported quantity {text!r}")
    return int(match.group("n")) * _UNITS[match.group("unit")]


def _volume(data: Mapping[str, Any]) -> Volume:
    name = str(data["name"])
    if "hostPath" in data:
        host = data["hostPath"]
        return Volume(name, host_path=str(host["path"]), host_path_type=str(host.get("type", "")))
    if "emptyDir" in data:
        empty = data["emptyDir"] or {}
        limit = empty.get("sizeLimit")
        return Volume(
            name,
            memory=empty.get("medium") == "Memory",
            size_limit=quantity(limit) if limit is not None else None,
        )
    raise PodSpecError(f"volume {name!r}: only hostPath and emptyDir are supported")


def _exec_probe(probe: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    if probe is None:
        return None
    if "exec" not in probe:
        raise PodSpecError(f"only exec probes are supported, got {sorted(probe)}")
    return tuple(str(a) for a in probe["exec"]["command"])


def containers(pod: Mapping[str, Any]) -> list[Container]:
    """Every container of a Pod manifest, its volume mounts resolved to their volumes."""
    if pod.get("kind") != "Pod":
        raise PodSpecError(f"not a Pod: {pod.get('kind')!r}")
    spec = pod["spec"]
    volumes = {v.name: v for v in (_volume(d) for d in spec.get("volumes", []))}
    out = []
    for c in spec["containers"]:
        security = c.get("securityContext", {})
        caps = security.get("capabilities", {})
        mounts = []
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                raise PodSpecError(f"{c['name']}: mount of undeclared volume {m['name']!r}")
            mounts.append(
                Mount(volumes[m["name"]], str(m["mountPath"]), bool(m.get("readOnly", False)))
            )
        limit = c.get("resources", {}).get("limits", {}).get("memory")
        out.append(
            Container(
                pod=str(pod["metadata"]["name"]),
                name=str(c["name"]),
                image=str(c["image"]),
                command=tuple(c["command"]) if "command" in c else None,
                args=tuple(str(a) for a in c["args"]) if "args" in c else None,
                run_as_user=security.get("runAsUser"),
                run_as_group=security.get("runAsGroup"),
                read_only_root=bool(security.get("readOnlyRootFilesystem", False)),
                allow_privilege_escalation=bool(security.get("allowPrivilegeEscalation", True)),
                drop=tuple(caps.get("drop", [])),
                add=tuple(caps.get("add", [])),
                memory_limit=quantity(limit) if limit is not None else None,
                mounts=tuple(mounts),
                host_network=bool(spec.get("hostNetwork", False)),
                readiness=_exec_probe(c.get("readinessProbe")),
                liveness=_exec_probe(c.get("livenessProbe")),
                # Kubernetes' default when the pod does not say.
                grace_period=float(spec.get("terminationGracePeriodSeconds", 30)),
            )
        )
    return out


def image_reference(image: str) -> str:
    """The full reference kubelet asks containerd for (`peermirror:0.1.0` ->
    `docker.io/library/peermirror:0.1.0`), by Docker's normalization rules."""
    first, _, rest = image.partition("/")
    if not rest:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def process_args(
    container: Container, entrypoint: Sequence[str] | None, cmd: Sequence[str] | None
) -> list[str]:
    """Kubernetes' rule: `command` replaces the image's ENTRYPOINT, `args` its CMD (and a
    `command` alone drops the CMD)."""
    if container.command is not None:
        return [*container.command, *(container.args or ())]
    return [*(entrypoint or ()), *(container.args if container.args is not None else cmd or ())]


def _capabilities(default: Sequence[str], container: Container) -> list[str]:
    drop = {f"CAP_{c}" if not c.startswith("CAP_") else c for c in container.drop}
    add = [f"CAP_{c}" if not c.startswith("CAP_") else c for c in container.add]
    kept = [] if "CAP_ALL" in drop else [c for c in default if c not in drop]
    return [*kept, *(c for c in add if c not in kept)]


def oci_spec(
    default: Mapping[str, Any],
    container: Container,
    *,
    image_config: Mapping[str, Any],
    rootfs: str,
    cgroups_path: str,
    netns_path: str,
    host_path: Callable[[Volume], str],
) -> dict[str, Any]:
    """The OCI runtime spec kubelet's CRI call would give `container`, built on `default`
    (`ctr oci spec`). `image_config` is the image's config (`Entrypoint`, `Cmd`, `Env`,
    `WorkingDir`, `User`); `host_path` says where on this machine a hostPath volume lives."""
    spec: dict[str, Any] = copy.deepcopy(dict(default))
    process = spec["process"]
    process["args"] = process_args(
        container, image_config.get("Entrypoint"), image_config.get("Cmd")
    )
    process["env"] = list(image_config.get("Env") or [])
    process["cwd"] = image_config.get("WorkingDir") or "/"
    uid, gid = _image_user(image_config.get("User") or "")
    if container.run_as_user is not None:
        uid = container.run_as_user
        if container.run_as_group is None:
            # containerd takes the gid from the image's /etc/passwd then: root's is 0.
            if uid != 0:
                raise PodSpecError(f"{container.name}: runAsUser {uid} needs runAsGroup here")
            gid = 0
    if container.run_as_group is not None:
        gid = container.run_as_group
    process["user"] = {"uid": uid, "gid": gid}
    caps = _capabilities(process["capabilities"]["bounding"], container)
    process["capabilities"] = {name: list(caps) for name in CAPABILITY_SETS}
    process["noNewPrivileges"] = not container.allow_privilege_escalation
    spec["root"] = {"path": rootfs, "readonly": container.read_only_root}
    for mount in container.mounts:
        spec["mounts"].append(_mount(mount, host_path))
    linux = spec["linux"]
    linux["cgroupsPath"] = cgroups_path
    namespaces = [ns for ns in linux["namespaces"] if ns["type"] not in ("network", "uts")]
    if container.host_network:
        # hostNetwork: the node's network and hostname, as kubelet gives such pods.
        namespaces.append({"type": "network", "path": netns_path})
    else:
        raise PodSpecError(f"{container.name}: only hostNetwork pods are supported")
    linux["namespaces"] = namespaces
    spec.pop("hostname", None)
    if container.memory_limit is not None:
        linux.setdefault("resources", {})["memory"] = {"limit": container.memory_limit}
    return spec


def _image_user(user: str) -> tuple[int, int]:
    """uid and gid of a numeric image USER (`65532:65532`, `65532`, empty = root)."""
    if not user:
        return 0, 0
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise PodSpecError(f"image USER must be numeric, got {user!r}")
    return int(uid), int(gid or uid)


def _mount(mount: Mount, host_path: Callable[[Volume], str]) -> dict[str, Any]:
    volume = mount.volume
    if volume.host_path is not None:
        options = ["rbind", "ro" if mount.read_only else "rw"]
        return {
            "destination": mount.container_path,
            "type": "bind",
            "source": host_path(volume),
            "options": options,
        }
    if volume.memory:
        options = ["nosuid", "nodev", "mode=1777"]
        if volume.size_limit is not None:
            options.append(f"size={volume.size_limit}")
        return {
            "destination": mount.container_path,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": options,
        }
    raise PodSpecError(f"volume {volume.name!r}: only memory emptyDirs are supported")
