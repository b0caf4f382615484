"""`make bench`: the engine's timing against the machine's floor (cyclictest), per period.

For each period (default 64, 128, 256 frames at 48 kHz) and each hog condition (none, or a busy
process pinned to the other CPU), one after the other:

1. a fresh JACK dummy server whose buffer is the period (-p PERIOD) and ALSA PCMs on it;
2. the harness lag with h_play wired straight to h_cap (the JACK/harness path alone), then
   `echoel run` on box_cap/box_play and the harness lag through it (h_play -> engine -> h_cap;
   measured again if anything xruns meanwhile);
3. a fresh JACK server again, the demo music player patched into box_cap, `echoel run` (engine
   pinned to --cpu, SCHED_FIFO --priority); SIGTERM after --seconds of flowing audio; its
   summary JSON (DSP time, read-to-write time, wake-up jitter, xruns) and the CPU time of its
   real-time threads;
4. JACK stopped, then cyclictest alone: same interval (period/rate), priority, CPU, mlocked,
   same duration and hog condition; its per-loop latencies give the latency figures and the
   engine's jitter metric |L_k - L_(k-1)|.

Engine round trip = lag through the engine - direct lag, beside the configured prefill x period.
The goal checked per row: no xruns beyond the machine's floor (cyclictest stalls longer than the
slack that would make such a loop xrun) and engine p99 jitter <= 1.5 x cyclictest p99 jitter.
It reports; it never fails on the figures. Results: bench/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import machine
from bench_all import write_json
from bench_rig import (
    CLEAR_PEAK,
    EngineRun,
    Stage,
    measure_lag,
    short_tmpdir,
    start_demo_player,
    start_hog,
    stop_process,
)
from cyclic import run as run_cyclictest
from echoel.drivers.jack_server import clear_stale_shm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_RATIO = 1.5
STORM_SHARE = 0.05  # xruns in at least this share of blocks: a storm, not a few dropouts
RATE = 48000
CHANNELS = 2


@contextmanager
def cleanup_stack() -> Iterator[ExitStack]:
    """An ExitStack whose unwinding after an error or Ctrl-C is not cut short by another
    Ctrl-C (SIGINT is ignored while it cleans up)."""
    stack = ExitStack()
    try:
        yield stack
    except BaseException:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, old)
        raise
    stack.close()


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the benchmark like Ctrl-C does (everything is cleaned up)."""
    raise KeyboardInterrupt


def run_condition(period: int, hog: bool, a: argparse.Namespace,
                  log: Callable[[str], None]) -> dict:
    """One period x hog condition: JACK + engine run, then cyclictest; one row of results."""
    row: dict = {"period": period, "hog": hog, "period_ms": round(period * 1000 / a.rate, 3)}
    snap = machine.RtSnapshot()
    snap.start()
    with cleanup_stack() as stack:
        work = short_tmpdir()
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if hog:
            hog_proc = start_hog(a.hog_cpu)
            stack.callback(stop_process, hog_proc, 5)
        engine_cfg = {"period": period, "periods": a.buffer_periods, "prefill": a.prefill}
        rt_cfg = {"priority": a.priority, "cpu": a.cpu}

        # the latency: harness on a JACK server of its own
        stage = Stage(a.rate, period, CHANNELS, work / "latency")
        stage.start()
        stack.callback(stage.stop)
        log("  harness lag straight through JACK (h_play -> h_cap) ...")
        direct = measure_lag(stage, "h_play", "h_cap")
        log("  harness lag through the engine (h_play -> engine -> h_cap) ...")
        lat_run = EngineRun(stage, work / "latency" / "engine", engine_cfg, rt_cfg, 600)
        lat_run.start()
        stack.callback(lat_run.kill)
        lat_run.wait_running()
        through = measure_lag_through(stage, lat_run)
        lat_run.stop()
        stage.stop()

        # the timing: a fresh server, the demo music into the engine
        log(f"  engine with the demo music, {a.seconds:g} s of audio ...")
        stage = Stage(a.rate, period, CHANNELS, work / "timed")
        stage.start()
        stack.callback(stage.stop)
        demo = start_demo_player(stage)
        stack.callback(stop_process, demo, 5)
        engine = EngineRun(stage, work / "timed" / "engine", engine_cfg, rt_cfg, a.seconds + 120)
        row["engine_code"] = machine.code_version(ROOT)
        engine.start()
        stack.callback(engine.kill)
        stage.wire("src_play", "box_cap", timeout=90)
        status = engine.wait_running()
        t_flow = time.monotonic()
        threads_before = machine.process_threads(status["engine_pid"])
        time.sleep(max(0.0, t_flow + a.seconds - time.monotonic()))
        rt_cpu = thread_cpu_shares(threads_before, machine.process_threads(status["engine_pid"]),
                                   time.monotonic() - t_flow)
        summary = engine.stop()
        log(f"  bare capture loop on the same PCM (the stand-in's floor), {a.seconds:g} s ...")
        row["bare_loop"] = run_bare_loop(stage, period, a)
        stop_process(demo, 5)
        stage.stop()

        time.sleep(a.settle)
        interval_us = round(period * 1e6 / a.rate)
        log(f"  cyclictest -i {interval_us} for {round(a.seconds)} s ...")
        ct = run_cyclictest(interval_us, a.priority, a.cpu, max(1, round(a.seconds)), work,
                            tune=a.tune_cyclictest)
        period_ns = period * 1e9 / a.rate
        row["cyclictest"] = ct.figures((a.prefill - 1) * period_ns,
                                       (a.buffer_periods - 1) * period_ns)
    row["machine_during"] = snap.stop()
    row["engine"] = engine_figures(summary, period, a.rate)
    row["engine"]["rt_threads_cpu_share"] = rt_cpu
    row["latency"] = latency_figures(direct, through, period, a.prefill, a.rate)
    row["goal"] = judge(row)
    return row


def run_bare_loop(stage: Stage, period: int, a: argparse.Namespace) -> dict:
    """Jitter of a bare poll/read loop on box_cap: what the stand-in gives by itself."""
    cmd = [sys.executable, str(Path(__file__).with_name("bare_loop.py")), "--pcm", "box_cap",
           "--rate", str(a.rate), "--period", str(period), "--seconds", str(a.seconds),
           "--priority", str(a.priority), "--cpu", str(a.cpu)]
    r = subprocess.run(cmd, env=stage.env, capture_output=True, text=True,
                       timeout=a.seconds + 60)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"bare loop failed ({r.returncode}): {r.stderr[-300:]}"}


def measure_lag_through(stage: Stage, run: EngineRun, tries: int = 3) -> dict:
    """The harness lag through the engine, again if the engine or the harness had an xrun
    meanwhile (the lag would be a mixture) or the correlation peak is not clear."""
    res: dict = {}
    for attempt in range(1, tries + 1):
        before = run.status()["xruns"]
        res = stage.harness_lag("box_play", "box_cap")
        after = run.status()["xruns"]
        res["attempts"] = attempt
        res["engine_xruns"] = {k: after[k] - before[k] for k in after}
        if "error" not in res and res["xruns"] == 0 and not any(res["engine_xruns"].values()) \
                and res["clarity"] >= CLEAR_PEAK:
            break
    return res


def thread_cpu_shares(before: dict, after: dict, wall_s: float) -> list[dict]:
    """CPU share of each real-time thread of the engine process over the measuring window
    (the audio thread should be far below 1: it sleeps in poll between periods)."""
    out = []
    for key, th in after.items():
        if key in before:
            out.append({"tid": th.tid, "policy": f"{th.policy} {th.rtprio}",
                        "cpu_share": round((th.cpu_s - before[key].cpu_s) / wall_s, 3)})
    return sorted(out, key=lambda t: -t["cpu_share"])


def engine_figures(s: dict, period: int, rate: int) -> dict:
    """What the benchmark keeps of the daemon's summary."""
    return {
        "dsp": s.get("dsp"), "read_to_write": s.get("read_to_write"),
        "wake_jitter": s.get("wake_jitter"), "xruns": s.get("xruns"),
        "blocks": s.get("blocks"), "audio_seconds": round(s.get("blocks", 0) * period / rate, 2),
        "latency_ms_configured": s.get("latency_ms"),
        "missing_guarantees": s.get("missing_guarantees") or {},
        "interface_losses": s.get("interface_losses"),
        "engine_restarts": s.get("engine_restarts"),
    }


def latency_figures(direct: dict, through: dict, period: int, prefill: int, rate: int) -> dict:
    """Round trip through the engine (harness lag difference) beside prefill x period."""
    out: dict = {"configured_frames": prefill * period,
                 "configured_ms": round(prefill * period * 1000 / rate, 3),
                 "direct": direct, "through_engine": through}
    ok = all("error" not in r and r.get("xruns") == 0 and r.get("clarity", 0) >= CLEAR_PEAK
             and not any((r.get("engine_xruns") or {}).values()) for r in (direct, through))
    if "lag" in direct and "lag" in through:
        frames = through["lag"] - direct["lag"]
        out.update(measured_frames=frames, measured_ms=round(frames * 1000 / rate, 3),
                   clean=ok)
    else:
        out.update(measured_frames=None, measured_ms=None, clean=False)
    return out


def judge(row: dict) -> dict:
    """The product's goal for one row: xruns within the floor, p99 jitter within 1.5x."""
    e, ct = row["engine"], row["cyclictest"]
    ej, cj = e["wake_jitter"]["p99_us"], ct["jitter"]["p99_us"]
    ratio = None if ej is None or not cj else round(ej / cj, 2)
    floor_cap, floor_play = ct["stalls_over_capture_slack"], ct["stalls_over_playback_slack"]
    xc, xp = e["xruns"]["capture"], e["xruns"]["playback"]
    reasons = []
    if ratio is None:
        reasons.append("no jitter figures")
    elif ratio > GOAL_RATIO:
        reasons.append(f"p99 jitter {ratio}x cyclictest")
    if xc > floor_cap:
        reasons.append(f"capture xruns {xc} > floor {floor_cap}")
    if xp > floor_play:
        reasons.append(f"playback xruns {xp} > floor {floor_play}")
    storm = e["blocks"] and (xc + xp) >= STORM_SHARE * e["blocks"]
    if storm:
        reasons.append(f"xrun storm: {xc + xp} xruns in {e['blocks']} blocks (the engine kept "
                       "restarting its streams)")
    bare = (row.get("bare_loop") or {}).get("p99_us")
    vs_bare = None if ej is None or not bare else round(ej / bare, 2)
    return {"jitter_p99_ratio": ratio, "jitter_p99_vs_bare_loop": vs_bare,
            "xrun_floor": {"capture": floor_cap,
                                                      "playback": floor_play},
            "xrun_storm": bool(storm), "met": not reasons, "why_not": reasons}


def _f(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if float(v).is_integer() or abs(v) >= 100 else f"{v:.1f}"


def _trio(d: dict | None) -> str:
    d = d or {}
    return "/".join(_f(d.get(k)) for k in ("p50_us", "p99_us", "max_us"))


def _busiest(threads: list[dict] | None) -> str:
    if not threads:
        return "-"
    t = threads[0]
    return f"{t['policy']} {100 * t['cpu_share']:.0f}% CPU"


def table(rows: list[dict]) -> str:
    """The terminal table: one line per period x hog condition, then the notes."""
    head = ["period", "hog", "eng jitter us", "cyclictest jitter us", "p99 ratio",
            "bare loop jitter us", "vs bare",
            "xruns c/p (floor)", "DSP us", "r2w p99", "latency ms meas/cfg", "goal"]
    lines = []
    ok_rows = [r for r in rows if "error" not in r]
    for r in ok_rows:
        e, ct, lat, g = r["engine"], r["cyclictest"], r["latency"], r["goal"]
        meas = lat.get("measured_ms")
        lat_s = f"{_f(meas) if meas is None else f'{meas:.3f}'}/{lat['configured_ms']:.3f}"
        if meas is not None and not lat["clean"]:
            lat_s += "?"
        lines.append([
            str(r["period"]), "yes" if r["hog"] else "no",
            _trio(e["wake_jitter"]), _trio(ct["jitter"]),
            "-" if g["jitter_p99_ratio"] is None else f"{g['jitter_p99_ratio']:.2f}",
            _trio(r.get("bare_loop")),
            "-" if g.get("jitter_p99_vs_bare_loop") is None
            else f"{g['jitter_p99_vs_bare_loop']:.2f}",
            f"{e['xruns']['capture']}/{e['xruns']['playback']} "
            f"({g['xrun_floor']['capture']}/{g['xrun_floor']['playback']})",
            _trio(e["dsp"]), _f((e["read_to_write"] or {}).get("p99_us")), lat_s,
            "met" if g["met"] else "NOT met",
        ])
    widths = [max([len(h)] + [len(x[i]) for x in lines]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    out.append("bare loop: a capture-only poll/read loop on the same JACK PCM, same priority "
               "and CPU (the stand-in's own floor); vs bare: engine p99 / bare-loop p99")
    out.append("jitter, DSP: p50/p99/max; xruns: engine capture/playback (floor: cyclictest "
               "stalls over the capture/playback slack); latency: harness round trip through "
               "the engine minus the direct wire ('?': not clean: xruns or an unclear peak)")
    versions = {r["engine_code"]["sources_sha256"] for r in rows if "engine_code" in r}
    if len(versions) > 1:
        out.append(f"  WARNING: the engine's sources changed during the benchmark ({len(versions)} "
                   "versions ran): rows are not comparable")
    for r in rows:
        tag = f"period {r['period']}, hog {'on' if r['hog'] else 'off'}"
        if "error" in r:
            out.append(f"  {tag}: FAILED: {r['error'][:300]}")
            continue
        e, ct, md = r["engine"], r["cyclictest"], r["machine_during"]
        out.append(f"  {tag}: cyclictest latency p50/p99/max {_trio(ct['latency'])} us over "
                   f"{ct['loops_parsed']} loops (-i {ct['interval_us']}); engine "
                   f"{e['blocks']} blocks ({e['audio_seconds']} s), busiest RT thread "
                   f"{_busiest(e.get('rt_threads_cpu_share'))}")
        lat = r["latency"]
        if lat["clean"] and lat["measured_frames"] != lat["configured_frames"]:
            out.append(f"    round trip {lat['measured_frames']} frames measured cleanly, "
                       f"{lat['configured_frames']} configured (prefill x period)")
        if not r["goal"]["met"]:
            out.append(f"    not met: {'; '.join(r['goal']['why_not'])}")
        if e["missing_guarantees"]:
            out.append(f"    engine missing guarantees: {e['missing_guarantees']}")
        if md["foreign_rt_cpu_share"] > 0.02:
            busiest = ", ".join(f"{t['comm']}[{t['pid']}] {t['policy']} "
                                f"{100 * t['cpu_share']:.0f}%" for t in md["foreign_rt_threads"])
            out.append(f"    WARNING: other real-time threads took "
                       f"{100 * md['foreign_rt_cpu_share']:.0f}% of a CPU during this row "
                       f"({busiest}): figures are not the machine's own")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(prog="engine_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="measuring time of each engine run and each cyclictest run")
    ap.add_argument("--periods", default="64,128,256", help="comma-separated frames")
    ap.add_argument("--hog", choices=("both", "off", "on"), default="both",
                    help="run without and/or with the CPU hog")
    ap.add_argument("--rate", type=int, default=RATE)
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--buffer-periods", type=int, default=4, help="engine.periods")
    ap.add_argument("--priority", type=int, default=70, help="SCHED_FIFO priority of both")
    ap.add_argument("--cpu", type=int, default=1, help="CPU the engine and cyclictest use")
    ap.add_argument("--hog-cpu", type=int, default=0, help="CPU the hog spins on")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="pause (s) between the engine run and cyclictest")
    ap.add_argument("--tune-cyclictest", action="store_true",
                    help="let cyclictest hold /dev/cpu_dma_latency at 0 (the engine does not; "
                    "by default it runs with --default-system)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "engine.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    a = parse_args(argv)
    clear_stale_shm()  # before any JACK client exists in this process
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    periods = [int(p) for p in a.periods.split(",") if p.strip()]
    hogs = {"both": [False, True], "off": [False], "on": [True]}[a.hog]
    cpus = os.cpu_count() or 1
    if max(a.cpu, a.hog_cpu) >= cpus:
        print(f"engine_bench: --cpu {a.cpu} / --hog-cpu {a.hog_cpu} not on this "
              f"{cpus}-CPU machine", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    info = machine.info(a.seconds)
    info["engine_code"] = machine.code_version(ROOT)
    settings = {"rate": a.rate, "periods": periods, "prefill": a.prefill,
                "buffer_periods": a.buffer_periods, "priority": a.priority, "cpu": a.cpu,
                "hog_cpu": a.hog_cpu, "channels": CHANNELS, "format": "FLOAT_LE",
                "cyclictest_tuned": a.tune_cyclictest}
    n = len(periods) * len(hogs)
    log(f"engine bench: {n} conditions x ({a.seconds:g} s engine + {a.seconds:g} s cyclictest) "
        f"on {cpus} CPUs, load {info['loadavg_start']}")
    rows: list[dict] = []
    try:
        for period in periods:
            for hog in hogs:
                log(f"period {period}, hog {'on' if hog else 'off'}:")
                try:
                    rows.append(run_condition(period, hog, a, log))
                except Exception as exc:  # one broken condition must not lose the others
                    log(f"  failed: {exc}")
                    rows.append({"period": period, "hog": hog,
                                 "error": f"{type(exc).__name__}: {exc}"[:2000]})
    except KeyboardInterrupt:
        print("\ninterrupted: everything started was stopped", file=sys.stderr)
        if not rows:
            return 130
    info["loadavg_end"] = machine.read_text("/proc/loadavg")
    result = {"machine": info, "settings": settings,
              "goal": {"jitter_p99_ratio_max": GOAL_RATIO,
                       "xruns": "no more than cyclictest stalls over the same slack"},
              "method": {
                  "engine_wake_jitter": "|(t_wake_k - t_wake_(k-1)) - period|, t_wake = poll() on "
                                        "the capture PCM returned with a period available",
                  "cyclictest_jitter": "|L_k - L_(k-1)| of consecutive per-loop latencies "
                                       "(cyclictest -v -N, absolute timer)",
                  "percentiles": "1-us bins, floor, as the engine's histograms",
                  "xrun_floor": "cyclictest stalls (runs of loops) longer than (prefill-1) "
                                "periods (playback) or (buffer periods-1) periods (capture)",
                  "latency": "harness lag through the engine minus the direct-wire lag",
                  "rig": "JACK dummy backend (-p = period) with ALSA jack PCMs; cyclictest runs "
                         "with JACK stopped"},
              "rows": rows}
    write_json(a.out, result)
    print()
    print(table(rows))
    print(f"\nwritten: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
