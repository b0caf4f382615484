"""The config (daemon/config.py) and `echoel config` / `echoel run --config`: defaults, a full
valid file, and every kind of bad file refused with a message that names the file, the key,
the value and what is allowed."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from echoel.daemon import config
from echoel.daemon.config import ConfigError

ECHOEL = str(Path(sys.executable).with_name("echoel"))

def core(data: dict) -> dict:
    """The sections this module documents (the services' own are checked by theirs)."""
    return {k: data[k] for k in config.CORE_SECTIONS}


DOCUMENTED_DEFAULTS = {
    "engine": {
        "device": "auto", "capture_device": "", "playback_device": "", "rate": 48000,
        "period": 128, "periods": 4, "prefill": 2, "channels_in": 2, "channels_out": 2,
        "format": "S32_LE", "poll_timeout_ms": 250, "rescan_ms": 1000,
    },
    "realtime": {"priority": 70, "cpu": 1, "mlock": True, "gc_freeze": True},
    "chain": {
        "gain_db": 0.0, "smoothing_ms": 10.0,
        "limiter": {"enabled": True, "threshold_db": -1.0, "release_ms": 80.0},
        "eq": [],
    },
    "taps": [],
    "daemon": {
        "instance": "main", "run_dir": "", "status_interval_ms": 250, "xrun_burst_ms": 1000,
        "log_level": "info", "state_dir": "",
    },
    "agent": {
        "enabled": False, "broker_host": "localhost", "broker_port": 8883,
        "ca_file": "/etc/echoel/pki/ca.crt", "cert_file": "/etc/echoel/pki/device.crt",
        "key_file": "/etc/echoel/pki/device.key", "group": "", "telemetry_interval_s": 10.0,
        "keepalive_s": 30, "reconnect_max_s": 60.0, "spool_max_messages": 100000,
        "allow_reboot": False, "reboot_command": "systemctl reboot",
    },
}

FULL = """\
# a complete config: every section, two EQ bands, two taps
[engine]
device = "hw:CARD=USB,DEV=0"
rate = 96000
period = 64
periods = 3
prefill = 2
channels_in = 2
channels_out = 4
format = "S16_LE"
poll_timeout_ms = 500
rescan_ms = 2000

[realtime]
priority = 80
cpu = -1
mlock = false
gc_freeze = true

[chain]
gain_db = -3            # an integer where a number is wanted
smoothing_ms = 20.0

[chain.limiter]
enabled = true
threshold_db = -2.5
release_ms = 100.0

[[chain.eq]]
kind = "highpass"
freq = 40
q = 0.7

[[chain.eq]]
kind = "peaking"
freq = 2500.0
gain_db = -4.5
q = 1.4

[[taps]]
name = "meter"
source = "output"
slots = 64

[[taps]]
name = "analysis_1"

[daemon]
instance = "studio-a"
run_dir = "/tmp/echoel-config-test"
status_interval_ms = 100
xrun_burst_ms = 500
log_level = "debug"
"""

ENGINE_KEYS = ("capture_device, channels_in, channels_out, device, format, period, periods, "
               "playback_device, poll_timeout_ms, prefill, rate, rescan_ms")


def write(tmp_path: Path, text: str, name: str = "box.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return str(info.value)


def bands(n: int) -> str:
    return "".join(f"[[chain.eq]]\nfreq = {100 + i}\n" for i in range(n))


def taps(n: int) -> str:
    return "".join(f'[[taps]]\nname = "t{i}"\n' for i in range(n))


# --- defaults and a valid file -------------------------------------------------------------

def test_defaults_are_valid_and_match_the_documented_values():
    d = config.defaults()
    assert core(d.data) == DOCUMENTED_DEFAULTS
    for name, mod in config.service_sections().items():  # each service's own defaults
        assert d[name] == mod.check([] if getattr(mod, "ARRAY", False) else {}, "x"), name
    assert isinstance(d["chain"]["gain_db"], float)
    assert d.capture_device == d.playback_device == "auto"
    # an empty file is the defaults
    assert config.validate({}, "empty.toml").data == d.data
    # the documentation (`echoel config keys`) shows the same defaults
    text = config.describe_keys()
    for section in ("engine", "realtime", "daemon"):
        for key, value in DOCUMENTED_DEFAULTS[section].items():
            assert f"  {key} = {value!r}  #" in text, (section, key)
    assert "  gain_db = 0.0  #" in text and "  threshold_db = -1.0  #" in text


def test_empty_file_loads_as_defaults(tmp_path):
    path = write(tmp_path, "# nothing set\n")
    cfg = config.load(path)
    assert cfg.data == config.defaults().data
    assert core(cfg.data) == DOCUMENTED_DEFAULTS
    assert cfg.source == str(path)


def test_full_file_with_bands_and_taps_loads(tmp_path):
    cfg = config.load(write(tmp_path, FULL))
    e = cfg["engine"]
    assert (e["rate"], e["period"], e["periods"], e["prefill"]) == (96000, 64, 3, 2)
    assert (e["channels_in"], e["channels_out"], e["format"]) == (2, 4, "S16_LE")
    assert cfg.capture_device == cfg.playback_device == "hw:CARD=USB,DEV=0"
    assert cfg["realtime"] == {"priority": 80, "cpu": -1, "mlock": False, "gc_freeze": True}
    assert cfg["chain"]["gain_db"] == -3.0 and isinstance(cfg["chain"]["gain_db"], float)
    assert cfg["chain"]["limiter"] == {"enabled": True, "threshold_db": -2.5,
                                       "release_ms": 100.0}
    assert cfg["chain"]["eq"] == [
        {"kind": "highpass", "freq": 40.0, "gain_db": 0.0, "q": 0.7},
        {"kind": "peaking", "freq": 2500.0, "gain_db": -4.5, "q": 1.4},
    ]
    assert cfg["taps"] == [
        {"name": "meter", "source": "output", "slots": 64},
        {"name": "analysis_1", "source": "input", "slots": 256},
    ]
    assert cfg["daemon"]["instance"] == "studio-a"
    assert cfg["daemon"]["log_level"] == "debug"
    spec = cfg.chain_spec()
    assert spec.gain_db == -3.0 and spec.smoothing_ms == 20.0
    assert [(b.kind, b.freq) for b in spec.bands] == [("highpass", 40.0), ("peaking", 2500.0)]
    assert spec.limiter is True and spec.limiter_threshold_db == -2.5


def test_separate_capture_and_playback_devices_without_device(tmp_path):
    cfg = config.load(write(tmp_path, '[engine]\ndevice = ""\ncapture_device = "hw:A"\n'
                                      'playback_device = "hw:B"\n'))
    assert (cfg.capture_device, cfg.playback_device) == ("hw:A", "hw:B")


@pytest.mark.parametrize("text", [
    "[engine]\nperiod = 32\nperiods = 2\nprefill = 1\n",
    "[engine]\nperiod = 1024\nperiods = 16\nprefill = 15\n",
    "[realtime]\npriority = 99\ncpu = 1023\n",
    "[chain]\ngain_db = 24\n[chain.limiter]\nthreshold_db = -40.0\n",
    '[engine]\nrate = 44100\n[[chain.eq]]\nfreq = 22049.9\nkind = "lowpass"\n',
    bands(16) + taps(16),
])
def test_edges_of_what_is_allowed_load(tmp_path, text):
    config.load(write(tmp_path, text))


# --- bad files ------------------------------------------------------------------------------

BAD = [
    # unknown section / key
    ("unknown-section", "[engin]\nperiod = 64\n",
     ["unknown section [engin]", "allowed: agent, bio, chain, ", " daemon, engine, ",
      "realtime, streams, taps, update"]),
    ("unknown-key", "[engine]\nperiods_ = 4\n",
     ["unknown key 'periods_'", "[engine]", "allowed: " + ENGINE_KEYS]),
    ("unknown-key-named-like-a-subtable", "[engine]\neq = 1\n",
     ["unknown key 'eq'", "[engine]", "allowed: " + ENGINE_KEYS]),
    ("unknown-key-limiter", "[chain.limiter]\nknee_db = 3\n",
     ["unknown key 'knee_db'", "[chain.limiter]",
      "allowed: enabled, release_ms, threshold_db"]),
    ("unknown-key-band", "[[chain.eq]]\nfreq = 100\nwidth = 2\n",
     ["band 0", "unknown key 'width'", "[chain.eq]", "allowed: freq, gain_db, kind, q"]),
    ("unknown-key-tap", '[[taps]]\nname = "a"\nlimiter = true\n',
     ["tap 0", "unknown key 'limiter'", "[taps]", "allowed: name, slots, source"]),
    ("section-not-a-table", "engine = 5\n", ["[engine] must be a table", "5"]),
    ("eq-not-an-array", "[chain.eq]\nfreq = 100\n",
     ["[[chain.eq]] must be a list of at most 16 bands", "'freq': 100"]),
    ("taps-not-an-array", '[taps]\nname = "a"\n',
     ["[[taps]] must be a list of at most 16", "'name': 'a'"]),
    # wrong types
    ("string-for-int", '[engine]\nperiod = "128"\n',
     ["[engine]", "period = '128'", "not an integer", "allowed: an integer from 32 to 1024"]),
    ("float-for-int", "[engine]\nperiod = 128.0\n",
     ["[engine]", "period = 128.0", "not an integer", "allowed: an integer from 32 to 1024"]),
    ("bool-for-int", "[engine]\nchannels_in = true\n",
     ["[engine]", "channels_in = True", "not an integer", "allowed: an integer from 1 to 32"]),
    ("bool-for-number", "[chain]\ngain_db = true\n",
     ["[chain]", "gain_db = True", "not a number", "allowed: a number from -60 to 24"]),
    ("string-for-number", '[[chain.eq]]\nfreq = "1k"\n',
     ["band 0", "[chain.eq]", "freq = '1k'", "not a number",
      "allowed: a number from 10 to 96000"]),
    ("int-for-bool", "[realtime]\nmlock = 1\n",
     ["[realtime]", "mlock = 1", "not true/false", "allowed: true or false"]),
    ("int-for-string", "[engine]\ndevice = 5\n",
     ["[engine]", "device = 5", "not a string", "allowed: a string"]),
    # out of range
    ("period-16", "[engine]\nperiod = 16\n",
     ["[engine]", "period = 16", "out of range", "allowed: an integer from 32 to 1024"]),
    ("period-2048", "[engine]\nperiod = 2048\n",
     ["[engine]", "period = 2048", "out of range", "allowed: an integer from 32 to 1024"]),
    ("priority-0", "[realtime]\npriority = 0\n",
     ["[realtime]", "priority = 0", "out of range", "allowed: an integer from 1 to 99"]),
    ("gain-99", "[chain]\ngain_db = 99\n",
     ["[chain]", "gain_db = 99", "out of range", "allowed: a number from -60 to 24"]),
    ("band-gain-30", "[[chain.eq]]\nfreq = 100\ngain_db = 30\n",
     ["band 0", "[chain.eq]", "gain_db = 30", "allowed: a number from -24 to 24"]),
    ("tap-slots-2", '[[taps]]\nname = "a"\nslots = 2\n',
     ["tap 0", "[taps]", "slots = 2", "allowed: an integer from 4 to 65536"]),
    ("cpu-minus-2", "[realtime]\ncpu = -2\n",
     ["[realtime]", "cpu = -2", "allowed: an integer from -1 to 1023"]),
    # bad choices
    ("rate-44000", "[engine]\nrate = 44000\n",
     ["[engine]", "rate = 44000", "not a valid choice",
      "allowed: one of 44100, 48000, 88200, 96000, 176400, 192000"]),
    ("format-S24_LE", '[engine]\nformat = "S24_LE"\n',
     ["[engine]", "format = 'S24_LE'", "not a valid choice",
      "allowed: one of 'S16_LE', 'S32_LE', 'FLOAT_LE'"]),
    ("band-kind-notch", '[[chain.eq]]\nkind = "notch"\nfreq = 100\n',
     ["band 0", "[chain.eq]", "kind = 'notch'", "not a valid choice",
      "allowed: one of 'peaking', 'lowshelf', 'highshelf', 'lowpass', 'highpass'"]),
    ("tap-source", '[[taps]]\nname = "a"\nsource = "both"\n',
     ["tap 0", "source = 'both'", "allowed: one of 'input', 'output'"]),
    ("log-level", '[daemon]\nlog_level = "trace"\n',
     ["[daemon]", "log_level = 'trace'", "allowed: one of 'debug', 'info', 'warning', 'error'"]),
    # non-finite numbers
    ("gain-nan", "[chain]\ngain_db = nan\n",
     ["[chain]", "gain_db = nan", "not finite", "allowed: a number from -60 to 24"]),
    ("threshold-minus-inf", "[chain.limiter]\nthreshold_db = -inf\n",
     ["[chain.limiter]", "threshold_db = -inf", "not finite",
      "allowed: a number from -40 to 0"]),
    ("band-freq-inf", "[[chain.eq]]\nfreq = inf\n",
     ["band 0", "freq = inf", "not finite", "allowed: a number from 10 to 96000"]),
    ("period-nan", "[engine]\nperiod = nan\n",
     ["[engine]", "period = nan", "not an integer", "allowed: an integer from 32 to 1024"]),
    # cross-checks
    ("prefill-equals-periods", "[engine]\nperiods = 4\nprefill = 4\n",
     ["[engine]", "prefill = 4", "must be less than periods (4)"]),
    ("prefill-above-periods", "[engine]\nperiods = 2\nprefill = 3\n",
     ["[engine]", "prefill = 3", "must be less than periods (2)"]),
    ("eq-freq-at-nyquist", "[[chain.eq]]\nfreq = 24000\n",
     ["band 0", "[chain.eq]", "freq = 24000", "below half the sample rate (24000 Hz)"]),
    ("eq-freq-above-nyquist-second-band",
     "[engine]\nrate = 44100\n[[chain.eq]]\nfreq = 100\n[[chain.eq]]\nfreq = 30000\n",
     ["band 1", "[chain.eq]", "freq = 30000", "below half the sample rate (22050 Hz)"]),
    ("device-empty", '[engine]\ndevice = ""\n',
     ["[engine]", "device = ''", "name an ALSA PCM or 'auto'"]),
    ("device-empty-half-split", '[engine]\ndevice = ""\ncapture_device = "hw:A"\n',
     ["[engine]", "device = ''", "name an ALSA PCM or 'auto'"]),
    ("tap-names-duplicate", '[[taps]]\nname = "meter"\n[[taps]]\nname = "meter"\n',
     ["[taps]", "tap names must be unique", "'meter', 'meter'"]),
    ("tap-name-path", '[[taps]]\nname = "../x"\n',
     ["tap 0", "[taps]", "name = '../x'", "use letters, digits, '_' or '-'"]),
    ("tap-name-space", '[[taps]]\nname = "a b"\n',
     ["tap 0", "name = 'a b'", "use letters, digits, '_' or '-'"]),
    ("tap-name-missing", "[[taps]]\nslots = 8\n",
     ["tap 0", "name = ''", "use letters, digits, '_' or '-'"]),
    ("tap-name-second-bad", '[[taps]]\nname = "ok"\n[[taps]]\nname = "a.b"\n',
     ["tap 1", "name = 'a.b'", "use letters, digits, '_' or '-'"]),
    ("instance-unsafe", '[daemon]\ninstance = "../etc"\n',
     ["[daemon]", "instance = '../etc'", "use letters, digits, '_' or '-'"]),
    ("instance-empty", '[daemon]\ninstance = ""\n',
     ["[daemon]", "instance = ''", "use letters, digits, '_' or '-'"]),
    ("too-many-bands", bands(17),
     ["[[chain.eq]]", "must be a list of at most 16 bands", "'freq': 116"]),
    ("too-many-taps", taps(17), ["[[taps]]", "must be a list of at most 16", "'t16'"]),
]


@pytest.mark.parametrize("text,fragments", [pytest.param(t, f, id=i) for i, t, f in BAD])
def test_bad_file_is_refused_with_file_key_value_and_allowed(tmp_path, text, fragments):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert msg.startswith(str(path)), msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


@pytest.mark.parametrize("text,fragments", [pytest.param(t, f, id=i) for i, t, f in BAD[:12]])
def test_validate_names_the_given_source(text, fragments):
    import tomllib

    with pytest.raises(ConfigError) as info:
        config.validate(tomllib.loads(text), "my-source")
    assert str(info.value).startswith("my-source")


def test_validate_refuses_a_non_table():
    with pytest.raises(ConfigError, match=r"^src: the config must be a TOML table"):
        config.validate([1, 2], "src")  # type: ignore[arg-type]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    msg = load_error(path)
    assert msg == f"{path}: cannot read the config: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    msg = load_error(tmp_path)
    assert msg.startswith(f"{tmp_path}: cannot read the config: ")
    assert "directory" in msg


def test_file_that_is_not_utf8_text(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"[engine]\ndevice = \"\xff\xfe\"\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: ")
    assert "UTF-8" in msg


@pytest.mark.parametrize("text,where", [
    ("[engine]\nperiod = = 3\n", "line 2"),
    ("[engine\nperiod = 3\n", "line 1"),
    ("[engine]\nperiod = 64\nperiod = 128\n", "line 3"),
    ('[engine]\ndevice = "unterminated\n', "line 2"),
])
def test_invalid_toml_syntax(tmp_path, text, where):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert msg.startswith(f"{path}: not valid TOML: "), msg
    assert where in msg


# --- changes: with_value, changed_keys, is_live ---------------------------------------------

@pytest.fixture
def full(tmp_path) -> config.Config:
    return config.load(write(tmp_path, FULL))


@pytest.mark.parametrize("key,value,stored", [
    ("chain.gain_db", -6, -6.0),
    ("chain.gain_db", 12.5, 12.5),
    ("chain.eq.0.freq", 80, 80.0),
    ("chain.eq.1.gain_db", 3.0, 3.0),
    ("chain.eq.1.q", 2.0, 2.0),
    ("chain.limiter.threshold_db", -6.0, -6.0),
    ("engine.period", 256, 256),
    ("engine.format", "FLOAT_LE", "FLOAT_LE"),
    ("taps.1.slots", 1024, 1024),
])
def test_with_value_accepts_a_valid_change(full, key, value, stored):
    before = copy.deepcopy(full.data)
    new = full.with_value(key, value)
    node = new.data
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert node == stored and type(node) is type(stored)
    assert new.changed_keys(full) == [key]
    assert full.data == before  # the original is untouched
    assert new.source == f"change of {key} to {value!r}"


@pytest.mark.parametrize("key,value,fragments", [
    ("chain.gain_db", 99, ["chain.gain_db", "99", "allowed: a number from -60 to 24"]),
    ("chain.gain_db", "loud", ["chain.gain_db", "'loud'", "not a number"]),
    ("chain.gain_db", float("nan"), ["chain.gain_db", "nan", "not finite"]),
    ("chain.gain_db", True, ["chain.gain_db", "True", "not a number"]),
    ("engine.period", 16, ["engine.period", "16", "allowed: an integer from 32 to 1024"]),
    ("engine.period", 128.0, ["engine.period", "128.0", "not an integer"]),
    ("engine.prefill", 3, ["engine.prefill", "3", "must be less than periods (3)"]),
    ("engine.rate", 44000, ["engine.rate", "44000", "allowed: one of 44100"]),
    ("engine.device", "", ["engine.device", "''", "name an ALSA PCM or 'auto'"]),
    ("chain.eq.1.freq", 48000.0, ["chain.eq.1.freq", "48000", "below half the sample rate"]),
    ("chain.eq.0.kind", "notch", ["chain.eq.0.kind", "'notch'", "allowed: one of 'peaking'"]),
    ("taps.1.name", "meter", ["taps.1.name", "'meter'", "unique"]),
    ("taps.0.name", "a/b", ["taps.0.name", "'a/b'", "use letters, digits"]),
    ("daemon.instance", "x y", ["daemon.instance", "'x y'", "use letters, digits"]),
    ("chain.eq.2.freq", 100.0, ["chain.eq.2.freq", "no item '2' (there are 2)"]),
    ("chain.eq.-1.freq", 100.0, ["chain.eq.-1.freq", "no item '-1'"]),
    ("chain.volume", 1.0, ["chain.volume", "unknown setting"]),
    ("engine.period.x", 1, ["engine.period.x", "unknown setting"]),
    ("nothing", 1, ["nothing", "unknown setting"]),
])
def test_with_value_refuses_a_bad_change_and_keeps_the_config(full, key, value, fragments):
    before = copy.deepcopy(full.data)
    with pytest.raises(ConfigError) as info:
        full.with_value(key, value)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert full.data == before


def test_with_value_on_defaults():
    d = config.defaults()
    new = d.with_value("chain.gain_db", -3.0).with_value("engine.period", 64)
    assert new["chain"]["gain_db"] == -3.0 and new["engine"]["period"] == 64
    assert core(d.data) == DOCUMENTED_DEFAULTS
    with pytest.raises(ConfigError, match=r"chain\.eq\.0\.freq: no item '0' \(there are 0\)"):
        d.with_value("chain.eq.0.freq", 100.0)


def test_changed_keys(full):
    assert full.changed_keys(full) == []
    assert full.changed_keys(copy.deepcopy(full)) == []
    new = (full.with_value("chain.eq.1.gain_db", -2.0)
           .with_value("engine.period", 256)
           .with_value("chain.limiter.release_ms", 50.0))
    expected = ["chain.eq.1.gain_db", "chain.limiter.release_ms", "engine.period"]
    assert full.changed_keys(new) == expected
    assert new.changed_keys(full) == expected
    # a different number of bands or taps is one change of the whole list
    raw = copy.deepcopy(full.data)
    raw["chain"]["eq"] = raw["chain"]["eq"][:1]
    fewer = config.validate(raw, "fewer")
    assert full.changed_keys(fewer) == ["chain.eq"]
    assert not config.is_live("chain.eq")


@pytest.mark.parametrize("key,live", [
    ("chain.gain_db", True),
    ("chain.eq.0.freq", True),
    ("chain.eq.0.gain_db", True),
    ("chain.eq.7.q", True),
    ("chain.limiter.threshold_db", True),
    ("chain.limiter.release_ms", True),
    ("chain.eq.0.kind", False),
    ("chain.limiter.enabled", False),
    ("chain.smoothing_ms", False),
    ("chain.eq", False),
    ("engine.period", False),
    ("engine.rate", False),
    ("engine.device", False),
    ("realtime.priority", False),
    ("taps.0.slots", False),
    ("daemon.log_level", False),
    ("engine.bogus", False),
    ("chain.eq.0.bogus", False),
    ("bogus", False),
])
def test_is_live(key, live):
    assert config.is_live(key) is live


def test_every_changed_key_of_a_live_edit_is_live(full):
    new = (full.with_value("chain.gain_db", 1.0).with_value("chain.eq.0.freq", 60.0)
           .with_value("chain.eq.1.q", 3.0))
    changed = full.changed_keys(new)
    assert len(changed) == 3
    assert all(config.is_live(k) for k in changed)
    assert not all(config.is_live(k) for k in
                   full.changed_keys(new.with_value("engine.periods", 4)))


# --- parse_value and describe_keys ----------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("-6", -6),
    ("48000", 48000),
    ("2.5", 2.5),
    ("-0.5", -0.5),
    ("true", True),
    ("false", False),
    ('"S16_LE"', "S16_LE"),
    ("S16_LE", "S16_LE"),
    ("auto", "auto"),
    ("hw:CARD=USB,DEV=0", "hw:CARD=USB,DEV=0"),
    ("peaking", "peaking"),
    ("", ""),
])
def test_parse_value(text, value):
    got = config.parse_value(text)
    assert got == value and type(got) is type(value)


def test_parse_value_nan_is_read_as_a_float_then_refused():
    v = config.parse_value("nan")
    assert isinstance(v, float) and math.isnan(v)
    with pytest.raises(ConfigError, match="not finite"):
        config.defaults().with_value("chain.gain_db", v)


def test_describe_keys_mentions_every_key():
    text = config.describe_keys()
    blocks = re.split(r"^(\[\[?[a-z.]+\]\]?)$", text, flags=re.M)
    by_head = dict(zip(blocks[1::2], blocks[2::2], strict=True))
    expected_heads = ["[engine]", "[realtime]", "[chain]", "[chain.limiter]", "[[chain.eq]]",
                      "[[taps]]", "[daemon]", "[agent]",
                      *(f"[[{k}]]" if getattr(m, "ARRAY", False) else f"[{k}]"
                        for k, m in config.service_sections().items())]
    assert list(by_head) == expected_heads
    for section, keys in config.SCHEMA.items():
        head = f"[[{section}]]" if section in ("chain.eq", "taps") else f"[{section}]"
        lines = by_head[head].strip("\n").splitlines()
        assert len(lines) == len(keys)
        for line, (key, spec) in zip(lines, keys.items(), strict=True):
            assert line.startswith(f"  {key} = {spec.default!r}  # {spec.doc}; ")
            assert spec.allowed() in line
            assert line.endswith(" (live)") == spec.live
    live = {ln.split("=")[0].strip() for ln in text.splitlines() if ln.endswith("(live)")}
    assert live == {"gain_db", "threshold_db", "release_ms", "freq", "q"}
    assert "period = 128  # frames per period (block); an integer from 32 to 1024" in text


# --- the command line -----------------------------------------------------------------------

def echoel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ECHOEL, *args], capture_output=True, text=True, timeout=60)


def test_cli_config_check_valid(tmp_path):
    path = write(tmp_path, FULL)
    r = echoel("config", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path}: valid (2 EQ bands, 2 taps)"
    assert r.stderr == ""


@pytest.mark.parametrize("text,fragments", [
    ("[engine]\nperiod = 16\n", ["period = 16", "allowed: an integer from 32 to 1024"]),
    ("[engine]\nperiod = = 3\n", ["not valid TOML"]),
    ('[[taps]]\nname = "x"\n[[taps]]\nname = "x"\n', ["tap names must be unique"]),
], ids=["range", "syntax", "cross-check"])
def test_cli_config_check_bad(tmp_path, text, fragments):
    path = write(tmp_path, text)
    r = echoel("config", "check", str(path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith(f"echoel: config error: {path}")
    assert "Traceback" not in r.stderr
    for fragment in fragments:
        assert fragment in r.stderr


def test_cli_config_check_unreadable(tmp_path):
    missing = tmp_path / "absent.toml"
    r = echoel("config", "check", str(missing))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"echoel: config error: {missing}: cannot read the config: "
                                "No such file or directory")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    r = echoel("config", "check", str(binary))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"echoel: config error: {binary}: ")
    assert "Traceback" not in r.stderr


def test_cli_config_keys():
    r = echoel("config", "keys")
    assert r.returncode == 0
    assert r.stdout.strip() == config.describe_keys()
    for section, keys in config.SCHEMA.items():
        assert section in r.stdout
        for key in keys:
            assert f"  {key} = " in r.stdout


def test_cli_run_with_a_bad_config_starts_nothing(tmp_path):
    instance = f"cfgtest-{uuid.uuid4().hex[:12]}"
    run_dir = tmp_path / "run"
    path = write(tmp_path, f'[daemon]\ninstance = "{instance}"\nrun_dir = "{run_dir}"\n'
                           "[engine]\nperiod = 2048\n")
    try:
        r = subprocess.run([ECHOEL, "run", "--config", str(path), "--duration", "1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"echoel: config error: {path} [engine]: period = 2048")
        assert "Traceback" not in r.stderr
        assert r.stdout == ""
        assert not run_dir.exists()
        assert sorted(Path("/dev/shm").glob(f"echoel.{instance}.*")) == []
    finally:
        for leftover in Path("/dev/shm").glob(f"echoel.{instance}.*"):
            leftover.unlink()
