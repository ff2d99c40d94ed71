"""Fuzzes every method of the containerd-backed Pinner API, served by a real pinner process on the
session's containerd: documented statuses only (with the field named), no hang, the process alive,
RSS bounded, and containerd's images and content exactly as before each run.

Prefetch pulls through containerd's CRI, so before a reference is sent the registry host the pinner
would pull it from gets a hosts.toml in the harness containerd's certs.d whose only server is
http://127.0.0.1:9: every pull fails at once with connection refused and nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest
import yaml
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdNotFoundError
from services.common.genproto.peermirror.pinner.v1 import pinner_pb2
from services.common.oci.grammar import GrammarError, Reference, parse_reference
from services.pinner.cri import CRI_NAMESPACE
from services.pinner.pins import PIN_LABEL, PIN_VALUE
from services.pinner.prefetch import InvalidPrefetchError, normalise_reference
from tests.fuzz.grpc_calls import Outcome, call_batch
from tests.fuzz.proto_strategies import wire_requests
from tests.fuzz.runs import fuzz_settings
from tests.harness.containerd import ContainerdDaemon
from tests.harness.fuzz_node import write_limited_config
from tests.harness.images import BuiltImage, build_image
from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    running,
    wait_serving,
)

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

CASES_PER_METHOD = 1000
# Requests per generated example, sent concurrently: also makes the pinner interleave them.
BATCH = 10
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
# The deadline of every call: a hang shows as DEADLINE_EXCEEDED, which no check allows.
CALL_TIMEOUT_S = 10.0
DEAD_SERVER = "http://127.0.0.1:9"

PLAIN = "docker.io/library/fuzz:1.0"  # present and not pinned before each run
PINNED = "docker.io/library/fuzz-pinned:1.0"  # present and pinned by hand before each run
# A label of our own on the pinned image: unpinning must leave it alone.
KEEP_LABEL = ("io.peermirror.test/fuzz", "keep")

SERVICE = pinner_pb2.DESCRIPTOR.services_by_name["Pinner"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)


# --- containerd's state --------------------------------------------------------------------------

ImageRecord = tuple[str, str, int, dict[str, str]]
ReplyT = TypeVar("ReplyT", bound=Message)


async def _images(daemon: ContainerdDaemon, namespace: str) -> dict[str, ImageRecord]:
    async with ContainerdClient(daemon.address, namespace) as client:
        return {
            image.name: (
                image.target.digest,
                image.target.media_type,
                image.target.size,
                dict(image.labels),
            )
            for image in await client.list_images()
        }


async def _set_labels(
    daemon: ContainerdDaemon, namespace: str, labels: dict[str, dict[str, str]]
) -> None:
    async with ContainerdClient(daemon.address, namespace) as client:
        for name, wanted in labels.items():
            await client.replace_image_labels(name, wanted)


async def _corrupt_blobs(
    daemon: ContainerdDaemon, namespace: str, images: list[BuiltImage]
) -> list[str]:
    """Digests of the images' blobs containerd no longer serves intact (absent or wrong bytes)."""
    bad: list[str] = []
    async with ContainerdClient(daemon.address, namespace) as client:
        for blob in {b.digest: b for image in images for b in image.blobs}.values():
            hasher = hashlib.sha256()
            try:
                async for chunk in client.read_content(blob.digest):
                    hasher.update(chunk)
            except ContainerdNotFoundError:
                bad.append(blob.digest)
                continue
            if f"sha256:{hasher.hexdigest()}" != blob.digest:
                bad.append(blob.digest)
    return bad


# --- where CRI may pull from --------------------------------------------------------------------


class DeadRoutes:
    """hosts.toml files in containerd's certs.d sending a registry host to 127.0.0.1:9 only
    (`server` set, no fallback upstream); the directories this object created go on close."""

    def __init__(self, hosts_dir: Path) -> None:
        self._hosts_dir = hosts_dir
        self._created: list[Path] = []

    def route(self, host: str) -> None:
        # Exactly as written and lowercased: whichever spelling containerd looks up is covered.
        for name in {host, host.lower()}:
            assert name and "/" not in name and name not in (".", ".."), name
            directory = self._hosts_dir / name
            if directory.exists():
                # Another test's route: it must send pulls nowhere but loopback either.
                assert DEAD_SERVER in (directory / "hosts.toml").read_text(), directory
                continue
            directory.mkdir(parents=True)
            self._created.append(directory)
            # containerd 1.6 ignores (and so pulls upstream) a hosts.toml with no [host] table.
            (directory / "hosts.toml").write_text(
                f'server = "{DEAD_SERVER}"\n\n'
                f'[host."{DEAD_SERVER}"]\n  capabilities = ["pull", "resolve"]\n',
                encoding="utf-8",
            )

    def route_prefetch(self, reference: str) -> None:
        """Route the host the pinner would pull `reference` from (nothing when it refuses it)."""
        try:
            pulled = normalise_reference(reference)
        except InvalidPrefetchError:
            return
        # What the pinner hands to CRI must parse here too, else its host could not be routed.
        self.route(parse_reference(pulled).registry)

    def close(self) -> None:
        for directory in self._created:
            shutil.rmtree(directory, ignore_errors=True)
        self._created.clear()


# --- the pinner under test -----------------------------------------------------------------------


@dataclass
class PinnerUnderTest:
    """The running pinner, its containerd namespace, the images seeded there and their state."""

    address: str
    proc: ServiceProcess
    daemon: ContainerdDaemon
    namespace: str
    images: dict[str, BuiltImage]
    routes: DeadRoutes
    before: dict[str, ImageRecord] = field(default_factory=dict)
    cri_before: set[str] = field(default_factory=set)

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def state(self) -> dict[str, ImageRecord]:
        return asyncio.run(_images(self.daemon, self.namespace))

    def restore_labels(self) -> None:
        """Put back each image's labels as they were before the run (pins the fuzz made or
        removed are undone; everything else must not have changed)."""
        now = self.state()
        changed = {
            name: record[3]
            for name, record in self.before.items()
            if name in now and now[name][3] != record[3]
        }
        asyncio.run(_set_labels(self.daemon, self.namespace, changed))


def _write_config(directory: Path, daemon: ContainerdDaemon, namespace: str) -> NodePorts:
    ports = NodePorts.pick()
    path = write_limited_config(directory, ports, {})
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["store"] = {
        "backend": "containerd",
        "containerd_address": daemon.address,
        "containerd_namespace": namespace,
    }
    # Nothing listens there: the advertiser retries quietly, the API is what is fuzzed.
    data["discovery"]["local_address"] = "127.0.0.1:9"
    data["pinner"].update({"mirror_tls": False, "containerd_flavour": "upstream"})
    (directory / "images").mkdir()
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return ports


@pytest.fixture(scope="module")
def pinner(
    tmp_path_factory: pytest.TempPathFactory, containerd_daemon: ContainerdDaemon
) -> Iterator[PinnerUnderTest]:
    directory = tmp_path_factory.mktemp("pinner-fuzz")
    namespace = f"pmfuzz-{uuid.uuid4().hex[:12]}"
    routes = DeadRoutes(containerd_daemon.hosts_dir)
    images: dict[str, BuiltImage] = {}
    try:
        for seed, name in enumerate((PLAIN, PINNED)):
            image = build_image(directory / f"layout-{seed}", name=name, layers=1, layer_size=4096)
            archive = image.write_oci_archive(directory / f"image-{seed}.tar")
            containerd_daemon.import_archive(archive, namespace=namespace)
            images[name] = image
        asyncio.run(
            _set_labels(
                containerd_daemon,
                namespace,
                {PINNED: {PIN_LABEL: PIN_VALUE, KEEP_LABEL[0]: KEEP_LABEL[1]}},
            )
        )
        # Unqualified names are pulled from docker.io: routed before anything can ask.
        routes.route("docker.io")
        ports = _write_config(directory, containerd_daemon, namespace)
        argv = cli_argv("pinner", "--config", str(directory / "peermirror.yaml"))
        with running(argv, directory / "logs", "pinner") as proc:
            address = ports.grpc_address("pinner")
            wait_serving(address, proc)
            node = PinnerUnderTest(address, proc, containerd_daemon, namespace, images, routes)
            node.before = node.state()
            node.cri_before = set(asyncio.run(_images(containerd_daemon, CRI_NAMESPACE)))
            yield node
    finally:
        routes.close()
        containerd_daemon.purge_namespace(namespace)


@pytest.fixture(scope="module")
def baseline(pinner: PinnerUnderTest) -> int:
    return pinner.rss()


# --- what each method may answer -----------------------------------------------------------------


def _parsed(ref: str) -> Reference | None:
    """`ref` (surrounding blanks aside) as a reference; None when it is not one."""
    try:
        return parse_reference(ref.strip())
    except GrammarError:
        return None


def _is_image_id(ref: str) -> bool:
    """Whether `ref` names a CRI image-id record (sha256:...), which Pin/Unpin take as is."""
    return ref.strip().startswith("sha256:")


def _names_image(ref: str, names: set[str]) -> str | None:
    """The seeded image `ref` names (as given, or normalised the Docker way), if any."""
    if ref.strip() in names:
        return ref.strip()
    parsed = _parsed(ref)
    if parsed is not None and parsed.tag is None and parsed.digest is None:
        parsed = _parsed(ref.strip() + ":latest")
    return str(parsed) if parsed is not None and str(parsed) in names else None


def _valid_ref(ref: str) -> bool:
    """Pin/Unpin: a reference, or the name of a CRI image-id record as is."""
    return _is_image_id(ref) or _parsed(ref) is not None


def _valid_pull_ref(reference: str) -> bool:
    """Prefetch: a reference by tag or digest (an image id names nothing to pull)."""
    return not _is_image_id(reference) and _parsed(reference) is not None


def _invalid(outcome: Outcome, field_name: str) -> None:
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert outcome.details.startswith(f"{field_name}: "), outcome.details


def _reply(outcome: Outcome, kind: type[ReplyT]) -> ReplyT:
    """The one reply of a call that must have succeeded."""
    assert outcome.code == grpc.StatusCode.OK, outcome
    [reply] = outcome.replies
    assert isinstance(reply, kind), reply
    return reply


@dataclass
class Expectations:
    """What the pinner's answers must be, given the state before the run (kept across a run)."""

    node: PinnerUnderTest
    pinned: set[str] = field(default_factory=set)
    unpinned: Counter[str] = field(default_factory=Counter)
    was_pinned: set[str] = field(default_factory=set)

    def digest(self, name: str) -> str:
        return self.node.images[name].target.digest

    def check(self, method: str, request: Message, outcome: Outcome) -> None:
        getattr(self, f"_{method}")(request, outcome)

    def _ListPins(self, request: Message, outcome: Outcome) -> None:
        reply = _reply(outcome, pinner_pb2.ListPinsResponse)
        pins = [(p.name, p.digest, p.managed, p.source) for p in reply.pins]
        assert pins == [(PINNED, self.digest(PINNED), False, "")], pins

    def _Status(self, request: Message, outcome: Outcome) -> None:
        reply = _reply(outcome, pinner_pb2.StatusResponse)
        assert reply.namespace == self.node.namespace
        assert reply.containerd_connected and reply.participating
        assert reply.pinned_images == 1
        assert list(reply.imports) == []

    def _Resync(self, request: Message, outcome: Outcome) -> None:
        reply = _reply(outcome, pinner_pb2.ResyncResponse)
        assert reply.imported == 0 and reply.HasField("finished_at")

    def _resolved(self, ref: str, outcome: Outcome) -> str | None:
        """Pin/Unpin: the seeded image `ref` names once the answer is checked to be OK; None
        when it had to be INVALID_ARGUMENT (naming `ref`) or NOT_FOUND, and was."""
        if not _valid_ref(ref):
            _invalid(outcome, "ref")
            return None
        name = _names_image(ref, set(self.node.images))
        if name is None:
            assert outcome.code == grpc.StatusCode.NOT_FOUND, outcome
        return name

    def _Pin(self, request: Message, outcome: Outcome) -> None:
        assert isinstance(request, pinner_pb2.PinRequest)
        name = self._resolved(request.ref, outcome)
        if name is None:
            return
        pin = _reply(outcome, pinner_pb2.PinResponse).pin
        assert (pin.name, pin.digest, pin.managed) == (name, self.digest(name), False), pin
        self.pinned.add(name)

    def _Unpin(self, request: Message, outcome: Outcome) -> None:
        assert isinstance(request, pinner_pb2.UnpinRequest)
        name = self._resolved(request.ref, outcome)
        if name is None:
            return
        reply = _reply(outcome, pinner_pb2.UnpinResponse)
        # PLAIN was never pinned; PINNED was until the first unpin (which must say so).
        assert not (name == PLAIN and reply.was_pinned), request
        self.unpinned[name] += 1
        if reply.was_pinned:
            self.was_pinned.add(name)

    def _Prefetch(self, request: Message, outcome: Outcome) -> None:
        assert isinstance(request, pinner_pb2.PrefetchRequest)
        if not _valid_pull_ref(request.reference):
            _invalid(outcome, "reference")
            assert outcome.replies == []
            return
        # Nothing can be pulled from 127.0.0.1:9: the documented failures only, never DONE.
        assert outcome.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), (
            outcome.code,
            outcome.details,
        )
        assert outcome.details.startswith("reference "), outcome.details
        # Proof the pull was routed: containerd dialled 127.0.0.1:9 and nothing else.
        assert "127.0.0.1:9: connect: connection refused" in outcome.details, outcome.details
        for reply in outcome.replies:
            assert isinstance(reply, pinner_pb2.PrefetchProgress)
            assert reply.reference == request.reference
            assert reply.phase in (
                pinner_pb2.PREFETCH_PHASE_STARTED,
                pinner_pb2.PREFETCH_PHASE_PULLING,
            ), reply

    def after_run(self) -> None:
        """The run's lasting effects, checked against containerd itself."""
        now = self.node.state()
        pinned_now = {name for name, record in now.items() if record[3].get(PIN_LABEL) == PIN_VALUE}
        if self.pinned:
            # Pin only adds: what was pinned stays, what the fuzz pinned is pinned.
            assert pinned_now == {PINNED} | self.pinned, pinned_now
        if self.unpinned:
            assert pinned_now == {PINNED} - set(self.unpinned), pinned_now
            assert self.was_pinned == {PINNED} & set(self.unpinned), self.was_pinned
            # Unpinning removes the pin only.
            if PINNED in self.unpinned:
                assert now[PINNED][3] == {KEEP_LABEL[0]: KEEP_LABEL[1]}, now[PINNED]


# Requests that reach past validation: the seeded images under every spelling, names of hosts
# that would be dialled, image ids, edge lengths.
def _extra_text(images: dict[str, BuiltImage]) -> tuple[str, ...]:
    plain, pinned = images[PLAIN], images[PINNED]
    return (
        "fuzz:1.0",
        "library/fuzz:1.0",
        "index.docker.io/library/fuzz:1.0",
        f" {PINNED}\n",
        "fuzz-pinned:1.0",
        "docker.io/library/fuzz",
        f"fuzz@{plain.target.digest}",
        f"{PLAIN}@{plain.target.digest}",
        pinned.platforms[0].config.digest,
        "sha256:1/x",
        "sha256:" + "f" * 64,
        "localhost/app:1",
        "localhost:5000/app:1",
        "127.0.0.1:9/app:1",
        "Registry.Example.TEST/app:1",
        "registry.example.test/app@sha256:" + "b" * 64,
        "a" * 255 + ":1",
        "x:" + "t" * 129,
        "app:1 ",
        "FUZZ:1.0",
    )


# --- the test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_pinner_method_fuzz(
    pinner: PinnerUnderTest, baseline: int, method: MethodDescriptor
) -> None:
    request_type = GetMessageClass(method.input_type)
    expect = Expectations(pinner)
    codes: Counter[str] = Counter()

    @fuzz_settings(CASES_PER_METHOD // BATCH)
    @given(
        requests=st.lists(
            wire_requests(method.input_type, _extra_text(pinner.images)),
            min_size=BATCH,
            max_size=BATCH,
        )
    )
    def run(channel: grpc.Channel, requests: list[bytes]) -> None:
        decoded = [request_type.FromString(raw) for raw in requests]
        for request in decoded:
            if isinstance(request, pinner_pb2.PrefetchRequest):
                pinner.routes.route_prefetch(request.reference)
        outcomes = call_batch(channel, method, requests, CALL_TIMEOUT_S)
        for request, outcome in zip(decoded, outcomes, strict=True):
            codes[outcome.code.name] += 1
            expect.check(method.name, request, outcome)

    try:
        with grpc.insecure_channel(pinner.address) as channel:
            run(channel)
        print(f"Pinner.{method.name}: {dict(codes)}")
        assert sum(codes.values()) >= CASES_PER_METHOD
        assert pinner.proc.proc.poll() is None, pinner.proc.output_lines()[-20:]
        assert pinner.daemon.running
        expect.after_run()
    finally:
        # Whatever happened, the next method starts from the seeded state.
        pinner.restore_labels()
    assert pinner.state() == pinner.before
    # Failed pulls leave no image records behind in CRI's namespace.
    assert set(asyncio.run(_images(pinner.daemon, CRI_NAMESPACE))) == pinner.cri_before
    images = list(pinner.images.values())
    assert asyncio.run(_corrupt_blobs(pinner.daemon, pinner.namespace, images)) == []
    growth = pinner.rss() - baseline
    print(f"  pinner RSS {pinner.rss() / 2**20:.1f} MiB (+{growth / 2**20:.1f} MiB)")
    assert growth < RSS_GROWTH_LIMIT
    tracebacks = [line for line in pinner.proc.output_lines() if "Traceback" in line]
    assert tracebacks == [], tracebacks[:3]
