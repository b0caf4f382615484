"""The box's other services in `echoel demo` (`make run`): the live analysis, the
transcriber and the bio service (a simulated heart-rate sensor moving the gain), started as
their own processes, their figures shown in the live view from the local bus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from echoel.daemon import bus
from echoel.daemon import config as config_mod
from echoel.daemon.bio_service import bio_lines
from echoel.daemon.bus_listener import BusListener
from echoel.daemon.child_processes import stop_all

SERVICE_TAPS = ({"name": "analysis", "source": "output", "slots": 256},
                {"name": "notes", "source": "input", "slots": 512})
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"


def with_service_taps(cfg: config_mod.Config, taps=SERVICE_TAPS) -> config_mod.Config:
    """The config with the services' taps added (where they are not there)."""
    have = {t["name"] for t in cfg["taps"]}
    data = dict(cfg.data)
    data["taps"] = [*cfg["taps"], *(dict(t) for t in taps if t["name"] not in have)]
    return config_mod.validate(data, cfg.source)


def service_toml(cfg: config_mod.Config) -> str:
    """The keys a tap service needs, as TOML (engine shape, instance, run folder, taps)."""
    e, d = cfg["engine"], cfg["daemon"]
    lines = ["[engine]"] + [f"{k} = {e[k]!r}".replace("'", '"') for k in
                            ("rate", "period", "channels_in", "channels_out")]
    lines += ["[daemon]", f'instance = "{d["instance"]}"', f'run_dir = "{d["run_dir"]}"']
    for t in cfg["taps"]:
        lines += ["[[taps]]", f'name = "{t["name"]}"', f'source = "{t["source"]}"',
                  f'slots = {t["slots"]}']
    return "\n".join(lines) + "\n" + DEMO_BIO


# `make run` has no heart-rate strap: a simulated sensor (labelled SIMULATED everywhere) whose
# heart rate moves the gain a little (60 bpm: -3 dB ... 80 bpm: 0 dB), to show the path from
# the body to the sound; a real strap is configured with [bio] sensors = "ADDRESS or name"
DEMO_BIO = """[bio]
simulated = true
[[bio.mappings]]
source = "hr_bpm"
target = "chain.gain_db"
in_lo = 60.0
in_hi = 80.0
out_lo = -3.0
out_hi = 0.0
smoothing_s = 2.0
"""


def analysis_lines(s: dict | None) -> list[str]:
    """The live view's lines for the analysis status."""
    if not s:
        return ["  analysis starting (compiling its kernels the first time)"]
    lo, t, k = s["loudness"], s["tuner"] or {}, s["key"]

    def f(v, unit=""):
        return "-inf" if v is None else f"{v:.1f}{unit}"

    tuner = f"{t['note']} {t['cents']:+.0f} c ({t['f0_hz']:.1f} Hz)" if t.get("note") else "-"
    return [f"  loudness M {f(lo['momentary'])}  S {f(lo['short_term'])}  I "
            f"{f(lo['integrated'])} LUFS  LRA {f(lo['lra'])} LU  TP {f(lo['true_peak_dbtp'])}"
            " dBTP",
            f"  music    key {k['key'] or '-'} ({k['confidence']:.2f})  chord {s['chord']} "
            f"(-{s['chord_lag_s']:.1f} s)  tuner {tuner}"]


def notes_lines(s: dict | None) -> list[str]:
    """The live view's line for the transcriber."""
    if not s:
        return ["  notes    transcriber starting (loading the model)"]
    port = f"MIDI port '{s['midi_port']}'" if s["midi_port"] else "no MIDI port"
    lat = f"{s['latency_ms_p50']:.0f} ms" if s["latency_ms_p50"] is not None else "-"
    return [f"  notes    sounding {' '.join(s['sounding']) or '-'}  recent "
            f"{' '.join(s['recent'][-6:]) or '-'}  ({s['notes']} notes, onset->note-on p50 "
            f"{lat}, {s['dropped_windows']} windows dropped, {port})"]


class DemoServices:
    """Starts the tap services; `lines()` for the live view."""

    def __init__(self, folder: Path, cfg: config_mod.Config) -> None:
        self.folder = folder
        self.cfg = cfg
        self.procs: list[subprocess.Popen] = []
        self.listener = BusListener(bus.run_dir(cfg["daemon"]["run_dir"]), rescan_s=1.0)
        self.latest: dict[str, dict] = {}

    def start(self, midi_api: str = "jack") -> None:
        """Start the analyzer (analysis tap) and the transcriber (notes tap)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        toml = self.folder / "services.toml"
        toml.write_text(service_toml(self.cfg))
        logf = open(self.folder / "services.log", "ab")  # handed to the children
        for args in (["analyzer", "--config", str(toml)],
                     ["bio", "run", "--config", str(toml)],
                     ["transcriber", "--config", str(toml), "--store", str(MODELS),
                      "--midi", midi_api, "--smf", str(self.folder / "notes.mid")]):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli",
                                                *args], stdout=logf, stderr=subprocess.STDOUT))
        logf.close()

    def lines(self) -> list[str]:
        """Lines from the services' latest status."""
        for topic, doc in self.listener.poll():
            if topic.startswith("status."):
                self.latest[topic[7:]] = doc
        return analysis_lines(self.latest.get("analysis")) + \
            notes_lines(self.latest.get("transcriber")) + bio_lines(self.latest.get("bio"))

    def stop(self) -> None:
        """Stop the services."""
        stop_all(self.procs)
        self.listener.close()
