"""`echoel run`: the daemon's main process around the engine process.

It validates the config, creates the engine's shared memory, starts and restarts the engine
process, reads its status block and rings, turns them into status, events and logs, answers
commands on the local bus, and speaks to systemd (READY, WATCHDOG, STATUS).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from echoel.daemon import bus, fleet_overlay
from echoel.daemon import config as config_mod
from echoel.daemon.engine_shared import (
    EV_DEVICE_LOST,
    EV_DEVICE_OPENED,
    EV_XRUN,
    EXIT_DEVICE_LOST,
    C,
    EngineShared,
    F,
    H,
    RingSizes,
    State,
)
from echoel.daemon.hist_stats import summary_us
from echoel.daemon.xrun_bursts import BurstTracker
from echoel.drivers import systemd_notify

log = logging.getLogger("echoel.supervisor")
MAX_STALL_MS = 5000
STUCK_S = 1.0  # no block for this long while running: the loop is stuck (watchdog stops)


def _db(x: float) -> float:
    return round(20 * math.log10(x), 1) if x > 1e-10 else -200.0


EVENTS_KEPT = 200  # the agent fetches missed events from here


class Supervisor:
    """Owns the engine process and everything the engine shares."""

    def __init__(self, cfg: config_mod.Config, config_path: str | None = None) -> None:
        self.base_cfg = cfg  # the file's config; the fleet's overlay goes on top of it
        self.cfg, self.fleet_version = fleet_overlay.effective(cfg)
        self.config_path = config_path
        self.modulated: dict[str, float] = {}  # live parameters moved by `modulate`
        self.instance = cfg["daemon"]["instance"]
        self.rdir = bus.run_dir(cfg["daemon"]["run_dir"])
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.reopens = 0  # engine processes replaced after an interface loss
        self._restart_at = 0.0
        self._backoff = 1.0
        self.ready_sent = False
        self._last_ping = 0.0
        self._prev = (time.monotonic_ns(), 0, 0)
        self.levels: dict = {}
        self.events: list[dict] = []  # recent events, newest last
        self.event_seq = 0  # events since this supervisor started (boot_id tells which)
        self.boot_id = f"{os.getpid()}-{time.time_ns()}"
        self.stopping = False
        self.started = time.monotonic()
        self.bursts = BurstTracker(cfg["daemon"]["xrun_burst_ms"] * 1_000_000)
        self._reload_requested = False
        self._missing_logged: dict = {}
        self._text_seen = -1
        self._problem_reported: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create shared memory and sockets, then start the engine process."""
        self._create_shared()
        self.ctx = zmq.Context.instance()
        pub_ep, ctl_ep = bus.endpoints(self.rdir)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(pub_ep)
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.setsockopt(zmq.MAXMSGSIZE, bus.MAX_REQUEST_BYTES)
        self.rep.bind(ctl_ep)
        self._spawn()
        systemd_notify.notify("STATUS=starting the audio engine")
        log.info("engine instance %r started; control at %s", self.instance, ctl_ep)

    def _spawn(self) -> None:
        path = self.rdir / f"engine-{self.instance}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cfg.data))
        os.replace(tmp, path)
        self.shared.control[C.STOP] = 0
        self.shared.fields[F.STATE] = State.STARTING
        self.shared.fields[F.MAIN_HEARTBEAT_NS] = time.monotonic_ns()
        env = dict(os.environ)
        env.setdefault("JACK_NO_START_SERVER", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "echoel.daemon.engine_process", "--config-json", str(path)],
            env=env)

    def _stop_engine(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        self.shared.control[C.STOP] = 1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("engine process %d did not stop within %.0f s; killing it",
                        self.proc.pid, timeout)
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the engine and release everything."""
        self.stopping = True
        systemd_notify.notify("STOPPING=1", "STATUS=stopping")
        self._stop_engine()
        self.pub.close()
        self.rep.close()
        EngineShared.remove(self.instance)

    def restart_engine(self, cfg: config_mod.Config | None = None) -> None:
        """Stop the engine process and start it again (with a new config, if given)."""
        self._stop_engine()
        self.modulated.clear()  # a new engine starts from the config's values
        if cfg is not None:
            self.cfg = cfg
            self._create_shared()  # ring shapes may differ with the new config
        self._spawn()

    def _create_shared(self) -> None:
        """(Re)create the engine's shared memory for the current config."""
        e = self.cfg["engine"]
        sizes = RingSizes(e["period"], e["channels_in"], e["channels_out"],
                          {t["name"]: (t["source"], t["slots"]) for t in self.cfg["taps"]},
                          tuple(s["name"] for s in self.cfg["streams"]
                                if s["direction"] == "receive"))
        EngineShared.remove(self.instance)
        self.shared = EngineShared.create(self.instance, sizes)
        self._prev = (time.monotonic_ns(), 0, 0)

    # ------------------------------------------------------------------ the main loop
    def run(self, duration: float | None = None, on_status=None) -> dict:
        """Serve until SIGTERM/SIGINT (or `duration` seconds); returns the final summary."""
        def on_signal(signum, frame):
            self.stopping = True

        def on_hup(signum, frame):
            self._reload_requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        interval = self.cfg["daemon"]["status_interval_ms"] / 1000.0
        end = None if duration is None else time.monotonic() + duration
        next_status = time.monotonic()
        status: dict = {}
        while not self.stopping and (end is None or time.monotonic() < end):
            self._serve(max(0.0, min(next_status - time.monotonic(), 0.05)))
            self._supervise_process()
            self._drain_events()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self._watchdog()
            if time.monotonic() >= next_status:
                next_status += interval
                status = self.status()
                self.pub.send_multipart([b"status", json.dumps(status).encode()])
                systemd_notify.notify("STATUS=" + status_line(status))
                if on_status:
                    on_status(status)
        summary = self.summary()
        self.stop()
        return summary

    def _serve(self, timeout: float) -> None:
        if self.rep.poll(int(timeout * 1000)):
            try:
                raw = self.rep.recv()
            except zmq.ZMQError:
                return
            try:
                reply = self.handle(json.loads(raw))
            except (ValueError, TypeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}. Send JSON like "
                         '{"cmd": "status"}'}
            self.rep.send(json.dumps(reply).encode())

    def _supervise_process(self) -> None:
        if self.proc is None or self.stopping:
            if self.proc is None and not self.stopping and time.monotonic() >= self._restart_at:
                self._spawn()
            return
        code = self.proc.poll()
        if code is None:
            if self.shared.fields[F.STATE] == State.RUNNING:
                self._backoff = 1.0
            return
        self.proc = None
        if code == EXIT_DEVICE_LOST:  # not a crash: a fresh engine looks for the interface
            self.reopens += 1
            self._restart_at = time.monotonic() + self.cfg["engine"]["rescan_ms"] / 1000.0
            return
        self.restarts += 1
        log.error("the engine process exited with code %s; restarting it in %.0f s "
                  "(restart %d). Its output above says why", code, self._backoff, self.restarts)
        self._event("engine_exited", code=code, restart_in_s=self._backoff)
        self._restart_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)

    def _event(self, kind: str, **data) -> None:
        self.event_seq += 1
        ev = {"event": kind, "time": time.time(), "seq": self.event_seq, **data}
        self.events = ([*self.events, ev])[-EVENTS_KEPT:]
        self.pub.send_multipart([b"event", json.dumps(ev).encode()])

    def _drain_events(self) -> None:
        ring = self.shared.rings["events"]
        rec = np.zeros(4, np.int64)
        while ring.pop(rec) is not None:
            kind, direction, t = int(rec[0]), int(rec[1]), int(rec[2])
            if kind == EV_XRUN:
                self.bursts.add(direction, t)
            elif kind == EV_DEVICE_OPENED:
                text = self.shared.read_text()
                log.info("audio interface opened: %s", text.get("device"))
                self._event("interface_found", device=text.get("device"))
            elif kind == EV_DEVICE_LOST:
                problem = self.shared.read_text().get("problem")
                log.warning("audio interface lost (%s); waiting for it to come back", problem)
                self._event("interface_lost", reason=problem)
        latency = self.latency_ms()
        for b in self.bursts.poll(time.monotonic_ns()):
            log.warning(b.describe(latency))
            self._event("xrun_burst", capture=b.capture, playback=b.playback,
                        span_ms=round((b.last_ns - b.first_ns) / 1e6, 1), latency_ms=latency)

    def progressing(self) -> bool:
        """True while the engine makes progress: blocks flow, or it is alive and searching."""
        f = self.shared.fields
        now = time.monotonic_ns()
        if self.proc is None or self.proc.poll() is not None:
            return False
        if f[F.STATE] == State.RUNNING:
            return now - int(f[F.HEARTBEAT_NS]) < STUCK_S * 1e9
        return now - int(f[F.MAIN_HEARTBEAT_NS]) < 2 * STUCK_S * 1e9

    def _watchdog(self) -> None:
        f = self.shared.fields
        if not self.ready_sent and f[F.STATE] == State.RUNNING and f[F.BLOCKS] > 0:
            self.ready_sent = True
            systemd_notify.notify("READY=1", "STATUS=audio flowing")
            log.info("audio flowing: %s", status_line(self.status()))
        version = int(f[F.TEXT_VERSION])
        if f[F.STATE] == State.SEARCHING and version != self._text_seen:
            self._text_seen = version
            problem = self.shared.read_text().get("problem")
            if problem and problem != self._problem_reported:
                self._problem_reported = problem
                self._event("interface_missing", reason=problem)
        elif f[F.STATE] == State.RUNNING:
            self._problem_reported = None
        if f[F.STATE] == State.RUNNING and version != self._text_seen:
            self._text_seen = version
            missing = self.shared.read_text().get("missing_guarantees") or {}
            if missing != self._missing_logged:
                self._missing_logged = missing
                for name, why in missing.items():
                    log.warning("real-time guarantee missing: %s: %s", name, why)
        every = systemd_notify.watchdog_interval()
        if every is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= every and self.progressing():
            systemd_notify.notify("WATCHDOG=1")
            self._last_ping = now

    # ------------------------------------------------------------------ status and commands
    def latency_ms(self) -> float:
        """Capture-to-playback latency the engine keeps: prefill x period."""
        e = self.cfg["engine"]
        return round(e["prefill"] * e["period"] * 1000.0 / e["rate"], 3)

    def _levels(self) -> dict:
        ring = self.shared.rings["meters"]
        e = self.cfg["engine"]
        cin, cout = e["channels_in"], e["channels_out"]
        ch = max(cin, cout)
        frame = np.zeros(ring.width, np.float32)
        peak_in, peak_out, ms_out, n = np.zeros(cin), np.zeros(cout), np.zeros(cout), 0
        while ring.pop(frame) is not None:
            m = frame[: 4 * ch].reshape(4, ch)
            peak_in = np.maximum(peak_in, m[0, :cin])
            peak_out = np.maximum(peak_out, m[2, :cout])
            ms_out += m[3, :cout]
            n += 1
        if n:
            self.levels = {
                "in_peak_dbfs": [_db(v) for v in peak_in],
                "out_peak_dbfs": [_db(v) for v in peak_out],
                "out_rms_dbfs": [_db(math.sqrt(v / n)) for v in ms_out],
            }
        return self.levels

    def status(self) -> dict:
        """The engine's state, as published on the bus and shown on the terminal."""
        f = self.shared.fields
        e = self.cfg["engine"]
        text = self.shared.read_text()
        now = time.monotonic_ns()
        blocks, dsp_sum = int(f[F.BLOCKS]), int(f[F.DSP_NS_SUM])
        _t0, b0, d0 = self._prev
        period_ns = e["period"] * 1e9 / e["rate"]
        dsp_load = (dsp_sum - d0) / ((blocks - b0) * period_ns) if blocks > b0 else 0.0
        self._prev = (now, blocks, dsp_sum)
        state = State(int(f[F.STATE])).name.lower()
        if self.proc is None or self.proc.poll() is not None:
            state = "restarting"
        last_xrun = int(f[F.LAST_XRUN_NS])
        return {
            "state": state,
            "instance": self.instance,
            "device": text.get("device"),
            "problem": text.get("problem"),
            "rate": e["rate"],
            "period": e["period"],
            "periods": e["periods"],
            "format": e["format"],
            "channels": {"in": e["channels_in"], "out": e["channels_out"]},
            "latency_ms": self.latency_ms(),
            "measured_latency_ms": round(int(f[F.LATENCY_FRAMES]) * 1000.0 / e["rate"], 3),
            "dsp_load_pct": round(100 * dsp_load, 2),
            "blocks": blocks,
            "xruns": {"capture": int(f[F.XRUN_CAPTURE]), "playback": int(f[F.XRUN_PLAYBACK])},
            "last_xrun_s_ago": round((now - last_xrun) / 1e9, 1) if last_xrun else None,
            "levels": self._levels(),
            "limiter_gr_db": round(int(f[F.LIMITER_GR_MDB]) / 1000.0, 2),
            "missing_guarantees": text.get("missing_guarantees", {}),
            "interface_losses": int(f[F.LOSSES]),
            "engine_pid": int(f[F.ENGINE_PID]),
            "engine_restarts": self.restarts,
            "engine_reopens": self.reopens,
            "params": {"applied": int(f[F.PARAMS_APPLIED]),
                       "rejected": int(f[F.PARAMS_REJECTED]),
                       "modulated": dict(self.modulated)},
            "tap_overflows": int(f[F.TAP_OVERFLOWS]),
            "returns": {"blocks": int(f[F.RETURN_BLOCKS]), "empty": int(f[F.RETURN_EMPTY])},
            "uptime_s": round(time.monotonic() - self.started, 1),
            "events": {"boot": self.boot_id, "seq": self.event_seq},
        }

    def summary(self) -> dict:
        """Figures over the whole run (for `--duration` runs and the benchmark)."""
        s = self.status()
        f, hist = self.shared.fields, self.shared.hist
        s["dsp"] = summary_us(hist[H.DSP], int(f[F.DSP_NS_MAX]))
        s["read_to_write"] = summary_us(hist[H.READ_TO_WRITE], int(f[F.R2W_NS_MAX]))
        s["wake_jitter"] = summary_us(hist[H.WAKE_JITTER], int(f[F.JITTER_NS_MAX]))
        s["recent_events"] = self.events[-10:]
        return s

    def handle(self, req: dict) -> dict:
        """Answer one command from the local bus."""
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise ValueError("a request is a JSON object with a string 'cmd'")
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "summary":
            return {"ok": True, "summary": self.summary()}
        if cmd == "config":
            return {"ok": True, "config": self.cfg.data}
        if cmd == "set":
            key, value = req.get("key"), req.get("value")
            if not isinstance(key, str):
                raise ValueError("'set' needs a string 'key' and a 'value'")
            return self.set_value(key, value)
        if cmd == "reload":
            return self.reload()
        if cmd == "events":
            since = req.get("since", 0)
            if isinstance(since, bool) or not isinstance(since, int):
                raise ValueError(f"'events' needs an integer 'since', got {since!r}")
            return {"ok": True, "boot": self.boot_id, "seq": self.event_seq,
                    "events": [e for e in self.events if e["seq"] > since]}
        if cmd == "apply":
            return self.apply_fleet(req.get("values"), req.get("version"))
        if cmd == "modulate":
            return self.modulate(req.get("values"))
        if cmd == "restart":
            return self.restart_service(req.get("service"))
        if cmd == "stall":
            return self.stall(req.get("ms"))
        if cmd == "probe":
            return self.probe()
        return {"ok": False, "error": f"unknown command {cmd!r}; allowed: status, summary, "
                "config, set, reload, apply, modulate, restart, events, stall, probe"}

    def probe(self, timeout: float = 2.0) -> dict:
        """Diagnostic: measure round-trip latency through a loopback (output wired to input).

        Mutes the output for a few periods and sends one impulse. Blocks the bus for up to
        `timeout` seconds (it is a technician's check, not something to run during a take).
        """
        ctl, f = self.shared.control, self.shared.fields
        if f[F.STATE] != State.RUNNING:
            return {"ok": False, "error": "probe: the engine is not running (state "
                    f"{State(int(f[F.STATE])).name.lower()})"}
        seq = int(ctl[C.PROBE_SEQ]) + 1
        ctl[C.PROBE_SEQ] = seq
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if int(f[F.PROBE_DONE_SEQ]) == seq:
                frames = int(f[F.PROBE_FRAMES])
                if frames < 0:
                    return {"ok": False, "error": "probe: the impulse did not come back; wire "
                            "output 1 to input 1 (a loopback) and try again"}
                e = self.cfg["engine"]
                return {"ok": True, "frames": frames,
                        "ms": round(frames * 1000.0 / e["rate"], 3),
                        "expected_frames": e["prefill"] * e["period"]}
            time.sleep(0.005)
        return {"ok": False, "error": f"probe: no answer from the audio thread in {timeout} s"}

    def stall(self, ms) -> dict:
        """Diagnostic: stall the audio thread once, to check xrun detection and recovery."""
        if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= MAX_STALL_MS:
            return {"ok": False, "error": f"stall: ms = {ms!r}: must be an integer from 1 to "
                    f"{MAX_STALL_MS}"}
        ctl = self.shared.control
        ctl[C.STALL_MS] = ms
        ctl[C.STALL_SEQ] += 1
        log.warning("diagnostic: stalling the audio thread for %d ms on request", ms)
        return {"ok": True, "stalled_ms": ms}

    def set_value(self, key: str, value) -> dict:
        """Change one setting: live parameters go through the ring, others restart the engine."""
        try:
            new = self.cfg.with_value(key, value)
        except config_mod.ConfigError as exc:
            log.warning("refused config change (the running config stays): %s", exc)
            return {"ok": False, "error": f"{exc} (the running config is unchanged)"}
        return self._apply(new)

    def modulate(self, values) -> dict:
        """Move live parameters for a while (bio-reactive mapping): the stored config stays.

        Every key must be a live chain parameter and every value within its range; all of
        them are checked before any is pushed. The engine glides to each value over
        chain.smoothing_ms, so a modulation never clicks. A later `set` or `reload` of the
        same key, or a modulation back to the configured value, ends it.
        """
        if not isinstance(values, dict) or not values:
            return {"ok": False, "error": "'modulate' needs 'values': an object of live "
                    "parameters, e.g. {\"chain.gain_db\": -3.0}"}
        dead = [k for k in values if not isinstance(k, str) or not config_mod.is_live(k)]
        if dead:
            return {"ok": False, "error": f"modulate: {dead[0]!r} is not a live parameter; "
                    "allowed: chain.gain_db, chain.eq.N.freq|gain_db|q, "
                    "chain.limiter.threshold_db|release_ms"}
        try:
            target = self.cfg.with_values(values, "modulation")
        except config_mod.ConfigError as exc:
            return {"ok": False, "error": f"modulate: {exc}"}
        slots = target.chain_spec().param_names()
        vals = target.chain_spec().initial_values()
        ring = self.shared.rings["params"]
        for k in values:
            if not ring.push(np.array([slots[k], vals[slots[k]]]), time.monotonic_ns()):
                return {"ok": False, "error": "parameter ring full: the engine is not taking "
                        "changes (is it running?); try again"}
        self.modulated.update((k, float(vals[slots[k]])) for k in values)
        return {"ok": True, "applied": "live", "modulated": sorted(values)}

    def reload(self) -> dict:
        """Re-read the config file; an invalid file is refused and the running config stays."""
        if not self.config_path:
            return {"ok": False, "error": "running on built-in defaults: no file to reload"}
        try:
            base = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            log.error("config reload refused, keeping the running config: %s", exc)
            return {"ok": False, "error": str(exc)}
        new, version = fleet_overlay.effective(base)
        res = self._apply(new)
        if res["ok"]:
            self.base_cfg, self.fleet_version = base, version
        return res

    def apply_fleet(self, values, version) -> dict:
        """Apply the fleet's desired config (all keys or none) and keep it for restarts."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            return {"ok": False, "error": f"version = {version!r}: must be a positive integer"}
        try:
            fleet_overlay.check_remote(values)
            new = self.base_cfg.with_values(values, f"fleet config v{version}")
        except config_mod.ConfigError as exc:
            log.warning("refused the fleet's config v%s (staying on v%s): %s", version,
                        self.fleet_version, exc)
            return {"ok": False, "error": str(exc), "version": self.fleet_version}
        res = self._apply(new)
        if res["ok"]:
            path = fleet_overlay.state_dir(self.base_cfg) / fleet_overlay.OVERLAY_NAME
            fleet_overlay.write(path, version, values)
            self.fleet_version = version
            log.info("fleet config v%d applied (%s)", version, res.get("applied"))
        res["version"] = self.fleet_version
        return res

    def restart_service(self, service) -> dict:
        """Restart a part of the stack on request ('engine': the audio engine process)."""
        if service != "engine":
            return {"ok": False, "error": f"service = {service!r}: allowed: 'engine'"}
        log.warning("restarting the audio engine on request")
        self.restart_engine()
        return {"ok": True, "restarted": "engine"}

    def _apply(self, new: config_mod.Config) -> dict:
        all_changed = self.cfg.changed_keys(new)
        if not all_changed:
            return {"ok": True, "applied": "nothing changed", "changed": []}
        # the fleet agent and the services read their own sections (a service takes a change
        # when it restarts); the engine does not need to hear of them
        own = ("agent", *config_mod.SERVICE_SECTIONS)
        changed = [k for k in all_changed if k.split(".", 1)[0] not in own]
        if not changed:
            self.cfg = new
            return {"ok": True, "applied": "service settings", "changed": all_changed}
        if new["daemon"]["instance"] != self.instance or \
                new["daemon"]["run_dir"] != self.cfg["daemon"]["run_dir"]:
            return {"ok": False, "error": "[daemon] instance and run_dir change only with a "
                    "restart of the service"}
        if all(config_mod.is_live(k) for k in changed):
            slots = new.chain_spec().param_names()
            values = new.chain_spec().initial_values()
            ring = self.shared.rings["params"]
            for k in changed:
                self.modulated.pop(k, None)
                if not ring.push(np.array([slots[k], values[slots[k]]]), time.monotonic_ns()):
                    return {"ok": False, "error": "parameter ring full: the engine is not "
                            "taking changes (is it running?); try again"}
            self.cfg = new
            log.info("live change: %s", ", ".join(changed))
            return {"ok": True, "applied": "live", "changed": all_changed}
        log.info("config change needs the stream reopened (%s): restarting the engine",
                 ", ".join(changed))
        self.restart_engine(new)
        return {"ok": True, "applied": "engine restarted", "changed": all_changed}


def status_line(s: dict) -> str:
    """One line of state, for STATUS= and logs."""
    if s.get("state") != "running":
        return f"{s.get('state')}: {s.get('problem') or 'waiting'}"
    dev = s.get("device") or {}
    miss = s.get("missing_guarantees") or {}
    return (f"running {dev.get('capture')}->{dev.get('playback')} {s['rate']} Hz "
            f"period {s['period']} latency {s['latency_ms']:.2f} ms dsp {s['dsp_load_pct']:.1f}% "
            f"xruns {s['xruns']['capture']}/{s['xruns']['playback']}"
            + (f" missing: {','.join(miss)}" if miss else ""))


def write_summary(path: str | Path, summary: dict) -> None:
    """Save a summary as JSON."""
    Path(path).write_text(json.dumps(summary, indent=2))
