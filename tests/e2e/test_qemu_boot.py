"""End to end (`make test-e2e`): the qemu-amd64 image is flashed to a file, provisioned, booted
under qemu (TCG), and the box's agent reaches mosquitto on the host's loopback (10.0.2.2 from
the guest) and shows up online in the fleet service with its engine running on snd-dummy.

Skipped by `make test` (it takes minutes): it runs only with ECHOEL_E2E=1, as root, with the
image built (`make image BOARD=qemu-amd64`; built here when absent).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from echoel.fleet import fleet_config
from echoel.fleet.ingest_service import FleetService
from echoel.fleet.store import FleetStore
from echoel.provisioning import image_layout
from echoel.provisioning.provision import read_back
from fleet_rig import FleetRig, wait_for
from qemu_rig import GUEST_HOST, OUT, built_image, flash, provision
from rig import short_tmpdir

from image.qemu_boot import QemuBox, boot_slot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

BOX = "qemu-box-1"
EXTRA_DISK = 512 * 1024 * 1024  # the "card" is bigger than the image: /data must grow
ONLINE_TIMEOUT_S = 1200  # TCG on a loaded 2-core machine: minutes, not seconds


@pytest.fixture(scope="module")
def image() -> Path:
    return built_image()


def _numba_files(data_root: Path) -> set[str]:
    cache = data_root / "echoel" / "cache" / "numba"
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def _engine(store: FleetStore) -> dict:
    for t in store.recent(BOX, "telemetry", 5):
        eng = t.get("engine") or {}
        if eng.get("state") == "running":
            return eng
    return {}


def test_image_boots_and_joins_the_fleet(image: Path):
    root = short_tmpdir()
    rig = svc = store = box = None
    try:
        rig = FleetRig(root)
        # the guest reaches the broker as 10.0.2.2: the broker's certificate must name it
        rig.pki.issue("broker", "broker", dns=("localhost",), ips=("127.0.0.1", GUEST_HOST))
        rig.start()
        store = FleetStore(str(root / "fleet.db"))
        svc = FleetService(store, fleet_config.link(fleet_config.load(
            rig.fleet_config(str(root / "fleet.db")))), workers=2)
        svc.start()

        card = root / "card.img"
        flash(image, card, EXTRA_DISK)
        assert subprocess.run(["cmp", "-n", str(image.stat().st_size), str(image), str(card)],
                              capture_output=True, timeout=600).returncode == 0, \
            "the flashed file differs from the image"
        parts_before = {p.number: p for p in image_layout.read_partitions(card)}
        provision(card, rig.pki, BOX, rig.broker.port, "e2e")
        prov = read_back(card)
        assert prov["provision"]["device_id"] == BOX
        assert prov["provision"]["broker_host"] == GUEST_HOST

        box = QemuBox(card, root / "qemu")
        assert boot_slot(card) == "A", "a fresh image boots slot A"
        box.start()
        t0 = box.started_at
        seen: dict[str, float] = {}

        def online() -> bool:
            if "login:" in box.serial() and "login" not in seen:
                seen["login"] = time.monotonic() - t0  # the base system is up
            if not box.alive():
                pytest.fail(f"qemu exited: {box.serial()[-3000:]}")
            return (store.device(BOX) or {}).get("state") == "online"

        wait_for(online, ONLINE_TIMEOUT_S, step=1.0,
                 what=f"{BOX} online in the fleet (console: {box.serial_log})")
        online_s = time.monotonic() - t0
        engine = wait_for(lambda: _engine(store), 600, step=1.0,
                          what="telemetry with the engine running")
        engine_s = time.monotonic() - t0
        console = box.serial()

        dev = store.device(BOX)
        assert dev["state"] == "online"
        assert "Dummy" in json.dumps(engine["device"]), engine
        assert "echoel-firstboot: grew data partition" in console, console[-3000:]
        assert "provisioning applied" in console, console[-3000:]
        failed = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", console).splitlines()
                  if "FAILED" in ln]
        assert not [ln for ln in failed if re.search(r"echoel|data\.mount|boot-firm", ln)], \
            failed

        box.stop()
        # numba's cache ships on /data: files added at boot are kernels compiled in the guest
        with image_layout.data_mounted(image, readonly=True) as d:
            shipped = _numba_files(d)
        with image_layout.data_mounted(card) as d:  # read-write: qemu's stop was a power cut
            after_boot = _numba_files(d)  # and the journal needs replaying
        assert shipped, "the image ships no numba cache"
        parts_after = {p.number: p for p in image_layout.read_partitions(card)}
        assert parts_after[4].end == card.stat().st_size, "data did not grow to the disk end"
        assert parts_after[4].size > parts_before[4].size
        assert {n: (p.start, p.size) for n, p in parts_after.items() if n < 4} == \
            {n: (p.start, p.size) for n, p in parts_before.items() if n < 4}
        result = {"online_s": round(online_s, 1), "engine_running_s": round(engine_s, 1),
                  "login_prompt_s": round(seen["login"], 1) if "login" in seen else None,
                  "failed_units_on_console": failed,
                  "engine": engine, "data_mib_before": parts_before[4].size >> 20,
                  "data_mib_after": parts_after[4].size >> 20,
                  "numba_cache_files_shipped": len(shipped),
                  "numba_cache_files_added_at_boot": sorted(after_boot - shipped)}
        (OUT / "e2e.json").write_text(json.dumps(result, indent=1))
        print(f"\nqemu boot to online in the fleet: {online_s:.0f} s; engine running: "
              f"{engine_s:.0f} s; {result}")
    finally:
        if box is not None:
            box.stop()
        if svc is not None:
            svc.stop()
        if store is not None:
            store.close()
        if rig is not None:
            rig.stop()
        keep = os.environ.get("ECHOEL_E2E_KEEP")
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
