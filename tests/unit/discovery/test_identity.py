"""The node ID file: created once, read back unchanged, replaced only when unusable."""

from __future__ import annotations

from pathlib import Path

from services.discovery.identity import NODE_ID_FILE, load_or_create_node_id


def test_node_id_is_created_then_stable(tmp_path: Path) -> None:
    data_dir = tmp_path / "missing" / "data"
    first = load_or_create_node_id(data_dir)
    assert len(first) == 32
    text = (data_dir / NODE_ID_FILE).read_text()
    assert text == first.hex() + "\n"
    assert load_or_create_node_id(data_dir) == first
    assert [p.name for p in data_dir.iterdir()] == [NODE_ID_FILE]


def test_unusable_node_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / NODE_ID_FILE).write_text("not hex at all")
    new = load_or_create_node_id(tmp_path)
    assert (tmp_path / NODE_ID_FILE).read_text().strip() == new.hex()
    assert load_or_create_node_id(tmp_path) == new
