"""The node's DHT identity, kept in the data dir so a restart rejoins as the same node."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.logsetup import get_logger
from services.discovery.kademlia import NodeIdError, format_node_id, parse_node_id, random_node_id

NODE_ID_FILE = "node_id"

log = get_logger("discovery")


def load_or_create_node_id(data_dir: Path) -> bytes:
    """The ID stored in `data_dir/node_id` (64 hex characters), created on first start.

    An unreadable ID file is replaced by a new ID with a warning rather than stopping the
    service: the ID only has to be stable, and records under an old ID simply expire.
    """
    path = data_dir / NODE_ID_FILE
    try:
        return parse_node_id(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        pass
    except (NodeIdError, UnicodeDecodeError) as exc:
        log.warning("node id file unusable, creating a new id", path=str(path), error=str(exc))
    node_id = random_node_id()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a crash never leaves a half-written ID behind.
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(format_node_id(node_id) + "\n", encoding="ascii")
    os.replace(tmp, path)
    return node_id
