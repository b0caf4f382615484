"""End to end (`make test-e2e`), issue 9: a box under qemu (TCG) running release 1 is updated
over MQTT by the fleet's rollout to release 2, reboots into slot B and reports it healthy; then
release 3, built to fail its health check, rolls back to release 2 by itself and the rollout
pauses on the failure.

The releases are made here from the built image (image/release_bundle.py: its rootfs with
/etc/echoel/release set, signed verity bundles under the image's development update CA) while
the box boots. Release 3 is "built to fail" honestly: its box.toml points the engine at a sound
card that does not exist (hw:NoSuchCard), so the health check never sees the engine running;
its [update] health_deadline_s is 150 s (release 2's is 600 s) so the rollback does not take
the default 5 minutes. The test plays the bootloader: qemu runs with -no-reboot, so a guest
reboot ends qemu; the harness reads RAUC's boot state on /data (boot_slot) and starts qemu on
that slot again. The figures go to build/image/qemu-amd64/e2e-update.json.

Skipped by `make test` (it takes ~20-30 minutes): only with ECHOEL_E2E=1, as root, with the
qemu image built (`make image BOARD=qemu-amd64`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from echoel.daemon import config
from echoel.daemon.child_processes import stop_all
from echoel.daemon.cli import main as echoel_main
from echoel.fleet.artifact_server import ArtifactServer
from echoel.fleet.rollout import RolloutBook
from echoel.fleet.store import FleetStore
from echoel.provisioning import image_layout
from echoel.provisioning.image_layout import ext4_read_text
from echoel.provisioning.update_signing import UpdateCa
from fleet_rig import FleetRig, wait_for
from qemu_rig import GUEST_HOST, OUT, built_image, flash, provision
from rig import short_tmpdir

from image.qemu_boot import QemuBox, boot_slot
from image.release_bundle import (
    BOX_TOML,
    RELEASE_FILE,
    Release,
    make_release,
    partition_offset,
    write_text,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]
faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where is it waiting?

BOX = "qemu-upd-1"
GROUP = "e2e-update"
EXTRA_DISK = 1536 << 20  # /data grows into this: it holds the downloaded bundle (~400 MB)
R1, R2, R3 = "2026.11.1", "2026.11.2", "2026.11.3"
ONLINE_TIMEOUT_S = 1200  # TCG on a loaded 2-core machine: minutes per boot
UPDATE_TIMEOUT_S = 1800  # download + install + reboot + health check
REBOOT_TIMEOUT_S = 300  # from the `rebooting` event to qemu ending
MAX_BOOTS = 6  # release 1, release 2 (B), release 3 (A), rolled back (B), two to spare
TOOLS = ("qemu-system-x86_64", "bmaptool", "mcopy", "debugfs", "mosquitto", "rauc",
         "mksquashfs", "resize2fs", "e2fsck")


@pytest.fixture(scope="module")
def image() -> Path:
    return built_image(TOOLS)


def _update_ca(work: Path) -> UpdateCa:
    """A copy of the image's update CA (its key must be there: the development CA)."""
    manifest = json.loads((OUT / "manifest.json").read_text())
    crt = Path(manifest["update_ca"]["path"])
    key = crt.with_name("update-ca.key")
    if not key.exists():
        pytest.skip(f"the image's update CA {crt} has no key beside it: this test signs "
                    "releases with the development CA (build the image without --update-ca)")
    ca = UpdateCa(work / "update-ca")
    ca.root.mkdir(parents=True)
    shutil.copy(crt, ca.ca_cert_path)
    shutil.copy(key, ca.root / "update-ca.key")
    return ca


def _box_toml(base: str, release: str, fail: bool) -> str:
    """The release's /etc/echoel/box.toml: the image's plus its update policy."""
    text = base.rstrip() + "\n"
    if fail:  # built to fail: the engine's sound card does not exist
        text, n = re.subn(r'(?m)^device = ".*"$', 'device = "hw:NoSuchCard"', text)
        assert n == 1, f"no engine device line in the image's box.toml:\n{base}"
    deadline = 150.0 if fail else 600.0
    policy = (f"# release {release}: update policy (TCG is slow; xruns under emulation are "
              f"not what this release is judged on)\nhealth_deadline_s = {deadline}\n"
              "health_settle_s = 20.0\nhealth_max_xruns = 1000000\n")
    # the image's box.toml has an [update] section already (reboot_command): add to it
    text, n = re.subn(r"(?m)^\[update\]\n", lambda m: m.group(0) + policy, text)
    assert n <= 1, f"two [update] sections in the image's box.toml:\n{base}"
    text = text if n else text + "\n[update]\n" + policy
    check = OUT / f"box-{release}.toml"
    check.write_text(text)
    config.load(check)  # the box's own loader: a release with a bad box.toml is not shipped
    check.unlink()
    return text


class Bootloader:
    """Plays the qemu target's bootloader: when qemu ends (the guest rebooted: -no-reboot),
    start it again on the slot RAUC's boot state names."""

    def __init__(self, card: Path, work: Path) -> None:
        self.card = card
        self.work = work
        self.box: QemuBox | None = None
        self.boots: list[dict] = []

    def boot(self) -> QemuBox:
        if len(self.boots) >= MAX_BOOTS:
            raise AssertionError(f"more than {MAX_BOOTS} boots: {self.boots}\n{self.tail()}")
        slot = boot_slot(self.card)
        self.box = QemuBox(self.card, self.work / f"boot-{len(self.boots) + 1}", slot)
        self.box.start()
        self.boots.append({"slot": slot, "started": time.monotonic(), "ended": None})
        return self.box

    def poll(self) -> None:
        """Restart qemu on the boot state's slot when the guest has rebooted."""
        if self.box is not None and not self.box.alive():
            self.boots[-1]["ended"] = time.monotonic()
            self.box.stop()
            self.boot()

    @property
    def slot(self) -> str:
        return self.boots[-1]["slot"] if self.boots else "?"

    def tail(self, n: int = 4000) -> str:
        return f"console of boot {len(self.boots)} (slot {self.slot}):\n" + \
            (self.box.serial()[-n:] if self.box else "")

    def stop(self) -> None:
        if self.box is not None:
            self.box.stop()


class Fleet:
    """Broker, `echoel fleet serve` (ingest + rollout worker) and the operator's CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rig = FleetRig(root)
        # the guest reaches the broker and the artifact server as 10.0.2.2
        self.rig.pki.issue("broker", "broker", dns=("localhost",), ips=("127.0.0.1", GUEST_HOST))
        self.rig.pki.issue("broker", "artifacts", ips=("127.0.0.1", GUEST_HOST))
        self.rig.start()
        self.cfg = self.rig.fleet_config(str(root / "fleet.db"))
        self.cfg.write_text(self.cfg.read_text() + "[rollout]\npoll_s = 0.5\n")
        self.store = FleetStore(str(root / "fleet.db"))
        self.book = RolloutBook(self.store)
        self.log = root / "service.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli", "fleet",
                                          "--fleet-config", str(self.cfg), "serve"],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: self.log.read_bytes().count(b"connected (session") >= 2 or
                 self.proc.poll() is not None, 120.0, 0.5, what="the fleet service")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        self.artifacts = root / "artifacts"
        self.artifacts.mkdir()
        crt, key = self.rig.pki.paths("broker", "artifacts")
        self.server = ArtifactServer(self.artifacts, "127.0.0.1", 0, crt, key).start()

    def cli(self, *args: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = echoel_main(["fleet", "--fleet-config", str(self.cfg), *args])
        assert rc == 0, f"echoel fleet {' '.join(args)} -> {rc}: {out.getvalue()}"
        return out.getvalue()

    def release_and_roll(self, rel: Release) -> int:
        """`release add` the bundle (served as https://10.0.2.2:PORT/NAME) and `rollout start`
        it to the group, all at once, pausing on the first failure."""
        name = Path(rel.bundle.path).name
        self.cli("release", "add", rel.bundle.path, "--name", rel.release, "--kind", "system",
                 "--url", self.server.url(name, GUEST_HOST))
        out = self.cli("rollout", "start", rel.release, "--group", GROUP, "--stages", "100%",
                       "--max-failures", "0", "--reboot", "now", "--update-timeout",
                       str(UPDATE_TIMEOUT_S), "--stage-timeout", str(UPDATE_TIMEOUT_S))
        return int(out.split()[1].rstrip(":"))

    def updates(self, release: str) -> list[dict]:
        """The box's update events for `release`, oldest first."""
        out = []
        for p in reversed(self.store.recent(BOX, "events", 500)):
            d = p.get("data") if isinstance(p.get("data"), dict) else p
            if p.get("kind") == "update" and d.get("release") == release:
                out.append(d)
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()
        stop_all([self.proc], 15.0)
        self.store.close()
        self.rig.stop()


def _slot_release(card: Path, slot: str) -> str | None:
    start, _ = partition_offset(card, 2 if slot == "A" else 3)
    text = ext4_read_text(card, RELEASE_FILE, start)
    return text.strip() if text else None


def _runs(states: list) -> list:
    """States without repeats in a row (progress events)."""
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def _phases(seen: dict[str, float], release: str) -> dict[str, float | None]:
    """Seconds between the update states the fleet stored (seen by polling each second)."""
    def span(a: str, b: str) -> float | None:
        ta, tb = seen.get(f"{release}:{a}"), seen.get(f"{release}:{b}")
        return round(tb - ta, 1) if ta is not None and tb is not None else None
    return {"download_verify_s": span("downloading", "installing"),
            "install_s": span("installing", "installed")}


def _host_download(fleet: Fleet, rel: Release, dest: Path) -> float:
    """The reference: the same bundle fetched on the host from the same server (https)."""
    from echoel.daemon.update_download import TlsFiles, download

    t0 = time.monotonic()
    download(fleet.server.url(Path(rel.bundle.path).name), dest, rel.bundle.size,
             rel.bundle.sha256, tls=TlsFiles(str(fleet.rig.pki.ca_cert_path)))
    secs = time.monotonic() - t0
    dest.unlink()
    return round(secs, 2)


def test_update_to_release_2_then_release_3_rolls_back(image: Path):
    root = short_tmpdir()
    fleet = boot = None
    builder: threading.Thread | None = None
    figures: dict = {}
    try:
        fleet = Fleet(root)
        card = root / "card.img"
        flash(image, card, EXTRA_DISK)
        p2, _ = partition_offset(card, 2)
        write_text(card, RELEASE_FILE, R1 + "\n", p2)  # the flashed card runs release 1
        provision(card, fleet.rig.pki, BOX, fleet.rig.broker.port, GROUP)

        # the releases are built while the box boots release 1
        ca = _update_ca(root)
        signing = ca.issue_signing("release")
        base_toml = ext4_read_text(image, BOX_TOML, partition_offset(image, 2)[0])
        assert base_toml, "the image has no /etc/echoel/box.toml"
        built: dict[str, Release | BaseException] = {}

        def build() -> None:
            for rel, fail in ((R2, False), (R3, True)):
                try:
                    built[rel] = make_release(image, rel, signing.cert, signing.key,
                                              fleet.artifacts / f"echoel-{rel}.raucb",
                                              ca.ca_cert_path, _box_toml(base_toml, rel, fail))
                except BaseException as exc:  # reported by the main thread
                    built[rel] = exc
        builder = threading.Thread(target=build, name="release-builder", daemon=True)
        builder.start()

        boot = Bootloader(card, root / "qemu")
        assert boot_slot(card) == "A", "a fresh card boots slot A"
        boot.boot()

        seen: dict[str, float] = {}  # "release:state" -> when the test first saw it

        def step_reboots() -> None:
            """Fail early when the box said `rebooting` but the guest never went down."""
            for k, t in seen.items():
                if k.endswith(":rebooting") and boot.boots[-1]["started"] < t and \
                        time.monotonic() - t > REBOOT_TIMEOUT_S:
                    raise AssertionError(f"the box reported {k} {time.monotonic() - t:.0f} s ago"
                                         f" but the guest did not reboot (slot {boot.slot} "
                                         "still running)")

        def wait(pred, timeout: float, what: str):
            def step():
                boot.poll()
                step_reboots()
                return pred()
            try:
                return wait_for(step, timeout, 1.0, what=what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nboots: {boot.boots}\n{boot.tail()}\n"
                                     f"fleet service log:\n"
                                     f"{fleet.log.read_text(errors='replace')[-2000:]}") \
                    from None

        def online() -> bool:
            return (fleet.store.device(BOX) or {}).get("state") == "online"

        wait(online, ONLINE_TIMEOUT_S, f"{BOX} online running release 1")
        figures["release1_online_s"] = round(time.monotonic() - boot.boots[0]["started"], 1)

        def bundle(rel: str) -> Release:
            wait(lambda: rel in built, 1800, f"the bundle of release {rel}")
            got = built[rel]
            if not isinstance(got, Release):
                raise AssertionError(f"release {rel} could not be built: {got}")
            figures.setdefault("bundles", {})[rel] = {
                "bytes": got.bundle.size, "rootfs_bytes": got.rootfs_bytes,
                "rootfs_s": got.rootfs_s, "bundle_s": got.bundle_s}
            return got

        r2 = bundle(R2)  # release 3 goes on building while release 2 rolls out

        # ---- release 2: downloaded, installed to B, reboot, healthy, rollout completed
        rid2 = fleet.release_and_roll(r2)
        t_cmd = time.monotonic()
        boots_before = len(boot.boots)

        def track(release: str) -> list[dict]:
            evs = fleet.updates(release)
            for ev in evs:
                seen.setdefault(f"{release}:{ev.get('state')}", time.monotonic())
            return evs

        def r2_done():
            track(R2)
            st = fleet.book.status(rid2)
            return st if st["state"] in ("completed", "paused", "aborted") else None

        st2 = wait(r2_done, UPDATE_TIMEOUT_S, f"rollout {rid2} of {R2} to end")
        states2 = [e.get("state") for e in track(R2)]
        assert st2["state"] == "completed", (st2["state"], st2["reason"], st2["failed"],
                                             states2, boot.tail())
        assert "healthy" in states2, states2
        assert len(boot.boots) == boots_before + 1 and boot.slot == "B", boot.boots
        # (the harness booted B: RAUC's boot state said so once the guest was down; /data is
        # read again at the end, when no guest has it mounted)
        assert _slot_release(card, "B") == R2  # written by RAUC, not mounted read-write
        assert fleet.store.device(BOX)["software"] == R2
        reboot2 = boot.boots[boots_before - 1]["ended"]
        figures["release2"] = {
            **_phases(seen, R2),
            "host_download_s": _host_download(fleet, r2, root / "host-dl.raucb"),
            "download_install_s": round(reboot2 - seen.get(f"{R2}:downloading", t_cmd), 1),
            "command_to_reboot_s": round(reboot2 - t_cmd, 1),
            "reboot_to_healthy_s": round(seen[f"{R2}:healthy"] - reboot2, 1),
            "states": _runs(states2)}

        # ---- release 3: installed to A, fails its health check, rolls back to B (release 2)
        r3 = bundle(R3)
        rid3 = fleet.release_and_roll(r3)
        t_cmd = time.monotonic()
        boots_before = len(boot.boots)

        def r3_done():
            states = [e.get("state") for e in track(R3)]
            st = fleet.book.status(rid3)
            return st if "rolled_back" in states and st["state"] != "running" else None

        st3 = wait(r3_done, UPDATE_TIMEOUT_S, f"{R3} rolled back and rollout {rid3} stopped")
        evs3 = track(R3)
        states3 = [e.get("state") for e in evs3]
        assert st3["state"] == "paused", (st3["state"], st3["reason"], states3)
        assert st3["failures"] >= 1 and st3["failed"][0]["device"] == BOX, st3["failed"]
        slots = [b["slot"] for b in boot.boots[boots_before - 1:]]
        assert slots == ["B", "A", "B"], f"slots booted since release 3: {slots}"
        assert _slot_release(card, "B") == R2 and _slot_release(card, "A") == R3
        # the health check's verdict: `rebooting` with the evidence, then `rolled_back`
        failure = next((e for e in evs3 if e.get("state") == "rebooting" and e.get("error")),
                       None)
        assert failure is not None and "engine" in failure["error"], evs3
        back_ev = next(e for e in evs3 if e.get("state") == "rolled_back")
        assert back_ev.get("error"), back_ev
        # the box is back: online on release 2
        wait(online, ONLINE_TIMEOUT_S, f"{BOX} online again after the rollback")
        reboot3 = boot.boots[boots_before - 1]["ended"]  # into A (release 3)
        back = boot.boots[boots_before]["ended"]  # health check gave up: back to B
        figures["release3"] = {
            **_phases(seen, R3),
            "download_install_s": round(reboot3 - seen.get(f"{R3}:downloading", t_cmd), 1),
            "reboot_to_rollback_reboot_s": round(back - reboot3, 1),
            "rollback_reboot_to_rolled_back_event_s": round(seen[f"{R3}:rolled_back"] - back,
                                                            1),
            "reboot_into_r3_to_rolled_back_s": round(seen[f"{R3}:rolled_back"] - reboot3, 1),
            "states": _runs(states3), "error": failure.get("error"),
            "rollout": {"state": st3["state"], "reason": st3["reason"]}}
        assert fleet.store.device(BOX)["software"] == R2
        figures["boots"] = [{"slot": b["slot"],
                             "s": round((b["ended"] or time.monotonic()) - b["started"], 1)}
                            for b in boot.boots]
        # RAUC's boot state as the guest left it (mounted: the kernel replays the journal
        # of qemu's power cut; debugfs on a live or unreplayed file system reads stale data)
        boot.stop()
        with image_layout.data_mounted(card) as data:
            state = {n: (data / "rauc" / "boot-state" / n).read_text().strip()
                     for n in ("primary", "state.A", "state.B")}
        assert state == {"primary": "B", "state.A": "bad", "state.B": "good"}, state
        assert boot_slot(card) == "B"
        (OUT / "e2e-update.json").write_text(json.dumps(figures, indent=1))
        print(f"\nqemu update e2e: {json.dumps(figures, indent=1)}")
    finally:
        if boot is not None:
            boot.stop()
        if builder is not None:
            builder.join(timeout=600)
        if fleet is not None:
            fleet.stop()
        if os.environ.get("ECHOEL_E2E_KEEP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
