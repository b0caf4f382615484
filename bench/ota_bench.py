"""Remote-update benchmark on the host: bundle build, download with resume, RAUC install.

run(quick) rows (quick: a 16 MiB rootfs; full: 256 MiB), each beside a reference measured in
the same run on the same bytes:
- bundle: image/bundle.py (rauc bundle, signing) time beside `mksquashfs` of the same image
  alone (what dominates); bundle size beside the image size.
- download: HTTPS from fleet/artifact_server.py on localhost, with size and sha256 checked and
  fsync, beside a bare urllib read of the same URL to memory; with the connection cut at half
  way and resumed, the time and the bytes fetched twice (a restart from zero fetches the cut
  part again).
- install: the update agent's verify (`rauc info`) and `rauc install` into a file-backed slot
  (private D-Bus, `rauc service`), beside copying the image into a file with fsync.
The qemu reboot-to-healthy and the 1,000-box rollout rows belong to other modules.

`python bench/ota_bench.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from echoel.daemon.model_store import sha256_file  # noqa: E402
from echoel.daemon.update_download import TlsFiles, download  # noqa: E402
from echoel.drivers.rauc_client import HostRauc, host_missing  # noqa: E402
from echoel.fleet.artifact_server import ArtifactServer, CutPolicy  # noqa: E402
from echoel.provisioning.pki import FleetPki  # noqa: E402
from echoel.provisioning.update_signing import UpdateCa  # noqa: E402

COMPATIBLE = "echoel-box-bench"


def _bundle_module():
    spec = importlib.util.spec_from_file_location("echoel_image_bundle",
                                                  ROOT / "image" / "bundle.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def row(group: str, kernel: str, case: str, metric: str, ours: float, reference: str = "",
        ref: float | None = None, unit: str = "", goal: str = "",
        met: bool | None = None) -> dict:
    """One result row."""
    return {"group": group, "kernel": kernel, "case": case, "metric": metric,
            "ours": float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


def make_rootfs(path: Path, mib: int) -> Path:
    """An ext4 image of `mib` MiB, 40 % of it filled with incompressible files, the rest
    with text-like compressible data (what a rootfs with Python and models looks like)."""
    tree = path.with_suffix(".tree")
    (tree / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    rnd = int(mib * 0.4) << 20
    with open(tree / "usr" / "lib" / "model.bin", "wb") as f:
        f.write(os.urandom(rnd))
    text = b"def f(x):\n    return x * 2  # echoel\n" * 1024
    with open(tree / "usr" / "lib" / "code.py", "wb") as f:
        for _ in range((int(mib * 0.3) << 20) // len(text)):
            f.write(text)
    (tree / "etc" / "echoel").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "echoel" / "release").write_text("bench\n")
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True)
    shutil.rmtree(tree)
    return path


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(quick: bool = False) -> list[dict]:
    """The benchmark rows (see the module docstring)."""
    missing = host_missing()
    if missing:
        return [row("ota", "all", "-", f"skipped: {missing}", 0.0, met=None)]
    mib = 16 if quick else 256
    case = f"rootfs {mib} MiB"
    rows: list[dict] = []
    bundle_mod = _bundle_module()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as td:
        d = Path(td)
        ca = UpdateCa(d / "uca")
        ca.init()
        ident = ca.issue_signing("release")
        rootfs = make_rootfs(d / "rootfs.ext4", mib)

        # ------------------------------------------------ bundle
        t_ref, _ = _timed(lambda: subprocess.run(
            ["mksquashfs", str(rootfs), str(d / "ref.squashfs"), "-noappend", "-quiet"],
            check=True, capture_output=True))
        content = d / "content"
        content.mkdir()
        os.link(rootfs, content / "rootfs.ext4")
        (content / "manifest.raucm").write_text(bundle_mod.manifest_text(
            "2026.11.2", COMPATIBLE, "plain", "bench"))
        t_rauc, _ = _timed(lambda: subprocess.run(
            ["rauc", "bundle", f"--cert={ident.cert}", f"--key={ident.key}", str(content),
             str(d / "ref.raucb")], check=True, capture_output=True))
        t_bundle, info = _timed(lambda: bundle_mod.build_bundle(
            rootfs, "2026.11.2", COMPATIBLE, ident.cert, ident.key, d / "b.raucb"))
        rows.append(row("ota", "bundle build", case, "seconds", t_bundle, "rauc bundle alone",
                        t_rauc, "s", "<= 1.25x rauc bundle", t_bundle <= 1.25 * t_rauc))
        rows.append(row("ota", "bundle build", case, "seconds", t_bundle, "mksquashfs alone",
                        t_ref, "s", "", None))
        ref_size = (d / "ref.squashfs").stat().st_size
        rows.append(row("ota", "bundle size", case, "size", info.size / 2**20,
                        "mksquashfs alone", ref_size / 2**20, "MiB",
                        "<= squashfs + 64 KiB", info.size <= ref_size + 65536))
        rows.append(row("ota", "bundle size", case, "fraction of the image",
                        info.size / rootfs.stat().st_size, "", None, "", "", None))

        # ------------------------------------------------ download
        fleet = FleetPki(d / "fleet")
        fleet.init()
        srv_id = fleet.issue("broker", "artifacts", ips=("127.0.0.1",))
        served = d / "served"
        served.mkdir()
        bundle = served / "b.raucb"
        os.replace(d / "b.raucb", bundle)
        size, sha = bundle.stat().st_size, sha256_file(bundle)
        tls = TlsFiles(str(fleet.ca_cert_path))
        with ArtifactServer(served, cert=srv_id.cert, key=srv_id.key) as srv:
            url = srv.url("b.raucb")
            ctx = tls.context()

            def bare() -> int:
                with urllib.request.urlopen(url, context=ctx, timeout=60) as r:
                    n = 0
                    while chunk := r.read(1 << 18):
                        n += len(chunk)
                    return n

            def plain() -> None:
                with urllib.request.urlopen(url, context=ctx, timeout=60) as r, \
                        open(d / "plain.bin", "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
                    f.flush()
                    os.fsync(f.fileno())

            t_bare, _ = _timed(bare)
            t_plain, _ = _timed(plain)
            t_dl, _ = _timed(lambda: download(url, d / "dl" / "a.raucb", size, sha, tls=tls))
            dl_case = f"bundle {size / 2**20:.1f} MiB"
            rows.append(row("ota", "download https", dl_case, "seconds (size+sha256+fsync)",
                            t_dl, "urllib to file + fsync, no checks", t_plain, "s",
                            "<= 1.5x plain download", t_dl <= 1.5 * t_plain))
            rows.append(row("ota", "download https", dl_case, "seconds (size+sha256+fsync)",
                            t_dl, "bare urllib read to memory", t_bare, "s", "", None))
            srv.cut = CutPolicy(after_bytes=size // 2, times=1)
            n_before = len(srv.requests)
            t_res, got = _timed(lambda: download(url, d / "dl" / "b.raucb", size, sha, tls=tls,
                                                 backoff_s=0.05))
            ranges = [r[2] for r in srv.requests[n_before:]]
            refetched = 0 if ranges[-1] == f"bytes={size // 2}-" else size // 2
            rows.append(row("ota", "download resume", "cut at 50 %", "seconds", t_res,
                            "uncut download", t_dl, "s", "", None))
            rows.append(row("ota", "download resume", "cut at 50 %", "bytes fetched twice",
                            refetched, "restart from zero", size // 2, "B", "0",
                            refetched == 0 and got.attempts == 2))

        # ------------------------------------------------ install
        target = d / "copy.img"

        def copy() -> None:
            with open(rootfs, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())

        t_copy, _ = _timed(copy)
        with HostRauc(d / "rauc", COMPATIBLE, ca.ca_cert_path, slot_mb=mib) as host:
            t_info, _ = _timed(lambda: host.client.info(d / "dl" / "a.raucb"))
            t_inst, _ = _timed(lambda: host.client.install(d / "dl" / "a.raucb"))
            ok = sha256_file(host.slot_b) == sha256_file(rootfs)
        rows.append(row("ota", "verify (rauc info)", case, "seconds", t_info, "", None, "s",
                        "", None))
        rows.append(row("ota", "rauc install", case, "seconds", t_inst,
                        "copy image + fsync", t_copy, "s", "slot == image, <= 3x copy + 2 s",
                        ok and t_inst <= 3 * t_copy + 2.0))
    return rows


def main() -> None:
    """Print the rows as a table."""
    from bench.bench_all import module_main

    module_main(run, __doc__)


if __name__ == "__main__":
    main()
