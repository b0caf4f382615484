"""The fleet's desired config as an overlay on the box's file."""

from __future__ import annotations

import pytest
from echoel.daemon import config as config_mod
from echoel.daemon import fleet_overlay
from echoel.daemon.config import ConfigError


def _base(tmp_path) -> config_mod.Config:
    return config_mod.defaults().with_value("daemon.state_dir", str(tmp_path))


def test_overlay_applies_all_or_nothing_and_survives_restarts(tmp_path):
    base = _base(tmp_path)
    path = tmp_path / fleet_overlay.OVERLAY_NAME
    fleet_overlay.write(path, 3, {"chain.gain_db": -4.5, "agent.telemetry_interval_s": 2.0})
    cfg, version = fleet_overlay.effective(base)
    assert version == 3 and cfg["chain"]["gain_db"] == -4.5
    assert cfg["agent"]["telemetry_interval_s"] == 2.0
    with pytest.raises(ConfigError, match="period = 5"):  # one bad key refuses them all
        base.with_values({"chain.gain_db": -1.0, "engine.period": 5})
    assert base["chain"]["gain_db"] == 0.0


def test_an_overlay_that_no_longer_fits_is_ignored_with_a_reason(tmp_path, caplog):
    base = _base(tmp_path)
    fleet_overlay.write(tmp_path / fleet_overlay.OVERLAY_NAME, 5, {"chain.eq.3.freq": 100.0})
    cfg, version = fleet_overlay.effective(base)
    assert version == 0 and cfg.data == base.data
    assert "not usable, running on" in caplog.text and "chain.eq.3.freq" in caplog.text
    (tmp_path / fleet_overlay.OVERLAY_NAME).write_text("{not json")
    assert fleet_overlay.effective(base)[0].data == base.data


@pytest.mark.parametrize("values, says", [
    ({"agent.cert_file": "/tmp/x"}, "cannot be changed by the fleet"),
    ({"daemon.state_dir": "/"}, "cannot be changed by the fleet"),
    ([1, 2], "must be an object"),
    ({3: 1}, "must be a string"),
])
def test_keys_the_fleet_may_not_send(values, says):
    with pytest.raises(ConfigError, match=says):
        fleet_overlay.check_remote(values)
