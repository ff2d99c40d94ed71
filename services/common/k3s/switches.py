"""Reads the K3s switches peermirror honours from a K3s config.yaml and its config.yaml.d drop-ins.

K3s's config file is flat YAML whose keys are its command-line flags without the dashes
(``embedded-registry: true``). K3s reads ``<file>`` and then ``<file>.d/*.yaml`` (and ``*.yml``)
in name order, a later file's value replacing an earlier one's; we do the same so that one K3s
configuration drives both K3s and peermirror. Every other K3s key is ignored, and a missing file
means "nothing set here" (as for K3s, whose default config file need not exist).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from services.common.errors import InvalidArgumentError

EMBEDDED_REGISTRY = "embedded-registry"
DISABLE_DEFAULT_ENDPOINT = "disable-default-registry-endpoint"
# The K3s keys read, spelled exactly as K3s spells them.
SWITCHES: tuple[str, ...] = (EMBEDDED_REGISTRY, DISABLE_DEFAULT_ENDPOINT)

# K3s passes config values on as flag text, parsed by Go's strconv.ParseBool.
_GO_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_DROPIN_SUFFIXES = (".yaml", ".yml")


class K3sConfigError(InvalidArgumentError):
    """A K3s config file cannot be read or a switch has a value K3s would refuse too."""


def parse_switch(value: object, where: str) -> bool:
    """One switch's value as K3s reads it: a YAML bool or ParseBool text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _GO_TRUE:
        return True
    if isinstance(value, str) and value in _GO_FALSE:
        return False
    raise K3sConfigError(f"{where}: expected true or false, got {value!r}")


def switches_from_mapping(data: object, source: str) -> dict[str, bool]:
    """The switches set in one parsed K3s config document (other keys ignored)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise K3sConfigError(f"{source}: a K3s config file must be a mapping of flag names")
    return {key: parse_switch(data[key], f"{source}: {key}") for key in SWITCHES if key in data}


def merge_switches(layers: Iterable[Mapping[str, bool]]) -> dict[str, bool]:
    """Later layers win key by key, as K3s applies its drop-ins."""
    merged: dict[str, bool] = {}
    for layer in layers:
        merged.update(layer)
    return merged


def config_files(path: Path) -> list[Path]:
    """``path`` (when present) followed by its ``.d`` drop-ins in name order."""
    files = [path] if path.is_file() else []
    dropins = path.with_name(path.name + ".d")
    if dropins.is_dir():
        files += sorted(
            p for p in dropins.iterdir() if p.suffix in _DROPIN_SUFFIXES and p.is_file()
        )
    return files


def read_switches(path: Path) -> dict[str, bool]:
    """The effective switches of the K3s config at ``path`` and its drop-ins."""
    layers = []
    for file in config_files(path):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise K3sConfigError(f"{file}: cannot read K3s config: {exc}") from None
        except yaml.YAMLError as exc:
            raise K3sConfigError(f"{file}: YAML syntax error: {exc}") from None
        layers.append(switches_from_mapping(data, str(file)))
    return merge_switches(layers)
