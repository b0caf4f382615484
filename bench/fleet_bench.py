"""`python bench/fleet_bench.py [--quick]`: the fleet link under load (issue 5).

Simulated boxes (bench/fleet_sim.py: mutual TLS, MQTT 5, the agent's messages and its
confirmation protocol) against a real mosquitto; on the same broker and publishers, one after
the other in the same run:

- the broker's ceiling: a bare subscriber (paho, 2 clients in a shared subscription) that
  stores nothing and counts (the boxes then settle on the broker's PUBACK);
- the fleet service (`echoel fleet serve`, 2 workers, its own process) storing in SQLite, then
  in PostgreSQL (a private cluster, tests/fleet_rig.PgServer).

Per box count (full: 1,000 and 10,000; quick: 200, bare and SQLite) and per sink, three cases:
`every 10 s` (each box reports every 10 s, +-10 % jitter, phases at random; measured from
WARMUP_S after the sink subscribed), `bursts` (every box at the same instant, twice, 10 s
apart) and `backlog` (the sink stops, its sessions kept; every box sends several reports, the
broker queues them; the sink starts again and drains them: its own ceiling, whatever the
publishers can do). A case ends when the fleet service confirmed every report to its box (or
the broker acknowledged it, for the bare subscriber) and the sink has them all; then:

- messages per second stored: steady, over the window; bursts, per burst from its start to
  its last report stored; backlog, from the first to the last stored;
- lag from publish (the box's `ts` in the payload) to stored (the store's `received`, stamped
  when the batch's transaction starts) or to arrival (bare subscriber): p50, p99, max; and to
  the service's confirmation arriving at the box;
- lost: reports the boxes made (per box seq range) that the sink does not have; devices whose
  `last_telemetry` is not their newest stored report;
- CPU (% of one core) and peak RSS of the sink's process, CPU of the database server and the
  broker (from /proc), and how much of the 2 cores other processes used meanwhile (the machine
  is shared: figures move with it).

Goals: 10,000 boxes every 10 s with p99 lag under 1 s; the service's backlog throughput within
2x of the bare subscriber's. It reports; it never fails on the figures.
Results: bench/results/fleet.json (`--out` for another file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):  # run as a script: make `bench.` and `tests.` importable
    sys.path.insert(0, str(ROOT))

from echoel.fleet.broker_process import Broker  # noqa: E402
from echoel.provisioning.pki import FleetPki  # noqa: E402

from bench.bench_all import write_json  # noqa: E402
from bench.fleet_sim import (  # noqa: E402
    SERVICE,
    WINDOW,
    BareSubscriber,
    SimFleet,
    Window,
    ensure_pki,
    raise_nofile,
)

GROUP = "fleet"
PERIOD_S = 10.0
LAG_GOAL_S = 1.0
THROUGHPUT_GOAL = 2.0  # the service within this factor of the bare subscriber
WORKERS = 2
# a subscriber that has just subscribed gets nothing for ~1.4 s at 10,000 boxes (the bare paho
# subscriber too, clean or persistent session): the steady windows start after this
WARMUP_S = 3.0
BARE = "bare subscriber"
SINKS = ("bare", "sqlite", "postgresql")
SERVICE_MAIN = ["-m", "echoel.daemon.cli"]  # `echoel`, as installed
OUT = HERE / "results" / "fleet.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Case:
    """One measuring window: steady reports, aligned bursts, or a backlog drained."""

    kind: str  # "steady", "bursts", "backlog"
    seconds: float = 0.0  # steady: how long
    bursts: int = 0  # bursts: how many, PERIOD_S apart
    per_box: int = 1  # backlog: reports per box queued at the broker while the sink is down
    period: float = PERIOD_S  # steady: the report period; bursts: the time between them
    warmup_s: float = 0.0  # steady: reporting before the measured window

    def label(self, n: int) -> str:
        """The row's case text."""
        if self.kind == "steady":
            return f"{n} boxes, every {self.period:g} s"
        if self.kind == "bursts":
            return f"{n} boxes, bursts (all at once, every {self.period:g} s)"
        return f"{n} boxes, backlog ({self.per_box}/box queued while the sink was down)"


def plan(n: int, quick: bool) -> list[Case]:
    """The cases for `n` boxes (the backlog last: it stops and restarts the sink)."""
    if quick:
        return [Case("steady", seconds=PERIOD_S, warmup_s=PERIOD_S / 2), Case("bursts", bursts=1),
                Case("backlog", per_box=min(WINDOW, max(1, 5000 // n)))]
    return [Case("steady", seconds=30.0 if n >= 5000 else 20.0, warmup_s=PERIOD_S),
            Case("bursts", bursts=2), Case("backlog", per_box=min(WINDOW, max(2, 20000 // n)))]


# ---------------------------------------------------------------------- /proc figures
def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process in MB."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out["VmRSS"] / 1024.0, out["VmHWM"] / 1024.0


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals) - idle) / CLK_TCK, sum(vals) / CLK_TCK


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of several processes."""
    return sum(proc_cpu_s(p) for p in pids)


def family_cpu_s(pid: int | None) -> dict[int, float]:
    """CPU seconds of a process and its children (a database server and its backends)."""
    if pid is None:
        return {}
    out = {pid: proc_cpu_s(pid)}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out[int(d)] = proc_cpu_s(int(d))
    return out


@dataclass
class CpuMark:
    """CPU seconds so far of everything a window involves, and of the whole machine."""

    sink: float
    broker: float
    sims: float
    db: dict[int, float]
    busy: tuple[float, float]

    @classmethod
    def now(cls, sink: Any, broker_pid: int, fleet: SimFleet) -> CpuMark:
        """Read them all."""
        return cls(proc_cpu_s(sink.pid), proc_cpu_s(broker_pid), tree_cpu_s(fleet.pids),
                   family_cpu_s(sink.db_pid), machine_busy_s())

    def since(self, before: CpuMark, wall: float) -> dict[str, float]:
        """% of one core each used between `before` and this mark; 'others': the rest of the
        machine (other people's processes on this shared machine)."""
        db = sum(v - before.db.get(pid, 0.0) for pid, v in self.db.items())
        ours = {"sink": self.sink - before.sink, "broker": self.broker - before.broker,
                "simulators": self.sims - before.sims, "database": db}
        machine = self.busy[0] - before.busy[0]
        out = {k: 100.0 * v / wall for k, v in ours.items()}
        out["others"] = max(0.0, 100.0 * (machine - sum(ours.values())) / wall)
        return out


# ---------------------------------------------------------------------- sinks
@dataclass
class Samples:
    """What a sink has of one window: per telemetry message its box ts and stored time."""

    ts: np.ndarray
    stored: np.ndarray
    keys: list[tuple[str, int]]  # (device, seq), for the loss check (empty: not kept)
    unique: int


class StoreSink:
    """`echoel fleet serve` in its own process, and a reader of its store."""

    def __init__(self, name: str, pki: FleetPki, port: int, db: str, folder: Path,
                 main: list[str] | None = None, db_pid: int | None = None) -> None:
        self.name = name
        self.db_pid = db_pid  # the database server's main process (PostgreSQL), if any
        self.db = db
        self.pg = db.startswith("postgresql://")
        self._conn: Any = None
        crt, key = pki.paths("service", SERVICE)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = folder / f"fleet-{name}.toml"
        cfg.write_text(f'[fleet]\ndb = "{db}"\nbroker_host = "127.0.0.1"\n'
                       f'broker_port = {port}\nca_file = "{pki.ca_cert_path}"\n'
                       f'cert_file = "{crt}"\nkey_file = "{key}"\nworkers = {WORKERS}\n')
        self.log_path = folder / f"service-{name}.log"
        self.log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *(main or SERVICE_MAIN), "fleet",
                                          "--fleet-config", str(cfg), "serve"], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 180.0  # a cold numba cache makes `echoel` slow to start
        while self.log().count("connected (session") < WORKERS:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"fleet service ({name}) did not connect its {WORKERS} "
                                   f"workers: {self.log()[-1500:]}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The service's process id."""
        return self.proc.pid

    def log(self) -> str:
        """This run's log so far (the file gathers every start of the same sink)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_from)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _query(self, q: str, params: tuple) -> list[tuple]:
        if self._conn is None:
            if self.pg:
                import psycopg

                self._conn = psycopg.connect(self.db, autocommit=True)
            else:
                self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        if self.pg:
            q = q.replace("?", "%s")
        return list(self._conn.execute(q, params).fetchall())

    def mark(self) -> None:
        """Nothing to forget: windows are told apart by the box ts."""

    def stale_last(self) -> int:
        """Devices whose `last_telemetry` is not their newest stored report."""
        seq = "(last_telemetry::json->>'seq')::bigint" if self.pg else \
            "json_extract(last_telemetry, '$.seq')"
        return int(self._query(f"SELECT count(*) FROM devices d WHERE last_telemetry IS NOT "
                               f"NULL AND {seq} < (SELECT max(seq) FROM telemetry t WHERE "
                               "t.device = d.id)", ())[0][0])

    def count_since(self, t0: float) -> int:
        """Telemetry rows published at or after t0."""
        return int(self._query("SELECT count(*) FROM telemetry WHERE ts >= ?", (t0,))[0][0])

    def samples(self, t0: float) -> Samples:
        """Every telemetry row published at or after t0."""
        rows = self._query("SELECT ts, received, device, seq FROM telemetry WHERE ts >= ?",
                           (t0,))
        return Samples(np.array([r[0] for r in rows], float),
                       np.array([r[1] for r in rows], float),
                       [(r[2], int(r[3])) for r in rows], len(rows))

    def stop(self) -> None:
        """SIGTERM the service (it stores what is queued), close the reader."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BareSink:
    """The reference: a bare subscriber, counting."""

    name = BARE
    db_pid = None

    def __init__(self, pki: FleetPki, port: int) -> None:
        self.sub = BareSubscriber(pki, port, WORKERS, persistent=True)

    @property
    def pid(self) -> int:
        """The subscriber's process id."""
        return self.sub.pid

    def mark(self) -> None:
        """Forget what was received so far."""
        self.sub.mark()

    def stale_last(self) -> int:
        """Nothing stored: nothing stale."""
        return 0

    def count_since(self, t0: float) -> int:
        """Telemetry received since the mark (or the start), published at or after t0."""
        return self.sub.count(t0)

    def samples(self, t0: float) -> Samples:
        """Telemetry received since the mark and published at or after t0 (box ts, arrival)."""
        f = self.sub.figures()
        ts, recv = np.array(f["ts"], float), np.array(f["recv"], float)
        keep = ts >= t0
        return Samples(ts[keep], recv[keep], [], f["unique"] - int((~keep).sum()))

    def stop(self) -> None:
        """End the subscriber."""
        self.sub.stop()


def clear_sessions(pki: FleetPki, port: int, prefix: str) -> None:
    """End the workers' persistent sessions (client ids PREFIX-w0...; else the broker keeps
    queueing for them)."""
    from echoel.drivers.mqtt_tls import BrokerLink, make_client

    crt, key = pki.paths("service", SERVICE)
    link = BrokerLink("127.0.0.1", port, str(pki.ca_cert_path), str(crt), str(key))
    for k in range(WORKERS):
        c = make_client(link, f"{prefix}-w{k}")
        c.connect(link.host, link.port, 10, clean_start=True)  # session expiry 0
        c.loop_start()
        end = time.monotonic() + 10.0
        while not c.is_connected() and time.monotonic() < end:
            time.sleep(0.02)
        c.disconnect()
        c.loop_stop()


# ---------------------------------------------------------------------- one window
def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


def run_case(fleet: SimFleet, sink: Any, case: Case, broker_pid: int,
             log: Callable[[str], None], stored_wait_s: float = 300.0) -> dict:
    """Run one window against one sink; its figures. Steady: the boxes report for
    `case.warmup_s` first (each box's first report creates its row in the store), then for
    `case.seconds` measured."""
    t_warm = time.time()
    sink.mark()
    if case.kind == "steady" and case.warmup_s > 0:
        fleet.steady(case.period, 0.1)
        time.sleep(case.warmup_s)
    t_mark = time.time()
    fleet.mark()
    cpu0 = CpuMark.now(sink, broker_pid, fleet)
    w0 = time.monotonic()
    starts: list[float] = []  # bursts: when each began
    if case.kind == "steady":
        if case.warmup_s <= 0:
            fleet.steady(case.period, 0.1)
        time.sleep(case.seconds)
        drained = fleet.pause(120.0)
    else:
        for k in range(case.bursts):
            if k:
                time.sleep(max(0.0, w0 + k * case.period - time.monotonic()))
            starts.append(time.time())
            fleet.burst(1)
        drained = fleet.drain(120.0)
    sent_s = time.monotonic() - w0
    win: Window = fleet.window(drained)
    _wait_stored(sink, t_mark, win.made, stored_wait_s)
    wall = time.monotonic() - w0
    out = _figures(fleet, sink, case, win, t_mark, sent_s, wall, cpu0, broker_pid, log, starts)
    if case.kind == "steady" and case.warmup_s > 0:
        w = sink.samples(t_warm)
        first = w.ts < t_mark
        out["warmup_lag_s"] = {"p99": _pct(w.stored[first] - w.ts[first], 99),
                               "max": float((w.stored[first] - w.ts[first]).max())
                               if first.any() else None}
    return out


def run_backlog(fleet: SimFleet, make_sink: Callable[[], Any], case: Case, broker_pid: int,
                log: Callable[[str], None], stored_wait_s: float = 300.0) -> dict:
    """With the sink down (its sessions kept), every box sends `case.per_box` reports; the
    broker queues them; then the sink starts and drains the queue: its own ceiling, whatever
    the publishers can do. Returns the window's figures (throughput: first to last stored)."""
    t_mark = time.time()
    fleet.mark()
    w0 = time.monotonic()
    fleet.burst(case.per_box)
    if not fleet.flushed(300.0):
        raise RuntimeError("backlog: the broker did not acknowledge every report in 300 s")
    sent_s = time.monotonic() - w0
    sink = make_sink()
    try:
        cpu0 = CpuMark.now(sink, broker_pid, fleet)
        w1 = time.monotonic()
        drained = fleet.drain(stored_wait_s)
        win: Window = fleet.window(drained)
        _wait_stored(sink, t_mark, win.made, stored_wait_s)
        return _figures(fleet, sink, case, win, t_mark, sent_s, time.monotonic() - w1, cpu0,
                        broker_pid, log)
    finally:
        sink.stop()


def _wait_stored(sink: Any, t0: float, n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while sink.count_since(t0) < n and time.monotonic() < end:
        time.sleep(0.25)


def _figures(fleet: SimFleet, sink: Any, case: Case, win: Window, t_mark: float,
             sent_s: float, wall: float, cpu0: CpuMark, broker_pid: int,
             log: Callable[[str], None], starts: list[float] | None = None) -> dict:
    cpu = CpuMark.now(sink, broker_pid, fleet).since(cpu0, max(wall, 1e-9))
    s = sink.samples(t_mark)
    lag = s.stored - s.ts
    span, rate, drains = None, None, []
    slices = []  # steady: lag p99 per 5 s of publishing (does it settle, or grow?)
    if s.ts.size and case.kind == "steady":
        rate = s.ts.size / case.seconds
        k = ((s.ts - t_mark) // 5.0).astype(int)
        slices = [round(float(np.percentile(lag[k == i], 99)), 4) for i in range(k.max() + 1)
                  if (k == i).any()]
    elif s.ts.size and case.kind == "backlog":  # its drain: first to last stored
        span = float(s.stored.max() - s.stored.min())
        rate = s.ts.size / span if span > 0 else None
    elif s.ts.size and starts:  # each burst: its start to its last message stored
        edges = [*starts[1:], np.inf]
        for t0, t1 in zip(starts, edges, strict=True):
            sel = (s.ts >= t0) & (s.ts < t1)
            if sel.any():
                drains.append(float(s.stored[sel].max() - t0))
        counts = [int(((s.ts >= t0) & (s.ts < t1)).sum()) for t0, t1 in
                  zip(starts, edges, strict=True)]
        rate = sum(counts) / sum(drains) if drains and sum(drains) > 0 else None
    lost = _lost(win, s)
    stale = sink.stale_last()
    rss, peak = proc_mem_mb(sink.pid)
    b_rss, b_peak = proc_mem_mb(broker_pid)
    out = {
        "sink": sink.name, "case": case.kind, "boxes": fleet.n, "made": win.made,
        "published": win.published, "acked": win.acked, "confirmed": win.confirmed,
        "resent": win.resent, "rejected": win.rejected, "drained": win.drained,
        "stored": int(s.ts.size), "unique": s.unique, "lost": lost, "stale_last": stale,
        "complete": s.unique >= win.made, "send_s": round(sent_s, 3), "wall_s": round(wall, 3),
        "offered_msg_s": win.made / max(sent_s, 1e-9),
        "stored_msg_s": rate, "span_s": span, "burst_drain_s": drains,
        "lag_s": {"p50": _pct(lag, 50), "p99": _pct(lag, 99),
                  "max": float(lag.max()) if lag.size else None, "p99_per_5s": slices},
        "puback_ms": {"p50": _ms(_pct(np.array(win.ack_lat_s), 50)),
                      "p99": _ms(_pct(np.array(win.ack_lat_s), 99))},
        "confirm_lag_s": {"p50": _pct(np.array(win.confirm_lat_s), 50),
                          "p99": _pct(np.array(win.confirm_lat_s), 99)},
        "cpu_pct": cpu,
        "sink_rss_mb": rss, "sink_peak_rss_mb": peak, "broker_rss_mb": b_rss,
        "broker_peak_rss_mb": b_peak, "reconnects": win.reconnects,
        "broker_disconnects": win.broker_disconnects, "bytes_per_msg":
            win.bytes_out / max(win.published, 1),
    }
    log(f"  {sink.name:>18} {case.kind:<7} {out['stored']:>6}/{win.made} stored, "
        f"{_f(out['stored_msg_s'])} msg/s, lag p99 {_f(out['lag_s']['p99'])} s, "
        f"CPU sink {cpu['sink']:.0f}% db {cpu['database']:.0f}% broker {cpu['broker']:.0f}% "
        f"sims {cpu['simulators']:.0f}% others {cpu['others']:.0f}%, "
        f"lost {lost}")
    return out


def _ms(v: float | None) -> float | None:
    return None if v is None else 1000.0 * v


def _lost(win: Window, s: Samples) -> int:
    """Telemetry the boxes made in the window that the sink does not have: per box, its seq
    range against the seqs stored (store sinks), or the counts (the bare subscriber)."""
    if not s.keys:
        return max(0, win.made - s.unique)
    stored: dict[str, set[int]] = {}
    for device, seq in s.keys:
        stored.setdefault(device, set()).add(seq)
    lost = 0
    for device, (lo, hi) in win.boxes.items():
        have = stored.get(device, set())
        lost += sum(1 for q in range(lo, hi + 1) if q not in have)
    return lost


# ---------------------------------------------------------------------- rows
def _row(kernel: str, case: str, metric: str, ours: float | None, unit: str,
         reference: str = "", ref: float | None = None, goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric,
            "ours": None if ours is None else round(float(ours), 4), "reference": reference,
            "ref": None if ref is None else round(float(ref), 4), "unit": unit, "goal": goal,
            "met": met}


def _kernel(sink: str) -> str:
    if sink in ("bare", BARE):
        return BARE
    return f"fleet service ({sink.replace('-proto', ', prototype')})"


def rows_for(results: list[dict], cases: dict[str, Case]) -> list[dict]:
    """Benchmark rows from the windows' figures (the bare subscriber as the reference)."""
    rows = []
    bare = {(r["boxes"], r["case"]): r for r in results if r["sink"] == BARE}
    for r in results:
        kernel = _kernel(r["sink"])
        c = cases[f"{r['boxes']}/{r['case']}"]
        label = c.label(r["boxes"])
        b = bare.get((r["boxes"], r["case"])) if r["sink"] != BARE else None
        bname = f"{BARE} (paho, {WORKERS} clients, shared subscription)" if b else ""
        p99 = r["lag_s"]["p99"]
        goal, met = "", None
        if c.kind == "steady" and r["boxes"] >= 10000 and r["sink"] != BARE:
            goal, met = f"p99 < {LAG_GOAL_S:g} s", p99 is not None and p99 < LAG_GOAL_S \
                and r["complete"]
        if c.kind != "backlog":  # a backlog's lag is the time the sink was down
            rows.append(_row(kernel, label, "lag publish->stored p99", p99, "s", bname,
                             b and b["lag_s"]["p99"], goal, met))
            rows.append(_row(kernel, label, "lag publish->stored p50", r["lag_s"]["p50"], "s",
                             bname, b and b["lag_s"]["p50"]))
        goal, met = "", None
        if c.kind == "backlog" and b and b["stored_msg_s"] and r["stored_msg_s"]:
            goal = f"within {THROUGHPUT_GOAL:g}x of the bare subscriber"
            met = r["stored_msg_s"] * THROUGHPUT_GOAL >= b["stored_msg_s"]
        rows.append(_row(kernel, label, "msg/s stored", r["stored_msg_s"], "msg/s", bname,
                         b and b["stored_msg_s"], goal, met))
        if r["sink"] != BARE and c.kind != "backlog":
            rows.append(_row(kernel, label, "lag publish->confirmed at the box p99",
                             r["confirm_lag_s"]["p99"], "s"))
        if "warmup_lag_s" in r:
            wb = b and b.get("warmup_lag_s", {}).get("p99")
            rows.append(_row(kernel, label, "lag p99 in the first period (boxes first seen)",
                             r["warmup_lag_s"]["p99"], "s", bname if wb else "", wb))
        rows.append(_row(kernel, label, "lost (sent, not stored)", r["lost"], "msgs",
                         "messages the boxes sent", r["made"], "0",
                         r["lost"] == 0 and r["complete"]))
        if r["sink"] != BARE:
            rows.append(_row(kernel, label, "devices whose last_telemetry is not the newest",
                             r["stale_last"], "devices", "boxes", r["boxes"], "0",
                             r["stale_last"] == 0))
        rows.append(_row(kernel, label, "CPU of the sink process", r["cpu_pct"]["sink"],
                         "% of a core", bname, b and b["cpu_pct"]["sink"]))
        rows.append(_row(kernel, label, "peak RSS of the sink process",
                         r["sink_peak_rss_mb"], "MB", bname, b and b["sink_peak_rss_mb"]))
        if r["cpu_pct"]["database"]:
            rows.append(_row(kernel, label, "CPU of the database server",
                             r["cpu_pct"]["database"], "% of a core"))
        rows.append(_row(kernel, label, "CPU of the broker", r["cpu_pct"]["broker"],
                         "% of a core", bname, b and b["cpu_pct"]["broker"]))
    return rows


# ---------------------------------------------------------------------- the run
def _sink_factory(name: str, pki: FleetPki, port: int, n: int, root: Path,
                  pg: Any) -> Callable[[], Any]:
    """A function that starts the sink `name` (again, on the same store)."""
    if name == "bare":
        return lambda: BareSink(pki, port)
    kind = name
    db = pg.createdb(f"{name.replace('-', '_')}{n}") if kind == "postgresql" else \
        str(root / f"{name}-{n}.db")
    main = SERVICE_MAIN
    pid = int((pg.data / "postmaster.pid").read_text().split()[0]) if kind == "postgresql" \
        else None
    return lambda: StoreSink(name, pki, port, db, root / "svc", main, pid)


def run(quick: bool = False, log: Callable[[str], None] | None = None,
        details: dict | None = None, counts: list[int] | None = None,
        sinks: list[str] | None = None) -> list[dict]:
    """The fleet benchmark; rows (see the module's docstring). `details`, if given, gets the
    per-window figures and the machine's state; `counts` and `sinks` narrow the run."""
    say = log or (lambda m: None)
    counts = counts or ([200] if quick else [1000, 10000])
    sinks = sinks or (["bare", "sqlite"] if quick else ["bare", "sqlite", "postgresql"])
    for name in sinks:
        if name not in SINKS:
            raise ValueError(f"sink {name!r}: allowed: {', '.join(SINKS)}")
    info: dict[str, Any] = details if details is not None else {}
    info.update({"generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "quick": quick, "counts": counts, "sinks": sinks, "period_s": PERIOD_S,
                 "workers": WORKERS, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                 "windows": [], "connects": [], "errors": []})
    raise_nofile(max(counts) * 2 + 4096)
    t0 = time.monotonic()
    pki = ensure_pki(max(counts))
    say(f"certificates ready ({max(counts)} boxes) in {time.monotonic() - t0:.1f} s")
    root = Path(tempfile.mkdtemp(prefix="echfb", dir="/tmp"))
    pg = None
    rows: list[dict] = []
    cases: dict[str, Case] = {}
    try:
        for n in counts:
            broker = Broker(pki, root / f"broker-{n}")
            broker.start()
            fleet = None
            try:
                fleet = SimFleet(pki, broker.port, n, procs=2)
                c = fleet.connect()
                info["connects"].append({"boxes": n, **c})
                say(f"{n} boxes connected in {c['seconds']:.1f} s ({c['failed']} failed)")
                rows.append(_row("simulated boxes", f"{n} boxes", "connect (TLS, CONNECT, "
                                 "subscribe, birth)", c["seconds"], "s", goal="all connected",
                                 met=c["failed"] == 0))
                for name in sinks:
                    try:
                        if name.startswith("postgresql") and pg is None:
                            from tests.fleet_rig import PgServer

                            # its own folder: the postgres user must reach it
                            pg = PgServer(Path(tempfile.mkdtemp(prefix="echpg", dir="/tmp")))
                            pg.start()
                        make = _sink_factory(name, pki, broker.port, n, root, pg)
                        for case in plan(n, quick):
                            cases[f"{n}/{case.kind}"] = case
                        info["windows"] += measure_sink(fleet, name, make, plan(n, quick),
                                                        broker.proc.pid, say)
                    except Exception as exc:
                        info["errors"].append(f"{n} boxes, {name}: {type(exc).__name__}: "
                                              f"{exc}")
                        say(f"  {name}: FAILED: {exc}")
                        rows.append(_row(_kernel(name), f"{n} boxes", "run completed", 0.0, "",
                                         goal="completes", met=False))
                    finally:
                        clear_sessions(pki, broker.port, "bare" if name == "bare" else SERVICE)
            finally:
                if fleet is not None:
                    fleet.stop()
                broker.stop()
    finally:
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.root, ignore_errors=True)
        info["loadavg_end"] = os.getloadavg()
        shutil.rmtree(root, ignore_errors=True)
    return rows + rows_for(info["windows"], cases)


def measure_sink(fleet: SimFleet, name: str, make: Callable[[], Any], cases: list[Case],
                 broker_pid: int, say: Callable[[str], None]) -> list[dict]:
    """Every case against one sink (started by `make`); the windows' figures."""
    fleet.confirmations(name != "bare")  # the bare subscriber confirms nothing
    out = []
    sink = make()
    time.sleep(WARMUP_S)
    try:
        for case in cases:
            if case.kind == "backlog":
                sink.stop()  # its sessions stay: the broker queues for it
                sink = None
                out.append(run_backlog(fleet, make, case, broker_pid, say))
            else:
                out.append(run_case(fleet, sink, case, broker_pid, say))
    finally:
        if sink is not None:
            sink.stop()
    return out


# ---------------------------------------------------------------------- output
def _f(v: float | None) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.0f}" if abs(v) >= 100 or v.is_integer() else f"{v:.3g}"


def table(rows: list[dict]) -> str:
    """The rows as a terminal table."""
    head = ["kernel", "case", "metric", "ours", "ref", "unit", "goal", "met"]
    lines = [[r["kernel"], r["case"], r["metric"], _f(r["ours"]), _f(r["ref"]), r["unit"],
              r["goal"], "-" if r["met"] is None else "met" if r["met"] else "NOT met"]
             for r in rows]
    widths = [max([len(h)] + [len(x[i]) for x in lines]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    out.append(f"ref: the {BARE} (paho, {WORKERS} clients in a shared subscription, stores "
               "nothing) on the same broker and publishers, in the same run")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write bench/results/fleet.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="200 boxes, SQLite only (~1 min)")
    ap.add_argument("--boxes", type=int, nargs="+", help="box counts (default 1000 10000)")
    ap.add_argument("--sinks", nargs="+", choices=SINKS, help="default: all (quick: bare "
                    "sqlite)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    details: dict = {}
    rows = run(a.quick, say, details, a.boxes, a.sinks)
    print(table(rows))
    with contextlib.suppress(KeyboardInterrupt):
        write_json(a.out, {"rows": rows, "details": details})
    print(f"written: {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
