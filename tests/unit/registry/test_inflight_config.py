"""The inflight config section: keys load into the coordinator, bad values name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import ConfigError, load_config
from services.common.store.memory import MemoryStore
from services.registry.app import create_app
from services.registry.inflight.coordinator import Coordinator
from services.registry.inflight.ports import Holder
from tests.harness.fake_inflight import FakeUpstream
from tests.harness.fake_router import FakeRouter, LeaseTable


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_inflight_keys_reach_the_coordinator(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            "node:\n  data_dir: /srv/pm\n"
            "inflight:\n  max_spool_bytes: 1048576\n  grace_period: 5\n"
            "  manifest_window: 0.5\n  holder_wait: 3\n  upstream_resumes: 0\n",
        )
    )
    coordinator = Coordinator.from_config(
        cfg, LeaseTable().client(Holder("127.0.0.1", 1)), FakeUpstream(), FakeRouter()
    )
    assert coordinator.pool.directory == Path("/srv/pm/spool")
    assert coordinator.pool.max_bytes == 1048576
    assert coordinator.pool.grace_s == 5
    assert coordinator.settings.section.manifest_window == 0.5
    assert coordinator.settings.section.holder_wait == 3
    assert coordinator.settings.section.upstream_resumes == 0


def test_bad_inflight_values_name_key_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "inflight:\n  max_spool_bytes: 0\n")
    with pytest.raises(ConfigError, match=r"inflight\.max_spool_bytes: must be > 0") as err:
        load_config(path)
    assert str(path) in str(err.value)
    path = _write(tmp_path, "inflight:\n  upstream_resumes: -1\n")
    with pytest.raises(ConfigError, match=r"inflight\.upstream_resumes: must be >= 0"):
        load_config(path)


def test_inflight_off_means_the_app_does_not_use_it(tmp_path: Path) -> None:
    coordinator = Coordinator.from_config(
        load_config(None),
        LeaseTable().client(Holder("127.0.0.1", 1)),
        FakeUpstream(),
        FakeRouter(),
    )
    for enabled in (True, False):
        cfg = load_config(
            _write(
                tmp_path, f"tls:\n  enabled: false\ninflight:\n  enabled: {str(enabled).lower()}\n"
            )
        )
        app = create_app(
            cfg, name=f"pm_inflight_cfg_{enabled}", store=MemoryStore(), inflight=coordinator
        )
        assert (app.ctx.inflight is coordinator) is enabled
