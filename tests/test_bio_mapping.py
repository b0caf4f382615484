"""Body-to-sound mapping (dsp/bio_mapping.py) and the modulation service logic
(daemon/bio_modulation.py): curves, ranges, smoothing, presence glides, config errors, the
bounded rate of `modulate` commands and their values, over a real ZeroMQ control socket."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import zmq
from echoel.daemon import bio_modulation, config
from echoel.daemon.bio_modulation import BioModulation, supervisor_sender
from echoel.daemon.config import ConfigError
from echoel.drivers.heart_rate_packet import Beat
from echoel.dsp.bio_mapping import (
    C_EXP,
    C_LINEAR,
    C_LOG,
    C_S,
    Mapping,
    MappingBank,
    curve_value,
    map_value,
    parse_mappings,
)

from bench.bio_bench import rsa_series


def cfg_with_band(gain_db: float = -2.0):
    return config.validate({"chain": {"gain_db": gain_db,
                                      "eq": [{"kind": "peaking", "freq": 1200.0}]}})


def mapping(**kw) -> Mapping:
    base = {"target": "chain.gain_db", "source": "hr_bpm", "in_lo": 60.0, "in_hi": 120.0,
            "out_lo": -12.0, "out_hi": 0.0, "neutral": -6.0, "smoothing_s": 0.0,
            "fade_in_s": 2.0, "fade_out_s": 1.0}
    base.update(kw)
    return parse_mappings("test", [base])[0]


# ---------------------------------------------------------------- curves and ranges

def test_curves_match_their_formulas():
    u = np.linspace(0.0, 1.0, 101)
    k = 3.0
    refs = {
        C_LINEAR: u,
        C_EXP: (np.exp(k * u) - 1) / (np.exp(k) - 1),
        C_LOG: np.log(1 + (np.exp(k) - 1) * u) / k,
        C_S: ((1 / (1 + np.exp(-k * (u - 0.5)))) - 1 / (1 + np.exp(k / 2)))
        / (1 / (1 + np.exp(-k / 2)) - 1 / (1 + np.exp(k / 2))),
    }
    for kind, ref in refs.items():
        got = np.array([curve_value(kind, k, float(x)) for x in u])
        np.testing.assert_allclose(got, ref, atol=1e-12)
        assert got[0] == pytest.approx(0.0, abs=1e-12) and got[-1] == pytest.approx(1.0)
        assert np.all(np.diff(got) > 0)  # monotonic
    mid = np.array([curve_value(C_EXP, k, 0.5), curve_value(C_LOG, k, 0.5),
                    curve_value(C_S, k, 0.25) + curve_value(C_S, k, 0.75)])
    assert mid[0] < 0.5 < mid[1] and mid[2] == pytest.approx(1.0)  # convex, concave, odd


def test_input_is_clamped_and_ranges_can_invert():
    m = mapping()
    p = m.row()
    assert map_value(p, 30.0) == -12.0 and map_value(p, 200.0) == 0.0
    assert map_value(p, 90.0) == pytest.approx(-6.0)
    inv = mapping(in_lo=120.0, in_hi=60.0)  # high HR -> low gain
    assert map_value(inv.row(), 120.0) == -12.0 and map_value(inv.row(), 60.0) == 0.0


def test_smoothing_is_a_one_pole_with_its_time_constant():
    tau, dt = 2.0, 0.05
    bank = MappingBank([mapping(smoothing_s=tau, fade_in_s=0.05)])
    bank.valid[0] = True
    bank.inputs[0] = 60.0  # -> -12 dB: the first valid value is taken as it is
    bank.step(dt)
    assert bank.st[0, 0] == -12.0
    bank.inputs[0] = 120.0  # step to 0 dB
    for _ in range(round(tau / dt)):
        bank.step(dt)
    assert bank.out[0] == pytest.approx(-12.0 + 12.0 * (1 - math.exp(-1.0)), rel=1e-9)


def test_glide_out_on_loss_and_back_in_without_steps():
    m = mapping(fade_in_s=2.0, fade_out_s=1.0)
    bank = MappingBank([m])
    dt = 0.01
    trace = []
    bank.inputs[0] = 120.0  # maps to 0 dB; neutral is -6 dB
    for valid, seconds in ((True, 3.0), (False, 1.5), (True, 3.0)):
        bank.valid[0] = valid
        for _ in range(round(seconds / dt)):
            trace.append(bank.step(dt)[0])
    y = np.array(trace)
    assert y[0] == pytest.approx(-6.0, abs=0.01)  # starts at neutral, glides in
    i_in = round(2.0 / dt)
    assert y[i_in] == pytest.approx(0.0) and y[i_in // 2] == pytest.approx(-3.0, abs=0.05)
    lost = round(3.0 / dt)
    assert y[lost + round(1.0 / dt)] == -6.0  # neutral exactly after fade_out_s
    assert np.all(np.diff(y[lost:lost + 100]) <= 0)  # a monotonic glide down
    back = lost + round(1.5 / dt)
    assert y[back + round(2.0 / dt)] == pytest.approx(0.0)
    # raised-cosine glide: the largest step is pi/2 * span * dt / fade
    assert np.max(np.abs(np.diff(y))) <= math.pi / 2 * 6.0 * dt / 1.0 + 1e-9
    assert np.all((y >= -6.0 - 1e-12) & (y <= 0.0 + 1e-12))


def test_nan_state_is_reset_not_kept():
    bank = MappingBank([mapping()])
    bank.st[0, 0] = math.nan
    bank.valid[0] = False
    assert bank.step(0.01)[0] == -6.0


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize(("change", "message"), [
    ({"target": "chain.smoothing_ms"}, "target = 'chain.smoothing_ms' is not a live"),
    ({"target": "chain.eq.3.freq", "out_lo": 100.0, "out_hi": 200.0}, "has 1 EQ band"),
    ({"out_lo": -80.0}, "out_lo = -80 for chain.gain_db: allowed -60 to 24"),
    ({"in_hi": 60.0}, "in_lo = in_hi = 60"),
    ({"curve": "cubic"}, "curve = 'cubic': is not a valid choice"),
    ({"source": "mood"}, "source = 'mood'"),
    ({"smoothing_s": "fast"}, "smoothing_s = 'fast': is a str"),
    ({"speed": 3}, "unknown key 'speed'"),
    ({"in_lo": None}, "in_lo is missing"),
    ({"neutral": 30.0}, "neutral = 30 for chain.gain_db: allowed -60 to 24"),
])
def test_bad_mappings_are_refused_with_key_value_and_rule(change, message):
    raw = {"target": "chain.gain_db", "in_lo": 60.0, "in_hi": 120.0, "out_lo": -12.0,
           "out_hi": 0.0}
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match="test mapping 0") as exc:
        parse_mappings("test", [raw], cfg_with_band())
    assert message in str(exc.value)


def test_duplicate_targets_and_missing_base_are_refused():
    raw = {"target": "chain.gain_db", "in_lo": 60.0, "in_hi": 120.0, "out_lo": -12.0,
           "out_hi": 0.0}
    with pytest.raises(ConfigError, match="already driven by mapping 0"):
        parse_mappings("test", [raw, dict(raw, source="rmssd_ms")], cfg_with_band())
    with pytest.raises(ConfigError, match="neutral is missing"):
        parse_mappings("test", [raw], None)
    with pytest.raises(ConfigError, match=r"must be a list"):
        parse_mappings("test", {"target": "chain.gain_db"}, None)


def test_neutral_defaults_to_the_configured_base():
    raw = [{"target": "chain.gain_db", "in_lo": 60.0, "in_hi": 120.0, "out_lo": -12.0,
            "out_hi": 0.0},
           {"target": "chain.eq.0.freq", "source": "rmssd_ms", "in_lo": 10.0, "in_hi": 80.0,
            "out_lo": 800.0, "out_hi": 3000.0, "curve": "exp"}]
    ms = parse_mappings("test", raw, cfg_with_band(-2.0))
    assert [m.neutral for m in ms] == [-2.0, 1200.0]


def test_bio_section_from_config():
    raw = {"window_s": 120.0, "rate_hz": 10.0, "mappings": [
        {"target": "chain.gain_db", "in_lo": 60.0, "in_hi": 120.0, "out_lo": -12.0,
         "out_hi": 0.0}]}
    bm = bio_modulation.from_config(cfg_with_band(), raw, "box.toml", send=lambda m: {"ok": 1})
    assert bm.hrv_config.window_s == 120.0 and bm.min_interval == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"box.toml \[bio\]: rate_hz = 500"):
        bio_modulation.from_config(cfg_with_band(), dict(raw, rate_hz=500.0), "box.toml")


# ---------------------------------------------------------------- the service logic

class FakeSupervisor:
    """A REP socket at run_dir/control.sock answering `modulate` with the supervisor's checks
    (every key live, the whole set valid against the config), recording what it accepted."""

    def __init__(self, run_dir, cfg) -> None:
        self.cfg = cfg
        self.accepted: list[dict] = []
        self.sock = zmq.Context.instance().socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(config_ep := f"ipc://{run_dir}/control.sock")
        self.endpoint = config_ep
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            req = json.loads(self.sock.recv())
            values = req.get("values", {})
            try:
                assert req["cmd"] == "modulate"
                assert all(config.is_live(k) for k in values)
                self.cfg.with_values(values, "modulation")
                self.accepted.append(values)
                rep = {"ok": True, "applied": "live", "modulated": sorted(values)}
            except (AssertionError, ConfigError) as exc:
                rep = {"ok": False, "error": str(exc)}
            self.sock.send(json.dumps(rep).encode())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def supervisor(tmp_path):
    s = FakeSupervisor(tmp_path, cfg_with_band())
    yield s
    s.close()


def run_session(bm: BioModulation, clock: list[float], rr: np.ndarray, tick: float,
                sensor: str = "strap") -> None:
    """Feed beats at their own times, ticking in between (clock[0] is the service's time)."""
    beat_t = clock[0]
    for v in rr:
        beat_t += v / 1000.0
        while clock[0] + tick <= beat_t:
            clock[0] += tick
            bm.tick()
        bm.on_beat(Beat(sensor, int(beat_t * 1e9), int(60000 / v), [float(v)], True))


def idle(bm: BioModulation, clock: list[float], seconds: float, tick: float) -> None:
    end = clock[0] + seconds
    while clock[0] < end:
        clock[0] += tick
        bm.tick()


def test_modulation_rate_bounded_values_in_range_glide_out_and_in(supervisor, tmp_path):
    cfg = cfg_with_band(-2.0)
    maps = parse_mappings("test", [
        {"target": "chain.gain_db", "source": "hr_bpm", "in_lo": 55.0, "in_hi": 85.0,
         "out_lo": -9.0, "out_hi": 3.0, "smoothing_s": 1.0, "fade_in_s": 3.0,
         "fade_out_s": 2.0},
        {"target": "chain.eq.0.freq", "source": "rmssd_ms", "in_lo": 10.0, "in_hi": 90.0,
         "out_lo": 600.0, "out_hi": 4000.0, "curve": "log", "smoothing_s": 2.0},
    ], cfg)
    published: list[dict] = []
    rate = 20.0
    clock = [0.0]
    sent_at: list[float] = []
    to_supervisor = supervisor_sender(tmp_path)

    def send(msg):
        sent_at.append(clock[0])
        return to_supervisor(msg)

    bm = BioModulation(maps, send, published.append, rate_hz=rate, clock=lambda: clock[0])
    tick = 0.01  # the service ticks 5x faster than the allowed rate
    bm.on_sensor_state("strap", "connected")
    run_session(bm, clock, rsa_series(40.0, seed=9, mean=850.0), tick)
    t = clock[0]
    assert bm.send_errors == 0 and bm.messages == len(supervisor.accepted) > 10
    gaps = np.diff(sent_at)
    assert np.all(gaps >= 1.0 / rate - 1e-9)  # never faster than rate_hz
    assert bm.messages <= t * rate + 1
    for values in supervisor.accepted:
        for k, v in values.items():
            lo, hi = (-9.0, 3.0) if k == "chain.gain_db" else (600.0, 4000.0)
            neutral = -2.0 if k == "chain.gain_db" else 1200.0
            assert min(lo, neutral) <= v <= max(hi, neutral), (k, v)
    # the figures were published, per sensor
    json.dumps(published[-1], allow_nan=False)  # plain JSON for the bus
    fig = published[-1]["sensors"]["strap"]
    assert fig["hr_bpm"] is not None and fig["rmssd_ms"] is not None
    assert fig["artifacts_corrected"] == 0
    # sensor lost: both parameters glide back to their configured base within fade_out_s
    # (2 s for the gain, the default 3 s for the EQ)
    bm.on_sensor_state("strap", "lost")
    n_before = len(supervisor.accepted)
    idle(bm, clock, 3.0 + 0.3, tick)  # the longest fade_out_s, and some
    last = {}
    for values in supervisor.accepted[n_before:]:
        last.update(values)
    assert last["chain.gain_db"] == -2.0 and last["chain.eq.0.freq"] == 1200.0
    gains = [v["chain.gain_db"] for v in supervisor.accepted[n_before:] if "chain.gain_db" in v]
    assert len(gains) >= 5  # a glide, not a jump
    assert published[-1]["mappings"][0]["presence"] == 0.0
    # nothing moves while lost: no more commands
    n_lost = len(supervisor.accepted)
    idle(bm, clock, 1.0, tick)
    assert len(supervisor.accepted) == n_lost
    # back: the gain glides in again (starting next to neutral, not jumping)
    bm.on_sensor_state("strap", "connected")
    run_session(bm, clock, rsa_series(15.0, seed=10, mean=850.0), tick)
    back = [v["chain.gain_db"] for v in supervisor.accepted[n_lost:] if "chain.gain_db" in v]
    assert back and abs(back[0] - (-2.0)) < 1.0
    assert abs(back[-1] - (-2.0)) > abs(back[0] - (-2.0))
    assert np.max(np.abs(np.diff(back))) < 1.0  # dB per command: a glide


def test_gaps_restart_the_series_and_no_contact_is_ignored():
    bm = BioModulation([], None, None)
    rr = rsa_series(30.0, seed=4)
    for i, v in enumerate(rr):
        bm.on_beat(Beat("a", i, 70, [float(v)], True, None, False))
    track = bm.sensors["a"]
    n_full = track.figures["beats"]
    assert n_full == len(rr) - 5  # held back by the artifact lag
    bm.on_beat(Beat("a", 0, 70, [850.0], None, None, True))  # after a gap
    assert track.gaps == 1 and track.hrv.ist[1] == 0 and math.isnan(track.figures["beats"])
    bm.on_beat(Beat("a", 0, 70, [850.0], False, None, False))  # no skin contact
    assert track.no_contact == 1 and track.intervals == len(rr) + 1
    bm.on_beat(Beat("a", 0, 70, [float("nan")], True, None, False))
    assert track.corrector.invalid == 1 and track.gaps == 2


def test_send_failures_are_counted_and_retried():
    calls = []

    def down(msg):
        calls.append(msg)
        raise TimeoutError("no answer from the daemon")

    bm = BioModulation([mapping(fade_in_s=0.05)], down, None, rate_hz=10.0)
    bm.sensors["s"] = bio_modulation.SensorTrack("s", bm.hrv_config, bm.art_config)
    bm.sensors["s"].figures["hr_bpm"] = 120.0  # maps to 0 dB; neutral -6 dB
    bm.sensors["s"].last_seen = 0.0  # heard from at t = 0: live for stale_s (5 s)
    for i in range(30):
        bm.tick(i * 0.05)
    assert bm.send_errors == len(calls) > 1 and "TimeoutError" in bm.last_error
    assert all(c["values"]["chain.gain_db"] > -6.0 for c in calls[1:])  # the mapping moves
    assert len(calls) <= 30 * 0.05 * 10 + 1  # retries also respect the rate


def test_a_silent_sensor_glides_out_and_bpm_alone_drives_hr():
    clock = [0.0]
    sent: list[dict] = []
    bm = BioModulation([mapping(fade_in_s=0.5, fade_out_s=0.5)],
                       lambda msg: sent.append(msg["values"]) or {"ok": True}, None,
                       stale_s=2.0, clock=lambda: clock[0])
    for _ in range(20):  # a sensor that sends bpm only (no RR intervals)
        bm.on_beat(Beat("band", 0, 120, [], True))
        clock[0] += 0.1
        bm.tick()
    assert sent[-1]["chain.gain_db"] == pytest.approx(0.0)  # 120 bpm -> 0 dB
    idle(bm, clock, 2.0 + 0.5 + 0.2, 0.05)  # silent: stale after 2 s, then the glide
    assert sent[-1]["chain.gain_db"] == -6.0


def test_a_sensor_back_soon_after_a_loss_waits_for_a_new_beat():
    clock = [0.0]
    sent: list[dict] = []
    bm = BioModulation([mapping(fade_in_s=0.2, fade_out_s=0.2)],
                       lambda msg: sent.append(msg["values"]) or {"ok": True}, None,
                       stale_s=5.0, clock=lambda: clock[0])
    bm.on_sensor_state("band", "connected")
    for _ in range(10):
        bm.on_beat(Beat("band", 0, 120, [], True))
        clock[0] += 0.1
        bm.tick()
    assert sent[-1]["chain.gain_db"] == pytest.approx(0.0)
    bm.on_sensor_state("band", "lost")
    idle(bm, clock, 0.5, 0.05)
    assert sent[-1]["chain.gain_db"] == -6.0  # neutral
    bm.on_sensor_state("band", "connected")  # back well within stale_s, no beat yet
    n = len(sent)
    idle(bm, clock, 1.0, 0.05)
    assert all(v["chain.gain_db"] == -6.0 for v in sent[n:])  # still neutral
    bm.on_beat(Beat("band", 0, 120, [], True))
    idle(bm, clock, 0.5, 0.05)
    assert sent[-1]["chain.gain_db"] == pytest.approx(0.0)  # glided back in on the beat
