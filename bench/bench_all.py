"""`make bench`: every benchmark module, a table on the terminal, JSON under bench/results/.

Each module exposes `run(quick) -> list[dict]` rows (group, kernel, case, metric, ours,
reference, ref, unit, goal, met); rows are grouped into one JSON file per area:
dsp.json (loudness, filters, pitch, chords), ml.json, fleet.json. The engine's own benchmark
(bench/engine_bench.py, jackd + cyclictest) runs separately first and writes engine.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AREAS = {
    "dsp": ["bench.dsp_loudness", "bench.dsp_filters", "bench.dsp_pitch", "bench.dsp_chords",
            "bench.analyze_bench"],
    "ml": ["bench.ml_bench"],
    "fleet": ["bench.fleet_bench"],
    "aes67": ["bench.clock_ptp", "bench.aes67_bench"],
    "image": ["bench.image_recipe_bench", "bench.image_bench"],
    "bio": ["bench.bio_ble", "bench.bio_bench", "bench.bio_latency"],
    "ota": ["bench.ota_bench", "bench.rollout_bench", "bench.ota_qemu_bench"],
}


def fmt(v) -> str:
    """A figure for the table."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict]) -> str:
    """Rows as an aligned text table."""
    cols = ["group", "kernel", "case", "metric", "ours", "reference", "ref", "unit", "goal",
            "met"]
    cells = [[fmt(r.get(c)) if c != "met" else {True: "met", False: "NOT met", None: ""}[
        r.get("met")] for c in cols] for r in rows]
    widths = [min(40, max([len(c)] + [len(x[i]) for x in cells])) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(x[:40].ljust(w) for x, w in zip(row, widths, strict=True))
            for row in cells]
    return "\n".join(out)


def module_main(run, doc: str | None) -> None:
    """`python bench/<module>.py [--quick]`: one module's rows as a table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help="short run (well under a minute)")
    print(table(run(quick=ap.parse_args().quick)))


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a .tmp beside it, then rename); numpy scalars as plain values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(o):
    """numpy scalars (and anything else odd) as plain JSON values."""
    return o.item() if hasattr(o, "item") else str(o)


def main() -> int:
    """Run the modules of the chosen areas; write bench/results/<area>.json."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke check)")
    ap.add_argument("--only", choices=sorted(AREAS), action="append")
    args = ap.parse_args()
    failed = 0
    for area in args.only or list(AREAS):
        rows: list[dict] = []
        for name in AREAS[area]:
            try:
                mod = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name == name:
                    continue  # not written yet
                raise
            t0 = time.monotonic()
            try:
                got = mod.run(quick=args.quick)
            except Exception:
                failed += 1
                print(f"{name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
                continue
            print(f"{name}: {len(got)} rows in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            rows += got
        if not rows:
            continue
        print(f"\n== {area}\n{table(rows)}\n")
        out = ROOT / "bench" / "results" / f"{area}.json"
        doc = {"quick": args.quick, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"cpus": os.cpu_count(),
                           "python": platform.python_version(),
                           "platform": platform.platform()},
               "rows": rows}
        write_json(out, doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
