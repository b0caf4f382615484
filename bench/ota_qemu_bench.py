"""OTA in qemu: the end-to-end update test's figures (tests/e2e/test_qemu_update.py).

Full run (root, qemu, the qemu image built): runs that test (~30 minutes under TCG) and reads
build/image/qemu-amd64/e2e-update.json. Quick run, or BENCH_OTA_QEMU=last: the figures of the
last such run (`make test-e2e` writes them too), if any.
Rows, each beside a reference from the same run:
- release bundle from the real image: rootfs extract + shrink, bundle build, sizes;
- download + verify in the guest beside the same bundle fetched on the host;
- RAUC install into slot B in the guest;
- reboot to healthy beside the first boot of release 1 to online;
- release 3 (built to fail): reboot into it to `rolled_back` beside its health deadline + a boot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOARD = "qemu-amd64"
FIGURES = ROOT / "build" / "image" / BOARD / "e2e-update.json"
TEST = ROOT / "tests" / "e2e" / "test_qemu_update.py"
GROUP = "ota qemu"
MIB = 1 << 20
R3_DEADLINE_S = 150.0  # release 3's [update] health_deadline_s (the test's)


def _row(kernel: str, case: str, metric: str, ours: float | None, reference: str = "",
         ref: float | None = None, unit: str = "s", goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric,
            "ours": None if ours is None else round(float(ours), 3), "reference": reference,
            "ref": None if ref is None else round(float(ref), 3), "unit": unit, "goal": goal,
            "met": met}


def rows_from(d: dict, when: str) -> list[dict]:
    """The table rows of one e2e-update.json."""
    rows = []
    for rel, b in sorted(d.get("bundles", {}).items()):
        rows.append(_row("release bundle", f"{rel} ({when})", "rootfs extract + shrink",
                         b["rootfs_s"], "bundle build (mksquashfs + sign)", b["bundle_s"]))
        rows.append(_row("release bundle", f"{rel} ({when})", "bundle size", b["bytes"] / MIB,
                         "shrunk rootfs", b["rootfs_bytes"] / MIB, unit="MiB",
                         goal="< rootfs", met=b["bytes"] < b["rootfs_bytes"]))
    r2, r3 = d.get("release2", {}), d.get("release3", {})
    size = d.get("bundles", {}).get("2026.11.2", {}).get("bytes")
    if r2:
        rows.append(_row("download + verify", f"release 2 in the guest ({when})", "seconds",
                         r2.get("download_verify_s"), "same bundle, host https",
                         r2.get("host_download_s")))
        if size and r2.get("install_s"):
            rows.append(_row("rauc install", f"release 2 -> slot B ({when})",
                             f"seconds ({size / MIB:.0f} MiB bundle, verity)", r2["install_s"],
                             "download + verify, same bundle and guest",
                             r2.get("download_verify_s")))
        rows.append(_row("reboot to healthy", f"release 2, slot B ({when})", "seconds",
                         r2["reboot_to_healthy_s"], "first boot of release 1 to online",
                         d.get("release1_online_s"), goal="before the 600 s deadline",
                         met=r2["reboot_to_healthy_s"] < 600))
        rows.append(_row("command to reboot", f"release 2 ({when})", "seconds",
                         r2["command_to_reboot_s"]))
    if r3:
        ref = R3_DEADLINE_S + (r2.get("reboot_to_healthy_s") or 0)
        rows.append(_row("rollback", f"release 3 fails its check ({when})",
                         "reboot into it to rolled_back reported", r3[
                             "reboot_into_r3_to_rolled_back_s"],
                         "its health deadline + release 2's reboot to healthy", ref,
                         goal="<= ref + 120 s", met=r3["reboot_into_r3_to_rolled_back_s"] <=
                         ref + 120))
        rows.append(_row("rollout", f"release 3 ({when})", "stopped by itself",
                         1.0 if r3.get("rollout", {}).get("state") == "paused" else 0.0,
                         unit="", goal="paused", met=r3.get("rollout", {}).get("state") ==
                         "paused"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Quick: the last run's figures. Full: run the end-to-end update test first."""
    if os.environ.get("BENCH_OTA_QEMU") == "last":
        quick = True
    if not quick:
        if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
            return [_row("qemu update", BOARD, "skipped", None, unit="",
                         goal="root and qemu-system-x86", met=False)]
        FIGURES.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(TEST)], cwd=ROOT, env={**os.environ, "ECHOEL_E2E": "1"},
                           capture_output=True, text=True, timeout=4 * 3600)
        if r.returncode != 0 or not FIGURES.exists():
            return [_row("qemu update", BOARD, "end-to-end update test failed", None, unit="",
                         goal=r.stdout.strip()[-200:], met=False)]
    if not FIGURES.exists():
        return [_row("qemu update", BOARD, "no figures yet", None, unit="",
                     goal="run `make test-e2e` or the full bench", met=None)]
    return rows_from(json.loads(FIGURES.read_text()), "this run" if not quick else "last run")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from bench.bench_all import module_main

    module_main(run, __doc__)
