"""`make screenshot`: docs/status-page.png, the status page of a node of a real local mesh.

Brings up `peermirror demo`'s three-node loopback mesh (same planning, configs, supervisor and
seeding), pulls the demo image through node 3 (relayed from node 1), stores it on node 3 as its
containerd would, pulls it again (now local hits), then photographs node 3's /status (on its
node-local metrics listener) in headless Chromium. Every process it starts is stopped before it
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from services.cli.demo_mesh import (
    STOP_TIMEOUT_S,
    DemoError,
    DemoOptions,
    MeshLog,
    child_name,
    ports_in_use,
    prepare_workdir,
    pull,
    scenario,
    service_argv,
    write_configs,
)
from services.cli.demo_plan import DEMO_IMAGE, Listener, NodePlan, plan_mesh
from services.common.node_supervisor import SERVICES, NodeSupervisor
from services.common.oci.synthetic import BuiltImage, build_image
from services.common.store.oci_layout import OciLayoutStore
from tests.harness.chromium import ChromiumError, screenshot

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "status-page.png"
DEFAULT_WORKDIR = REPO_ROOT / ".run" / "screenshot"
# Away from the demo's default ports, so a running demo does not collide with this one.
DEFAULT_BASE_PORT = 31000
NODES = 3
WIDTH, HEIGHT = 1200, 900


def _echo(line: str) -> None:
    print(line, flush=True)


async def _populate(options: DemoOptions, nodes: list[NodePlan], image: BuiltImage) -> None:
    """Seed, relay, keep and pull again: the page then shows peers, an image on two nodes and
    pulls from both sources."""
    log = MeshLog(options.workdir / "supervisor.log", _echo)
    await scenario(options, nodes, image, log, _echo)
    puller = nodes[-1]
    store = OciLayoutStore(puller.layout_path, create=True)
    await asyncio.to_thread(store.set_image, image.name, image.target, image.blob_paths)
    await pull(options, puller, options.workdir / "pulled-again")


async def run(out: Path, workdir: Path, base_port: int) -> int:
    nodes = plan_mesh(NODES, base_port, workdir)
    busy = ports_in_use([p for n in nodes for p in n.ports])
    if busy:
        raise DemoError(f"ports in use on 127.0.0.1: {busy[:10]}; choose another --base-port")
    prepare_workdir(workdir)
    write_configs(nodes, workdir)
    options = DemoOptions(
        nodes=NODES,
        base_port=base_port,
        workdir=workdir,
        once=True,
        client="builtin",
        layers=3,
        layer_size=1024 * 1024,
    )
    image = await asyncio.to_thread(
        build_image,
        workdir / "seed",
        DEMO_IMAGE,
        layers=options.layers,
        layer_size=options.layer_size,
        cheap_data=True,
        compresslevel=0,
    )
    # The generated configs are complete; overrides from this shell would hit every node.
    for var in [v for v in os.environ if v.startswith("PEERMIRROR_") and "__" in v]:
        del os.environ[var]
    commands = {
        child_name(node, service): service_argv(
            service, node.config_path, node.directory / f"{service}.log"
        )
        for node in nodes
        for service in SERVICES
    }
    supervisor = NodeSupervisor(
        commands, MeshLog(workdir / "supervisor.log", _echo), stop_timeout=STOP_TIMEOUT_S
    )
    _echo(f"screenshot: starting a {NODES}-node mesh on 127.0.0.1 (logs in {workdir})")
    supervising = asyncio.create_task(supervisor.run(), name="screenshot-supervisor")
    try:
        await _populate(options, nodes, image)
        out.parent.mkdir(parents=True, exist_ok=True)
        # The node-local listener (registry.metrics_address), where operators open the page.
        url = f"http://{nodes[-1].address(Listener.REGISTRY_METRICS)}/status"
        await screenshot(url, str(out), WIDTH, HEIGHT)
        _echo(f"screenshot: {url} -> {out}")
    finally:
        supervisor.request_stop()
        await supervising
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="mesh directory")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.out.resolve(), args.workdir.resolve(), args.base_port))
    except (DemoError, ChromiumError) as exc:
        print(f"screenshot: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
