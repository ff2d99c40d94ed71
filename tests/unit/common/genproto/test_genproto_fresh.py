"""Guards the generated protobuf package: fresh, documented, and wire-compatible with containerd."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

from services.common.genproto.containerd.events import content_pb2 as content_events_pb2
from services.common.genproto.containerd.events import image_pb2 as image_events_pb2
from services.common.genproto.containerd.services.content.v1 import content_pb2
from services.common.genproto.containerd.services.events.v1 import events_pb2
from services.common.genproto.containerd.services.images.v1 import images_pb2
from services.common.genproto.containerd.services.introspection.v1 import introspection_pb2
from services.common.genproto.containerd.services.version.v1 import version_pb2
from services.common.genproto.containerd.types import descriptor_pb2 as ctd_descriptor_pb2
from services.common.genproto.containerd.types import platform_pb2

REPO_ROOT = Path(__file__).resolve().parents[4]
PROTOS = REPO_ROOT / "protos"
COMMITTED = REPO_ROOT / "services" / "common" / "genproto"

Generate = Callable[[Path, Path], list[str]]
DiffTrees = Callable[[Path, Path], list[str]]


def _load_generator() -> tuple[Generate, DiffTrees]:
    # protos/generate.py is a script, not part of the installed package; load it by path.
    spec = importlib.util.spec_from_file_location("_peermirror_generate", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(Generate, module.generate), cast(DiffTrees, module.diff_trees)


generate, diff_trees = _load_generator()


def test_committed_genproto_matches_a_fresh_generation(tmp_path: Path) -> None:
    fresh = tmp_path / "genproto"
    generate(PROTOS, fresh)
    assert diff_trees(fresh, COMMITTED) == [], "services/common/genproto is stale: run make protos"


def test_edited_proto_without_regeneration_is_reported(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTOS, protos, ignore=shutil.ignore_patterns("__pycache__"))
    pinner = protos / "peermirror" / "pinner" / "v1" / "pinner.proto"
    text = pinner.read_text(encoding="utf-8")
    anchor = "message UnpinRequest {\n"
    assert anchor in text
    pinner.write_text(
        text.replace(anchor, anchor + "  // Added by the staleness test.\n  bool force = 99;\n"),
        encoding="utf-8",
    )
    fresh = tmp_path / "genproto"
    generate(protos, fresh)

    problems = diff_trees(fresh, COMMITTED)

    assert "content differs: peermirror/pinner/v1/pinner_pb2.py" in problems
    assert "content differs: peermirror/pinner/v1/pinner_pb2.pyi" in problems
    assert all("pinner/v1/pinner_pb2" in line for line in problems), problems


def test_removed_proto_shows_up_as_missing_files(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTOS, protos, ignore=shutil.ignore_patterns("__pycache__"))
    (protos / "containerd" / "services" / "version" / "v1" / "version.proto").unlink()
    fresh = tmp_path / "genproto"
    generate(protos, fresh)

    problems = diff_trees(fresh, COMMITTED)

    assert f"only in {COMMITTED}: containerd/services/version/v1/version_pb2.py" in problems
    assert f"only in {COMMITTED}: containerd/services/version/v1/version_pb2_grpc.pyi" in problems


def test_diff_trees_ignores_bytecode_caches_and_names_each_difference(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "same.py").write_bytes(b"x = 1\n")
    (a / "pkg" / "changed.py").write_bytes(b"x = 1\n")
    (b / "pkg" / "changed.py").write_bytes(b"x = 2\n")
    (a / "pkg" / "only_a.pyi").write_bytes(b"")
    (b / "pkg" / "__pycache__").mkdir()
    (b / "pkg" / "__pycache__" / "same.cpython-311.pyc").write_bytes(b"\0")

    assert diff_trees(a, b) == [
        "content differs: pkg/changed.py",
        f"only in {a}: pkg/only_a.pyi",
    ]


def test_check_mode_exit_status_reports_staleness(tmp_path: Path) -> None:
    fake_out = tmp_path / "genproto"
    generate(PROTOS, fake_out)
    script = str(PROTOS / "generate.py")
    fresh = subprocess.run(
        [sys.executable, script, "--check", "--out", str(fake_out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    (fake_out / "containerd" / "types" / "platform_pb2.py").write_text("# edited\n")
    stale = subprocess.run(
        [sys.executable, script, "--check", "--out", str(fake_out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert stale.returncode == 1
    assert "content differs: containerd/types/platform_pb2.py" in stale.stdout


# --- wire compatibility with containerd's api/ (v1.6): full names and field numbers -------------

EXPECTED_FIELDS: list[tuple[type[Message], str, dict[str, int]]] = [
    (
        ctd_descriptor_pb2.Descriptor,
        "containerd.types.Descriptor",
        {"media_type": 1, "digest": 2, "size": 3, "annotations": 5},
    ),
    (
        platform_pb2.Platform,
        "containerd.types.Platform",
        {"os": 1, "architecture": 2, "variant": 3},
    ),
    (
        content_pb2.Info,
        "containerd.services.content.v1.Info",
        {"digest": 1, "size": 2, "created_at": 3, "updated_at": 4, "labels": 5},
    ),
    (
        content_pb2.UpdateRequest,
        "containerd.services.content.v1.UpdateRequest",
        {"info": 1, "update_mask": 2},
    ),
    (
        content_pb2.ReadContentRequest,
        "containerd.services.content.v1.ReadContentRequest",
        {"digest": 1, "offset": 2, "size": 3},
    ),
    (
        content_pb2.ReadContentResponse,
        "containerd.services.content.v1.ReadContentResponse",
        {"offset": 1, "data": 2},
    ),
    (
        content_pb2.WriteContentRequest,
        "containerd.services.content.v1.WriteContentRequest",
        {"action": 1, "ref": 2, "total": 3, "expected": 4, "offset": 5, "data": 6, "labels": 7},
    ),
    (
        content_pb2.WriteContentResponse,
        "containerd.services.content.v1.WriteContentResponse",
        {"action": 1, "started_at": 2, "updated_at": 3, "offset": 4, "total": 5, "digest": 6},
    ),
    (
        images_pb2.Image,
        "containerd.services.images.v1.Image",
        {"name": 1, "labels": 2, "target": 3, "created_at": 7, "updated_at": 8},
    ),
    (
        images_pb2.UpdateImageRequest,
        "containerd.services.images.v1.UpdateImageRequest",
        {"image": 1, "update_mask": 2},
    ),
    (
        images_pb2.DeleteImageRequest,
        "containerd.services.images.v1.DeleteImageRequest",
        {"name": 1, "sync": 2},
    ),
    (
        images_pb2.ListImagesRequest,
        "containerd.services.images.v1.ListImagesRequest",
        {"filters": 1},
    ),
    (
        events_pb2.Envelope,
        "containerd.services.events.v1.Envelope",
        {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4},
    ),
    (
        introspection_pb2.Plugin,
        "containerd.services.introspection.v1.Plugin",
        {"type": 1, "id": 2, "requires": 3, "platforms": 4, "exports": 5, "capabilities": 6},
    ),
    (
        version_pb2.VersionResponse,
        "containerd.services.version.v1.VersionResponse",
        {"version": 1, "revision": 2},
    ),
    (
        image_events_pb2.ImageCreate,
        "containerd.services.images.v1.ImageCreate",
        {"name": 1, "labels": 2},
    ),
    (
        image_events_pb2.ImageUpdate,
        "containerd.services.images.v1.ImageUpdate",
        {"name": 1, "labels": 2},
    ),
    (image_events_pb2.ImageDelete, "containerd.services.images.v1.ImageDelete", {"name": 1}),
    (content_events_pb2.ContentDelete, "containerd.events.ContentDelete", {"digest": 1}),
    (
        content_events_pb2.ContentCreate,
        "containerd.events.ContentCreate",
        {"digest": 1, "size": 2, "media_type": 3},
    ),
]


@pytest.mark.parametrize(
    ("message", "full_name", "fields"), EXPECTED_FIELDS, ids=[e[1] for e in EXPECTED_FIELDS]
)
def test_containerd_message_names_and_field_numbers(
    message: type[Message], full_name: str, fields: dict[str, int]
) -> None:
    desc = message.DESCRIPTOR
    assert desc.full_name == full_name
    assert {f.name: f.number for f in desc.fields} == fields


_STREAMING = {"unary": (False, False), "server": (False, True), "bidi": (True, True)}
# service/method under containerd.services., request, response (short names live in the
# service's package; "google.protobuf.Empty" is spelled out), streaming kind.
EXPECTED_METHODS = [
    ("content.v1.Content/Info", "InfoRequest", "InfoResponse", "unary"),
    ("content.v1.Content/Update", "UpdateRequest", "UpdateResponse", "unary"),
    ("content.v1.Content/Read", "ReadContentRequest", "ReadContentResponse", "server"),
    ("content.v1.Content/Write", "WriteContentRequest", "WriteContentResponse", "bidi"),
    ("images.v1.Images/Get", "GetImageRequest", "GetImageResponse", "unary"),
    ("images.v1.Images/List", "ListImagesRequest", "ListImagesResponse", "unary"),
    ("images.v1.Images/Create", "CreateImageRequest", "CreateImageResponse", "unary"),
    ("images.v1.Images/Update", "UpdateImageRequest", "UpdateImageResponse", "unary"),
    ("images.v1.Images/Delete", "DeleteImageRequest", "google.protobuf.Empty", "unary"),
    ("events.v1.Events/Subscribe", "SubscribeRequest", "Envelope", "server"),
    ("introspection.v1.Introspection/Plugins", "PluginsRequest", "PluginsResponse", "unary"),
    ("version.v1.Version/Version", "google.protobuf.Empty", "VersionResponse", "unary"),
]

_SERVICE_FILES: dict[str, FileDescriptor] = {
    "content.v1.Content": content_pb2.DESCRIPTOR,
    "images.v1.Images": images_pb2.DESCRIPTOR,
    "events.v1.Events": events_pb2.DESCRIPTOR,
    "introspection.v1.Introspection": introspection_pb2.DESCRIPTOR,
    "version.v1.Version": version_pb2.DESCRIPTOR,
}


@pytest.mark.parametrize(
    ("path", "request_type", "response_type", "streaming"),
    EXPECTED_METHODS,
    ids=[m[0] for m in EXPECTED_METHODS],
)
def test_containerd_method_signatures(
    path: str, request_type: str, response_type: str, streaming: str
) -> None:
    service, method = path.split("/")
    package, service_name = f"containerd.services.{service}".rsplit(".", 1)

    def qualified(name: str) -> str:
        return name if "." in name else f"{package}.{name}"

    svc = _SERVICE_FILES[service].services_by_name[service_name]
    assert svc.full_name == f"{package}.{service_name}"
    m = svc.methods_by_name[method]
    assert m.input_type.full_name == qualified(request_type)
    assert m.output_type.full_name == qualified(response_type)
    assert (m.client_streaming, m.server_streaming) == _STREAMING[streaming]


def test_write_action_values_match_containerd() -> None:
    assert dict(content_pb2.WriteAction.items()) == {"STAT": 0, "WRITE": 1, "COMMIT": 2}


def test_read_request_encodes_to_containerd_wire_bytes() -> None:
    # Hand-encoded: field 1 (LEN) "sha256:ab", field 2 (VARINT) 2, field 3 (VARINT) 3.
    expected = b"\x0a\x09sha256:ab" + b"\x10\x02" + b"\x18\x03"
    request = content_pb2.ReadContentRequest(digest="sha256:ab", offset=2, size=3)
    assert request.SerializeToString() == expected


def test_image_event_payload_decodes_from_containerd_type_url() -> None:
    # containerd packs events with a bare type URL (no "type.googleapis.com/" prefix).
    payload = image_events_pb2.ImageCreate(name="docker.io/library/a:1").SerializeToString()
    envelope = events_pb2.Envelope(topic="/images/create", namespace="k8s.io")
    envelope.event.type_url = "containerd.services.images.v1.ImageCreate"
    envelope.event.value = payload
    decoded = events_pb2.Envelope.FromString(envelope.SerializeToString())
    assert decoded.event.type_url == image_events_pb2.ImageCreate.DESCRIPTOR.full_name
    assert image_events_pb2.ImageCreate.FromString(decoded.event.value).name == (
        "docker.io/library/a:1"
    )


# --- every contract element carries a doc comment ---------------------------------------------

# FileDescriptorProto field numbers used in SourceCodeInfo paths.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_M_FIELD, _M_NESTED, _M_ENUM = 2, 3, 4
_E_VALUE, _S_METHOD = 2, 2


def _source_descriptors(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "set.pb"
    files = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    import grpc_tools

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _elements(
    proto: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[tuple[int, ...], str]]:
    """(source path, readable name) of every message, field, enum, value, service and rpc."""

    def enum(
        path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str
    ) -> Iterator[tuple[tuple[int, ...], str]]:
        yield path, f"{prefix}{e.name}"
        for i, v in enumerate(e.value):
            yield (*path, _E_VALUE, i), f"{prefix}{e.name}.{v.name}"

    def message(
        path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str
    ) -> Iterator[tuple[tuple[int, ...], str]]:
        if m.options.map_entry:  # synthesized for map<> fields, has no source text
            return
        yield path, f"{prefix}{m.name}"
        for i, f in enumerate(m.field):
            yield (*path, _M_FIELD, i), f"{prefix}{m.name}.{f.name}"
        for i, n in enumerate(m.nested_type):
            yield from message((*path, _M_NESTED, i), n, f"{prefix}{m.name}.")
        for i, e in enumerate(m.enum_type):
            yield from enum((*path, _M_ENUM, i), e, f"{prefix}{m.name}.")

    for i, m in enumerate(proto.message_type):
        yield from message((_MESSAGE, i), m, "")
    for i, e in enumerate(proto.enum_type):
        yield from enum((_ENUM, i), e, "")
    for i, s in enumerate(proto.service):
        yield (_SERVICE, i), s.name
        for j, rpc in enumerate(s.method):
            yield (_SERVICE, i, _S_METHOD, j), f"{s.name}.{rpc.name}"


def test_every_message_field_enum_service_and_rpc_is_documented(tmp_path: Path) -> None:
    undocumented: list[str] = []
    for proto in _source_descriptors(tmp_path).file:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() or loc.trailing_comments.strip()
            for loc in proto.source_code_info.location
        }
        undocumented += [
            f"{proto.name}: {name}" for path, name in _elements(proto) if not comments.get(path)
        ]
    assert undocumented == []


def test_our_contracts_use_versioned_packages() -> None:
    from services.common.genproto.peermirror.discovery.v1 import local_pb2, peer_pb2
    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2
    from services.common.genproto.peermirror.registry.v1 import introspection_pb2 as reg_pb2

    services = {
        (f.package, s.full_name)
        for f in (
            peer_pb2.DESCRIPTOR,
            local_pb2.DESCRIPTOR,
            pinner_pb2.DESCRIPTOR,
            reg_pb2.DESCRIPTOR,
        )
        for s in f.services_by_name.values()
    }
    assert services == {
        ("peermirror.discovery.v1", "peermirror.discovery.v1.Peer"),
        ("peermirror.discovery.v1", "peermirror.discovery.v1.LocalDiscovery"),
        ("peermirror.pinner.v1", "peermirror.pinner.v1.Pinner"),
        ("peermirror.registry.v1", "peermirror.registry.v1.RegistryIntrospection"),
    }
