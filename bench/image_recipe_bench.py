"""Image recipe benchmark (issue 8): build time and size, boot time to "online in the fleet".

run(quick) rows:

- layout (quick and full): genimage on the real board configs with the sizes scaled to 16 MiB
  per partition, beside provisioning's own layout writer (sfdisk + mkfs at offsets,
  image_layout.build_image) making the same four partitions in the same run.
- build (full; root): the qemu-amd64 image built with the cached mmdebstrap tarball, beside
  mmdebstrap of the same package set without the cache (what the cache saves); sizes by part.
- boot (full; root, qemu): the end-to-end test run (tests/e2e/test_qemu_boot.py): seconds from
  qemu start to "online in the fleet", beside the seconds to the console's login prompt in the
  same boot (the base system without the box's stack).
- last build (quick): the figures of the newest build/image/qemu-amd64/build.json and e2e.json,
  labelled as such (not measured in this run).

`python bench/image_recipe_bench.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from echoel.provisioning import image_layout  # noqa: E402

from image import build_image, recipe  # noqa: E402
from image.base_rootfs import base_tarball  # noqa: E402

GROUP = "image"
BOARD = "qemu-amd64"
OUT = ROOT / "build" / "image"
MIB = 1024 * 1024


def _row(kernel: str, case: str, metric: str, ours: float, reference: str = "",
         ref: float | None = None, unit: str = "s", goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric,
            "ours": round(float(ours), 3), "reference": reference,
            "ref": None if ref is None else round(float(ref), 3), "unit": unit, "goal": goal,
            "met": met}


def _layout_rows() -> list[dict]:
    """genimage (the recipe) against provisioning's sfdisk+mkfs writer, same layout."""
    if shutil.which("genimage") is None:
        return [_row("genimage", "layout", "skipped", 0, unit="", goal="apt-get install "
                     "genimage", met=False)]
    rows = []
    for name in ("qemu-amd64", "rpi4"):
        board = recipe.load_boards()[name]
        with tempfile.TemporaryDirectory(prefix="echoel-img-bench-") as tmp:
            work = Path(tmp)
            for d in ("boot", "rootfs/etc", "data", "genimage-root"):
                (work / d).mkdir(parents=True)
            for f in ("vmlinuz", "initrd.img", "cmdline-a.txt", "cmdline-b.txt"):
                (work / "boot" / f).write_bytes(os.urandom(64 * 1024))
            (work / "rootfs/etc/blob").write_bytes(os.urandom(4 * MIB))
            cfg = build_image.genimage_config(board, ["vmlinuz", "initrd.img", "cmdline-a.txt",
                                                      "cmdline-b.txt"], 1_700_000_000)
            (work / "g.cfg").write_text(re.sub(r"size = \d+[MG]", "size = 16M", cfg))
            t0 = time.perf_counter()
            subprocess.run(["genimage", "--config", "g.cfg", "--rootpath", "genimage-root",
                            "--tmppath", "tmp", "--inputpath", "boot", "--outputpath", "out"],
                           cwd=work, check=True, capture_output=True, timeout=300)
            ours = time.perf_counter() - t0
            img = work / "out" / f"echoel-{name}.img"
            ok = image_layout.data_partition(img).number == 4
            t0 = time.perf_counter()
            image_layout.build_image(work / "ref.img", (16, 16, 16, 16), work / "rootfs")
            ref = time.perf_counter() - t0
        rows.append(_row("genimage", f"{name} layout, 4 x 16 MiB", "seconds", ours,
                         "sfdisk+mkfs at offsets (image_layout.build_image)", ref,
                         goal="agreed layout read back (p4 echoel-data)", met=ok))
    return rows


def _last_rows() -> list[dict]:
    rows = []
    b = OUT / BOARD / "build.json"
    if b.exists():
        d = json.loads(b.read_text())
        for step, secs in d["seconds"].items():
            rows.append(_row("build (last run)", BOARD, f"{step} s", secs))
        for part, n in d.get("bytes", {}).items():
            rows.append(_row("size (last run)", BOARD, part, n / MIB, unit="MiB"))
        for name, n in d.get("outputs", {}).items():
            rows.append(_row("size (last run)", BOARD, name, n / MIB, unit="MiB"))
    e = OUT / BOARD / "e2e.json"
    if e.exists():
        d = json.loads(e.read_text())
        rows.append(_row("boot (last run)", BOARD, "qemu start to online in the fleet",
                         d["online_s"], "login prompt on the console, same boot",
                         d.get("login_prompt_s"), goal="< 300 s under TCG",
                         met=d["online_s"] < 300))
    return rows


def _build_rows() -> list[dict]:
    if os.geteuid() != 0:
        return [_row("build", BOARD, "skipped", 0, unit="", goal="run as root", met=False)]
    board = recipe.load_boards()[BOARD]
    t0 = time.perf_counter()
    report = build_image.ImageBuild(board, OUT).run()
    total = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="echoel-mmdebstrap-", dir=str(OUT)) as tmp:
        t1 = time.perf_counter()
        base_tarball(board, Path(tmp), log=Path(tmp) / "log")
        uncached = time.perf_counter() - t1
    rows = [_row("build", BOARD, "image build, base cached", total,
                 "mmdebstrap of the same packages, uncached", uncached,
                 goal="< 10 min", met=total < 600)]
    for part, n in report["bytes"].items():
        rows.append(_row("size", BOARD, part, n / MIB, unit="MiB"))
    out = report["outputs"]
    rows.append(_row("size", BOARD, "image allocated / compressed", out["image_allocated"] /
                     MIB, "zstd -3 image", out[f"echoel-{BOARD}.img.zst"] / MIB, unit="MiB",
                     goal="compressed < 1 GiB", met=out[f"echoel-{BOARD}.img.zst"] < 1024 * MIB))
    return rows


def _boot_rows() -> list[dict]:
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        return [_row("boot", BOARD, "skipped", 0, unit="", goal="root and qemu-system-x86",
                     met=False)]
    e2e = OUT / BOARD / "e2e.json"
    e2e.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests/e2e/test_qemu_boot.py")], cwd=ROOT,
                       env={**os.environ, "ECHOEL_E2E": "1"}, capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0 or not e2e.exists():
        return [_row("boot", BOARD, "end-to-end test failed", 0, unit="",
                     goal=r.stdout[-200:], met=False)]
    d = json.loads(e2e.read_text())
    return [_row("boot", BOARD, "qemu start to online in the fleet", d["online_s"],
                 "login prompt on the console, same boot", d.get("login_prompt_s"),
                 goal="< 300 s under TCG", met=d["online_s"] < 300),
            _row("boot", BOARD, "qemu start to engine running (hw:Dummy)",
                 d["engine_running_s"], goal="engine running", met=True)]


def run(quick: bool = False) -> list[dict]:
    """The image rows (see the module docstring)."""
    rows = _layout_rows()
    if quick:
        return rows + _last_rows()
    return rows + _build_rows() + _boot_rows()


def main() -> None:
    from bench.bench_all import table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="layout only, plus the last build")
    args = ap.parse_args()
    print(table(run(args.quick)))


if __name__ == "__main__":
    main()
