"""RAUC from Python through its command line (`rauc`, which talks to the RAUC D-Bus service).

The CLI is used rather than D-Bus directly: it is what a technician types, its messages are the
ones RAUC documents, `rauc info` checks a bundle (signature, compatible, version) locally without
touching a slot, and `rauc install` prints its progress line by line ("NN% text"). Debian's
RAUC 1.8 needs its D-Bus service for status/install/mark: on the box it is D-Bus activated
(image/rauc/); on a build host HostRauc runs a private system bus and `rauc service` with
file-backed slots (tests, benchmark).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from echoel.drivers.private_dbus import BUS_CONFIG

PROGRESS_RE = re.compile(r"^\s*(\d{1,3})%\s+(.*)$")
INSTALL_TIMEOUT_S = 3600.0
CMD_TIMEOUT_S = 60.0
TEMPLATE = Path(__file__).resolve().parents[1] / "image" / "rauc" / "system.conf.in"
FILE_BACKEND = Path(__file__).resolve().parents[1] / "image" / "rauc" / "backend-file.sh"


class RaucError(RuntimeError):
    """RAUC refused or failed; `message` is RAUC's own last words, `command` what ran."""

    def __init__(self, command: str, message: str) -> None:
        self.command, self.message = command, message
        super().__init__(f"rauc {command}: {message}")


@dataclass(frozen=True)
class Slot:
    """One slot as `rauc status` reports it."""

    name: str
    bootname: str
    device: str
    state: str  # booted, active, inactive
    boot_status: str  # good, bad
    bundle_version: str | None = None


@dataclass(frozen=True)
class Status:
    """The system as RAUC sees it."""

    compatible: str
    booted: str  # bootname of the running slot
    boot_primary: str  # slot name (rootfs.0) the bootloader starts next
    slots: list[Slot] = field(default_factory=list)

    def slot(self, bootname: str) -> Slot:
        """The slot with this bootname."""
        for s in self.slots:
            if s.bootname == bootname:
                return s
        raise KeyError(f"no slot with bootname {bootname!r} (have "
                       f"{[s.bootname for s in self.slots]})")

    @property
    def primary_bootname(self) -> str:
        """Bootname of the slot the bootloader starts next."""
        for s in self.slots:
            if s.name == self.boot_primary:
                return s.bootname
        return ""


@dataclass(frozen=True)
class BundleInfo:
    """What `rauc info` read from a bundle whose signature it accepted."""

    compatible: str
    version: str
    build: str
    images: dict[str, str]  # slot class -> sha256


def _last_words(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith("rauc-Message")] or lines
    return " | ".join(keep[-3:])[-600:] or "(no message)"


class RaucClient:
    """The `rauc` command with a fixed config and environment."""

    def __init__(self, conf: str | Path | None = None, env: dict[str, str] | None = None,
                 rauc: str = "rauc") -> None:
        self.conf = str(conf) if conf else None
        self.env = {**os.environ, **(env or {})}
        self.rauc = rauc

    def _cmd(self, *args: str) -> list[str]:
        conf = [f"--conf={self.conf}"] if self.conf else []
        return [self.rauc, *conf, *args]

    def _run(self, *args: str, timeout: float = CMD_TIMEOUT_S) -> str:
        try:
            r = subprocess.run(self._cmd(*args), capture_output=True, text=True, env=self.env,
                               timeout=timeout)
        except FileNotFoundError:
            raise RaucError(args[0], f"{self.rauc} not found (apt-get install rauc)") from None
        except subprocess.TimeoutExpired:
            raise RaucError(args[0], f"no answer within {timeout:g} s") from None
        if r.returncode != 0:
            raise RaucError(" ".join(args[:2]), _last_words(r.stderr + "\n" + r.stdout))
        return r.stdout

    def status(self) -> Status:
        """`rauc status --detailed`: booted slot, primary, every slot's state and version."""
        doc = json.loads(self._run("status", "--detailed", "--output-format=json"))
        slots = []
        for entry in doc.get("slots", []):
            for name, s in entry.items():
                bundle = (s.get("slot_status") or {}).get("bundle") or {}
                slots.append(Slot(name, s.get("bootname") or "", s.get("device") or "",
                                  s.get("state") or "", s.get("boot_status") or "",
                                  bundle.get("version")))
        slots.sort(key=lambda s: s.name)
        return Status(doc.get("compatible") or "", doc.get("booted") or "",
                      doc.get("boot_primary") or "", slots)

    def booted(self) -> str:
        """Bootname of the running slot (A or B)."""
        return self.status().booted

    def compatible(self) -> str:
        """The system's compatible string (system.conf)."""
        return self.status().compatible

    def info(self, bundle: str | Path) -> BundleInfo:
        """Check a bundle's signature against the keyring and read its manifest (no slot is
        touched); RaucError carries RAUC's reason for refusing it."""
        doc = json.loads(self._run("info", "--output-format=json", str(bundle)))
        images = {}
        for entry in doc.get("images", []):
            for cls, img in entry.items():
                images[cls] = img.get("checksum", "")
        return BundleInfo(doc.get("compatible") or "", doc.get("version") or "",
                          doc.get("build") or "", images)

    def install(self, bundle: str | Path,
                progress: Callable[[int, str], None] | None = None,
                timeout: float = INSTALL_TIMEOUT_S) -> None:
        """Install a bundle into the other slot, reporting (percent, step) as RAUC goes."""
        try:
            proc = subprocess.Popen(self._cmd("install", str(bundle)), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=self.env)
        except FileNotFoundError:
            raise RaucError("install", f"{self.rauc} not found (apt-get install rauc)") from None
        out: list[str] = []
        end = time.monotonic() + timeout
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                out.append(line)
                m = PROGRESS_RE.match(line)
                if m and progress is not None:
                    progress(min(100, int(m.group(1))), m.group(2).strip())
                if time.monotonic() > end:
                    raise RaucError("install", f"not finished within {timeout:g} s")
            rc = proc.wait(timeout=max(1.0, end - time.monotonic()))
        except (RaucError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            raise RaucError("install", f"not finished within {timeout:g} s") from None
        if rc != 0:
            raise RaucError("install", _last_words("".join(out)))

    def mark_good(self, slot: str = "booted") -> None:
        """Mark a slot good (`booted`, `other` or a slot name)."""
        self._run("status", "mark-good", slot)

    def mark_bad(self, slot: str = "booted") -> None:
        """Mark a slot bad: the bootloader will not start it again."""
        self._run("status", "mark-bad", slot)

    def mark_active(self, slot: str = "other") -> None:
        """Make a slot the one the bootloader starts next."""
        self._run("status", "mark-active", slot)


def render_system_conf(path: Path, *, compatible: str, slot_a: Path, slot_b: Path,
                       keyring: Path, data_dir: Path, mount_prefix: Path,
                       backend: Path = FILE_BACKEND, bundle_formats: str = "plain",
                       template: Path = TEMPLATE) -> Path:
    """Write a system.conf from image/rauc/system.conf.in."""
    text = template.read_text().format(
        compatible=compatible, slot_a=slot_a, slot_b=slot_b, keyring=keyring,
        data_dir=data_dir, mount_prefix=mount_prefix, backend=backend,
        bundle_formats=bundle_formats)
    path.write_text(text)
    return path




def host_missing() -> str | None:
    """Why RAUC cannot run on this host (None when it can): root, rauc, dbus, mkfs, loop."""
    if os.geteuid() != 0:
        return "not root (RAUC mounts bundles through loop devices)"
    for tool, pkg in (("rauc", "rauc"), ("dbus-daemon", "dbus"), ("mksquashfs", "squashfs-tools"),
                      ("mkfs.ext4", "e2fsprogs")):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install {pkg})"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (loop devices are needed to mount a bundle)"
    return None


class HostRauc:
    """RAUC on a build host: a private system bus, `rauc service` pretending to have booted
    slot A or B, two file-backed ext4 slots and the file bootloader backend (tests, benchmark).

    Use as a context manager; everything it starts is stopped by its PID, every file is in
    `root` (the caller's temp folder).
    """

    def __init__(self, root: Path, compatible: str, keyring: Path, slot_mb: int = 8) -> None:
        self.root = Path(root)
        self.compatible = compatible
        self.keyring = Path(keyring)
        self.slot_mb = slot_mb
        self.slot_a, self.slot_b = self.root / "slotA.img", self.root / "slotB.img"
        self.boot_state = self.root / "boot-state"
        self.socket = self.root / "system_bus.sock"
        self.conf = self.root / "system.conf"
        self.dbus: subprocess.Popen | None = None
        self.service: subprocess.Popen | None = None
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.socket}",
                    "ECHOEL_BOOT_STATE": str(self.boot_state)}
        self.client = RaucClient(self.conf, self.env)

    def __enter__(self) -> HostRauc:
        self.root.mkdir(parents=True, exist_ok=True)
        for p in (self.slot_a, self.slot_b):
            with open(p, "wb") as f:
                f.truncate(self.slot_mb * 1024 * 1024)
        (self.root / "data").mkdir(exist_ok=True)
        (self.root / "mnt").mkdir(exist_ok=True)
        render_system_conf(self.conf, compatible=self.compatible, slot_a=self.slot_a,
                           slot_b=self.slot_b, keyring=self.keyring.resolve(),
                           data_dir=self.root / "data", mount_prefix=self.root / "mnt")
        bus_conf = self.root / "bus.conf"
        bus_conf.write_text(BUS_CONFIG.format(socket=self.socket))
        try:
            self.dbus = subprocess.Popen(["dbus-daemon", f"--config-file={bus_conf}",
                                          "--nofork", "--nopidfile"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for(lambda: self.socket.exists(), 10.0, "the private D-Bus socket")
            self.boot("A")
        except BaseException:
            self.close()
            raise
        return self

    def boot(self, bootname: str) -> None:
        """(Re)start `rauc service` as if the box had booted `bootname`."""
        self._stop_service()
        log = open(self.root / f"rauc-service-{bootname}.log", "ab")
        self.service = subprocess.Popen(
            ["rauc", f"--conf={self.conf}", f"--override-boot-slot={bootname}", "service"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        log.close()

        def up() -> bool:
            try:
                return self.client.status().booted == bootname
            except RaucError:
                return False

        _wait_for(up, 30.0, "rauc service on the private bus")

    def primary(self) -> str:
        """What the file backend would boot next."""
        return subprocess.run([str(FILE_BACKEND), "get-primary"], capture_output=True,
                              text=True, env={**os.environ, **self.env},
                              check=True).stdout.strip()

    def _stop_service(self) -> None:
        if self.service is not None:
            _stop(self.service)
            self.service = None

    def close(self) -> None:
        """Stop rauc service and the bus (by PID), leave no mount behind."""
        self._stop_service()
        if self.dbus is not None:
            _stop(self.dbus)
            self.dbus = None
        mnt = self.root / "mnt"
        if mnt.is_dir():
            for sub in mnt.iterdir():
                if os.path.ismount(sub):
                    subprocess.run(["umount", "-l", str(sub)], capture_output=True, check=False)

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RaucError("service", f"{what} did not come up within {timeout:g} s")
        time.sleep(0.1)


@contextlib.contextmanager
def host_rauc(compatible: str, keyring: Path, slot_mb: int = 8) -> Iterator[HostRauc]:
    """A HostRauc in a fresh temp folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="echoel-rauc-") as td, \
            HostRauc(Path(td), compatible, keyring, slot_mb) as h:
        yield h
