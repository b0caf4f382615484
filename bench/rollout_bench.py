"""Rollout benchmark: one release rolled out (stages 1, 10, 50, 100 %) across simulated boxes
(bench/update_sim.py: real MQTT 5 over mutual TLS to a real mosquitto) by the fleet service with
its rollout worker (own process; SQLite, and PostgreSQL in the full run: tests/fleet_rig's
private cluster).

Measured in the same run:
- time from `rollout start` to every box healthy, beside the floor the boxes themselves impose:
  the sum over stages of the slowest box's own update time (command to healthy, as the box
  timed it). The difference is what the fleet adds (polling, stage gating, ingest);
- the fleet service's CPU (% of one core) and memory (RSS) during the rollout, beside the same
  service with the same boxes sending only their telemetry (every 10 s, the agent's default);
- correctness: boxes healthy, update events stored beside the events the boxes sent.

1,000 boxes (quick: 100 on SQLite, with shorter update steps).
`python bench/rollout_bench.py [--quick] [--boxes N] [--store sqlite|postgresql]`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `bench.` and `tests.` importable
    sys.path.insert(0, str(ROOT))

from echoel.fleet import releases  # noqa: E402
from echoel.fleet.broker_process import Broker  # noqa: E402
from echoel.fleet.rollout import RolloutBook, stage_sizes  # noqa: E402
from echoel.fleet.store import FleetStore  # noqa: E402

from bench.bench_all import table  # noqa: E402
from bench.fleet_sim import SERVICE, ensure_pki, raise_nofile  # noqa: E402
from bench.update_sim import UpdateFleet  # noqa: E402
from tests.fleet_rig import wait_for  # noqa: E402

GROUP = "bench"
STAGES = "1,10,50,100%"
TELEMETRY_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) / 1024.0
    return out


def _row(kernel: str, case: str, metric: str, ours: float, reference: str, ref: float | None,
         unit: str, goal: str = "", met: bool | None = None) -> dict:
    return {"group": "fleet rollout", "kernel": kernel, "case": case, "metric": metric,
            "ours": float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


def measure(n: int, quick: bool, say=lambda m: None, store_kind: str = "sqlite") -> dict:
    """Run one rollout over `n` boxes (store: sqlite or postgresql); the raw figures."""
    steps = {"dl_s": 0.4, "install_s": 0.2, "reboot_s": 0.5} if quick else \
        {"dl_s": 3.0, "install_s": 1.0, "reboot_s": 2.0}
    idle_s = 6.0 if quick else 30.0
    raise_nofile(n * 2 + 1024)
    pki = ensure_pki(n)
    root = Path(tempfile.mkdtemp(prefix="echrb", dir="/tmp"))
    broker = Broker(pki, root / "broker")
    proc = None
    sims = None
    store = None
    pg = None
    out: dict[str, Any] = {"step_ms": (None, None)}
    log = root / "service.log"
    try:
        broker.start()
        if store_kind == "postgresql":
            from tests.fleet_rig import PgServer

            pg = PgServer()
            db = pg.start()
        else:
            db = str(root / "fleet.db")
        crt, key = pki.paths("service", SERVICE)
        cfg = root / "fleet.toml"
        cfg.write_text(f'[fleet]\ndb = "{db}"\nbroker_host = "127.0.0.1"\n'
                       f'broker_port = {broker.port}\nca_file = "{pki.ca_cert_path}"\n'
                       f'cert_file = "{crt}"\nkey_file = "{key}"\nworkers = 2\n')
        with open(log, "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli", "fleet",
                                     "--fleet-config", str(cfg), "serve"], stdout=logf,
                                    stderr=subprocess.STDOUT)
        wait_for(lambda: log.read_bytes().count(b"connected (session") >= 2 or
                 proc.poll() is not None, 120.0, what="the fleet service")
        if proc.poll() is not None:
            raise RuntimeError(f"the fleet service exited: {log.read_text()[-1500:]}")
        sims = UpdateFleet(pki, broker.port, n, procs=2, group=GROUP, **steps)
        c = sims.connect(600.0)
        if c["up"] != n:
            raise RuntimeError(f"simulated boxes that did not connect: {c}")
        sims.steady(TELEMETRY_S)
        store = FleetStore(db)
        wait_for(lambda: len(store.devices(GROUP)) == n, 120.0,
                 what=f"{n} boxes in the store")
        say(f"{n} boxes up; telemetry only for {idle_s:g} s")
        time.sleep(min(TELEMETRY_S, idle_s))  # the first telemetry round is in
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        time.sleep(idle_s)
        idle = {"cpu_pct": 100.0 * (cpu_s(proc.pid) - c0) / (time.monotonic() - t0),
                "rss_mb": mem_mb(proc.pid)["VmRSS"]}
        releases.add(store, releases.Release("2026.12.0", "system",
                                             "https://updates.example/2026.12.0.raucb",
                                             512 << 20, "c" * 64))
        book = RolloutBook(store)
        c0, t0, w0 = cpu_s(proc.pid), time.monotonic(), time.time()
        rid = book.create("2026.12.0", GROUP, STAGES, 0)
        say(f"rollout {rid} started")
        st = wait_for(lambda: (s := book.status(rid))["state"] != "running" and s,
                      600.0, 0.1, what="the rollout to end")
        secs = time.monotonic() - t0
        roll = {"cpu_pct": 100.0 * (cpu_s(proc.pid) - c0) / secs, "cpu_s": cpu_s(proc.pid) - c0,
                "rss_mb": mem_mb(proc.pid)["VmRSS"], "hwm_mb": mem_mb(proc.pid)["VmHWM"]}
        say(f"rollout {rid}: {st['state']} in {secs:.1f} s: {st['counts']}")
        say("stage starts: " + ", ".join(f"{k} {v - w0:.1f} s" for k, v in sorted(
            ((e["new"], e["ts"]) for e in book.log(rid, limit=1 << 30)
             if e["device"] is None), key=lambda kv: kv[1])))
        boxes = sims.updates()
        devs = book.assignments(rid)
        floor = 0.0
        done_at = {e["new"]: e["ts"] for e in book.log(rid, limit=1 << 30)
                   if e["device"] is None}
        lags = []  # per stage: the stage marked done after its last box's healthy report
        for k in range(len(st["stages"])):
            times = [boxes[d]["t_final"] - boxes[d]["t_job"] for d, a in devs.items()
                     if a.stage == k and boxes[d]["t_final"] > boxes[d]["t_job"] > w0]
            floor += max(times, default=0.0)
            members = [d for d, a in devs.items() if a.stage == k]
            if not members or f"stage {k + 1} done" not in done_at:
                continue
            last_dev = max(members, key=lambda d: boxes[d]["t_final"])
            last = boxes[last_dev]["t_final"]
            with store.tx() as cur:
                received = cur.execute("SELECT MAX(received) FROM events WHERE device = ? AND "
                                       "kind = 'update'", (last_dev,)).fetchone()[0]
            done = done_at[f"stage {k + 1} done"]
            lags.append((done - last, (received or done) - last, done - (received or done)))
        with store.tx() as cur:
            stored = int(cur.execute("SELECT count(*) FROM events WHERE kind = 'update'")
                         .fetchone()[0])
        out.update({"n": n, "store": store_kind, "secs": secs, "floor": floor, "lags": lags,
                "state": st["state"],
                "counts": st["counts"], "stages": len(st["stages"]), "idle": idle,
                "roll": roll, "stored_events": stored,
                "sent_events": sum(b["events"] for b in boxes.values()),
                "software": sum(b["software"] == "2026.12.0" for b in boxes.values()),
                "sizes": stage_sizes(n, [1.0, 10.0, 50.0, 100.0])})
    finally:
        if sims is not None:
            sims.stop()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            steps = [ln for ln in log.read_text(errors="replace").splitlines()
                     if "rollout worker steps:" in ln]
            m = re.search(r"median ([\d.]+) ms, max ([\d.]+) ms", steps[-1]) if steps \
                else None
            if m:
                out["step_ms"] = (float(m.group(1)), float(m.group(2)))
        if store is not None:
            store.close()
        broker.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def rows_of(m: dict) -> list[dict]:
    """Benchmark rows from measure()'s figures."""
    n = m["n"]
    store = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[m["store"]]
    case = f"{n} boxes, {store}, stages {STAGES} ({'/'.join(map(str, m['sizes']))})"
    per_stage = (m["secs"] - m["floor"]) / m["stages"]
    extra_cpu_s = m["roll"]["cpu_s"] - m["idle"]["cpu_pct"] / 100.0 * m["secs"]
    healthy = m["counts"].get("healthy", 0)
    worst = max(m["lags"], default=(0.0, 0.0, 0.0))
    return [
        _row("rollout worker", case, "time start to all healthy", m["secs"],
             "boxes' own update time, slowest per stage, summed", m["floor"], "s",
             "fleet adds <= 2 s per stage", per_stage <= 2.0),
        _row("rollout worker", case, "fleet overhead per stage", per_stage, "", None, "s",
             "<= 2 s (poll 1 s)", per_stage <= 2.0),
        _row("rollout worker", case, "last healthy report to stage done, worst stage",
             worst[0], "", None, "s", "<= 2 s (ingest + poll 1 s)", worst[0] <= 2.0),
        _row("ingest", case, "that report: box to store (worst stage)", worst[1], "", None,
             "s"),
        _row("rollout worker", case, "that report: store to stage done (worst stage)",
             worst[2], "", None, "s", "<= 1.5 s (poll 1 s)", worst[2] <= 1.5),
        _row("rollout worker", case, "worker step (load, plan, store, send), median",
             m["step_ms"][0] or 0.0, "", None, "ms"),
        _row("rollout worker", case, "worker step, max", m["step_ms"][1] or 0.0, "", None,
             "ms", "< 1000 ms (the poll period)", (m["step_ms"][1] or 1e9) < 1000.0),
        _row("fleet service", case, "CPU during the rollout", m["roll"]["cpu_pct"],
             f"same service, telemetry only (every {TELEMETRY_S:g} s)", m["idle"]["cpu_pct"],
             "% of one core"),
        _row("fleet service", case, "CPU per box updated (beyond telemetry)",
             1000.0 * extra_cpu_s / n, "", None, "ms"),
        _row("fleet service", case, "RSS peak during the rollout", m["roll"]["hwm_mb"],
             "RSS with telemetry only", m["idle"]["rss_mb"], "MB"),
        _row("rollout worker", case, "boxes healthy on the release", healthy,
             "boxes running the release (their own account)", m["software"], "boxes",
             "all", healthy == n == m["software"] and m["state"] == "completed"),
        _row("ingest", case, "update events stored", m["stored_events"],
             "update events the boxes sent", m["sent_events"], "events", "all",
             m["stored_events"] == m["sent_events"]),
    ]


def stores(quick: bool) -> list[str]:
    """SQLite; with PostgreSQL in the full run when Debian's PostgreSQL 15 is there (root)."""
    from tests.fleet_rig import PG_BIN

    pg = not quick and (PG_BIN / "initdb").exists() and os.geteuid() == 0
    return ["sqlite", "postgresql"] if pg else ["sqlite"]


def run(quick: bool = False, say=lambda m: None) -> list[dict]:
    """The benchmark rows (quick: 100 boxes on SQLite, about 30 s; full: 1,000 boxes on
    SQLite and PostgreSQL, about 4 minutes)."""
    n = 100 if quick else 1000
    return [r for kind in stores(quick) for r in rows_of(measure(n, quick, say, kind))]


def main(argv: list[str] | None = None) -> int:
    """Print the rows as a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="100 boxes, short update steps")
    ap.add_argument("--boxes", type=int, help="box count (default 1000; quick 100)")
    ap.add_argument("--store", choices=("sqlite", "postgresql"), action="append",
                    help="default: sqlite (and postgresql in the full run)")
    a = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    n = a.boxes or (100 if a.quick else 1000)
    print(table([r for kind in a.store or stores(a.quick)
                 for r in rows_of(measure(n, a.quick, say, kind))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
