"""Flashing benchmark (issue 8): `echoel flash`'s pieces against dd, in the same run.

run(quick) rows, on a generated image with the agreed layout (full: 1.2 GiB with 128 MiB of
data in rootfs A, the rest sparse; quick: 96 MiB with 8 MiB), and on the real image when
build/image/qemu-amd64/*.img exists (its .bmap made in a temp folder when missing):

- flash 1 target (file): bmaptool copy + our read-back, beside `dd bs=4M conv=fsync` of the
  whole image to a file; the ratio dd / ours is the speed-up.
- flash 4 targets in parallel (files): flash() with 4 jobs, beside 4 dd run in parallel.
- flash 1 target (loop device, root only): the same on a loop device over a sparse file.
- flash 1 target from the .img.zst (generated image): beside `zstd -dc | dd`.
- verify: our read-back of the mapped ranges after dropping the cache, beside `cmp` of the
  whole image against the target (what a technician would otherwise run).
- image check: the image's mapped ranges against the bmap (done once per run of flash).

Build time and boot time rows come from the image recipe's benchmark, not from here.
Timings are wall clock on a shared machine: compare the ratios, not the seconds.
`python bench/image_bench.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from echoel.provisioning import flash, image_layout  # noqa: E402

REAL_IMAGES = ROOT / "build" / "image" / "qemu-amd64"
GROUP = "flash"


def _row(kernel: str, case: str, metric: str, ours: float, reference: str = "",
         ref: float | None = None, unit: str = "s", goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric,
            "ours": round(float(ours), 4), "reference": reference,
            "ref": None if ref is None else round(float(ref), 4), "unit": unit, "goal": goal,
            "met": met}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _dd(image: Path, target: Path) -> subprocess.Popen:
    return subprocess.Popen(["dd", f"if={image}", f"of={target}", "bs=4M", "conv=fsync",
                             "status=none"], stdout=subprocess.DEVNULL)


def _wait_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"dd exited {p.returncode}")


def _make_image(folder: Path, quick: bool) -> Path:
    tree = folder / "tree"
    tree.mkdir()
    data_mib = 8 if quick else 128
    rng = os.urandom  # incompressible, like binaries and models
    for i in range(data_mib // 4):
        (tree / f"blob{i}").write_bytes(rng(4 * 1024 * 1024))
    img = folder / "generated.img"
    sizes = (16, 32, 32, 16) if quick else (64, 512, 512, 128)
    image_layout.build_image(img, sizes, tree)
    shutil.rmtree(tree)
    subprocess.run(["bmaptool", "-q", "create", "-o", f"{img}.bmap", str(img)], check=True,
                   timeout=600)
    return img


def _bmap_for(image: Path, folder: Path) -> Path:
    with contextlib.suppress(flash.FlashError):
        return flash.find_bmap(image)
    out = folder / (image.name + ".bmap")
    subprocess.run(["bmaptool", "-q", "create", "-o", str(out), str(image)], check=True,
                   timeout=1800)
    return out


def _flash_files(image: Path, bmap: flash.Bmap, targets: list[Path]) -> flash.FlashRun:
    _, jobs = flash.plan(image, targets, bmap.path)
    run = flash.flash(image, jobs, bmap, parallel=len(targets), quiet=True, check=False)
    if not run.ok:
        raise RuntimeError(f"flash failed: {run.to_json()}")
    return run


def _cases(image: Path, bmap: flash.Bmap, name: str, folder: Path, quick: bool) -> list[dict]:
    rows: list[dict] = []
    size_mib = bmap.image_size / 2**20
    mapped = bmap.mapped_bytes / 2**20
    case = f"{name} {size_mib:.0f} MiB ({mapped:.0f} mapped)"
    rows.append(_row("image check", case, "seconds", _timed(
        lambda: flash.check_image(image, bmap)), goal="", met=None))

    def clean(*paths: Path) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # one target, file
    t1, d1 = folder / "t1.img", folder / "d1.img"
    clean(t1, d1)
    ours = _timed(lambda: _flash_files(image, bmap, [t1]))
    ref = _timed(lambda: _wait_all([_dd(image, d1)]))
    rows.append(_row("bmaptool copy + read-back", case, "flash 1 target (file), s", ours,
                     "dd bs=4M conv=fsync, whole image", ref, goal="faster than dd",
                     met=ours < ref))
    # verify alone, against cmp of the whole image
    ours_v = _timed(lambda: flash.verify_target(t1, bmap))
    ref_v = _timed(lambda: subprocess.run(["cmp", "-s", str(image), str(t1)], check=True,
                                          timeout=1800))
    rows.append(_row("read-back verify", case, "verify 1 target, s", ours_v,
                     "cmp image target (whole image)", ref_v, goal="faster than cmp",
                     met=ours_v < ref_v))
    clean(t1, d1)
    # four targets in parallel, files
    ts = [folder / f"p{i}.img" for i in range(4)]
    ds = [folder / f"q{i}.img" for i in range(4)]
    clean(*ts, *ds)
    run: list[flash.FlashRun] = []
    ours4 = _timed(lambda: run.append(_flash_files(image, bmap, ts)))
    ref4 = _timed(lambda: _wait_all([_dd(image, d) for d in ds]))
    rows.append(_row("bmaptool copy + read-back", case, "flash 4 targets parallel (files), s",
                     ours4, "4 dd bs=4M conv=fsync in parallel", ref4,
                     goal="faster than dd", met=ours4 < ref4))
    rows.append(_row("bmaptool copy + read-back", case,
                     "4 parallel / 1 target time", ours4 / max(ours, 1e-9), "same ratio for dd",
                     ref4 / max(ref, 1e-9), unit="x", goal="< 4 (parallel pays off)",
                     met=ours4 / max(ours, 1e-9) < 4))
    res = run[0].results
    rows.append(_row("bmaptool copy", case, "4 parallel: copy s per target (mean)",
                     sum(r.copy_s for r in res) / len(res)))
    rows.append(_row("read-back verify", case, "4 parallel: read-back s per target (mean)",
                     sum(r.verify_s for r in res) / len(res)))
    clean(*ts, *ds)
    # a zstd-compressed image (what the image recipe ships), one file target
    if shutil.which("zstd") and name == "generated":
        zst = folder / (image.name + ".zst")
        subprocess.run(["zstd", "-q", "-f", "-T2", "-o", str(zst), str(image)], check=True,
                       timeout=1800)
        z1, zd = folder / "z1.img", folder / "zd.img"
        ours_z = _timed(lambda: _flash_files(zst, bmap, [z1]))
        ref_z = _timed(lambda: subprocess.run(
            f"zstd -dcq '{zst}' | dd of='{zd}' bs=4M conv=fsync status=none", shell=True,
            check=True, timeout=1800))
        rows.append(_row("bmaptool copy + read-back", f"{case} .zst "
                         f"{zst.stat().st_size / 2**20:.0f} MiB", "flash 1 target (file), s",
                         ours_z, "zstd -dc | dd bs=4M conv=fsync", ref_z,
                         goal="faster than dd", met=ours_z < ref_z))
        clean(zst, z1, zd)
    # one target, loop device (root)
    if os.geteuid() == 0 and shutil.which("losetup"):
        size = bmap.image_size + 4 * 2**20
        with image_layout.loop_device(folder / "lo.bin", size) as lo:
            ours_l = _timed(lambda: _flash_files(image, bmap, [lo]))
            ref_l = _timed(lambda: _wait_all([_dd(image, lo)]))
        clean(folder / "lo.bin")
        rows.append(_row("bmaptool copy + read-back", case, "flash 1 target (loop device), s",
                         ours_l, "dd bs=4M conv=fsync to the loop device", ref_l,
                         goal="faster than dd", met=ours_l < ref_l))
    return rows


def run(quick: bool = False) -> list[dict]:
    """The flashing rows (see the module docstring)."""
    missing = image_layout.have_tools("bmaptool", "sfdisk", "mkfs.ext4", "mkfs.vfat", "dd",
                                      "cmp")
    if missing:
        return [_row("setup", "tools missing", "skipped", 0.0, goal=f"install {missing}",
                     met=False, unit="")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="echoel-image-bench-") as tmp:
        folder = Path(tmp)
        img = _make_image(folder, quick)
        rows += _cases(img, flash.read_bmap(f"{img}.bmap"), "generated", folder, quick)
        img.unlink()
        if not quick:
            for real in sorted(REAL_IMAGES.glob("*.img"))[:1]:
                bmap = flash.read_bmap(_bmap_for(real, folder))
                rows += _cases(real, bmap, f"real {real.name}", folder, quick)
    return rows


def main() -> None:
    from bench.bench_all import table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 96 MiB image, files only")
    args = ap.parse_args()
    print(table(run(args.quick)))


if __name__ == "__main__":
    main()
