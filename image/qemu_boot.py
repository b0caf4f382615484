"""Boot a flashed qemu-amd64 image under qemu (TCG): the "bootloader" of the qemu target.

    python image/qemu_boot.py IMAGE [--slot A|B] [--seconds N]

Like a board's bootloader it reads the A/B state the RAUC backend keeps on the data partition
(/data/rauc/boot-state: primary, state.A, state.B) and boots the primary slot when it is good,
else the other one. The kernel, initrd and each slot's command line come from the boot
partition (p1). Nothing is mounted: p1 is read with mtools and p4 with debugfs at the
partition's offset, so no root and no loop device are needed. KVM is not used (it does not
boot a stock Debian kernel on this machine's PVM); TCG does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echoel.daemon.child_processes import stop_all
from echoel.provisioning.image_layout import ext4_read_text, read_partitions

QEMU = "qemu-system-x86_64"


class BootError(RuntimeError):
    """The image cannot be booted; the message says what is missing."""


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except FileNotFoundError:
        raise BootError(f"{what}: {cmd[0]} is not installed") from None
    if r.returncode != 0:
        raise BootError(f"{what}: {' '.join(cmd)} exited {r.returncode}: "
                        f"{r.stderr.decode(errors='replace').strip()}")
    return r


def read_boot_file(image: Path, name: str, dest: Path) -> Path:
    """Copy one file from the boot partition (p1, vfat) of image to dest."""
    p1 = next((p for p in read_partitions(image) if p.number == 1), None)
    if p1 is None:
        raise BootError(f"{image}: no partition 1 (boot)")
    _run(["mcopy", "-o", "-n", "-i", f"{image}@@{p1.start}", f"::{name}", str(dest)],
         f"{image} p1 {name}")
    return dest


def read_data_file(image: Path, path: str) -> str | None:
    """The text of a file of the data partition (p4, ext4), or None when it is absent."""
    p4 = next((p for p in read_partitions(image) if p.number == 4), None)
    if p4 is None:
        raise BootError(f"{image}: no partition 4 (data)")
    return ext4_read_text(image, path, p4.start)


def boot_slot(image: Path) -> str:
    """The slot to boot, as the RAUC file backend left it: primary if good, else the other."""
    state = "/rauc/boot-state"
    primary = (read_data_file(image, f"{state}/primary") or "A").strip()
    if primary not in ("A", "B"):
        raise BootError(f"{image}: /data{state}/primary holds {primary!r}; allowed: A, B")
    other = "B" if primary == "A" else "A"
    for slot in (primary, other):
        if (read_data_file(image, f"{state}/state.{slot}") or "good").strip() == "good":
            return slot
    raise BootError(f"{image}: no good slot in /data{state} (A and B are both bad)")


class QemuBox:
    """One qemu-system-x86_64 (TCG) running a flashed image; start(), stop()."""

    def __init__(self, image: Path, workdir: Path, slot: str | None = None, memory_mb: int = 1024,
                 cpus: int = 2) -> None:
        self.image = Path(image)
        self.workdir = Path(workdir)
        self.slot = slot
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.serial_log = self.workdir / "serial.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def command(self) -> list[str]:
        """The qemu command line (kernel, initrd and cmdline of the chosen slot)."""
        slot = self.slot or boot_slot(self.image)
        self.slot = slot
        kernel = read_boot_file(self.image, "vmlinuz", self.workdir / "vmlinuz")
        initrd = read_boot_file(self.image, "initrd.img", self.workdir / "initrd.img")
        cmdline_file = read_boot_file(self.image, f"cmdline-{slot.lower()}.txt",
                                      self.workdir / f"cmdline-{slot.lower()}.txt")
        cmdline = cmdline_file.read_text().strip()
        return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(self.memory_mb),
                "-smp", str(self.cpus), "-nographic", "-monitor", "none", "-no-reboot",
                "-drive", f"file={self.image},format=raw,if=virtio,cache=writeback",
                "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
                "-nic", "user,model=virtio-net-pci", "-serial", f"file:{self.serial_log}",
                "-pidfile", str(self.workdir / "qemu.pid")]

    def start(self) -> QemuBox:
        """Start qemu in the background."""
        if shutil.which(QEMU) is None:
            raise BootError(f"{QEMU} is not installed: apt-get install qemu-system-x86")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        out = open(self.workdir / "qemu.log", "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        out.close()
        return self

    def serial(self) -> str:
        """The guest's console output so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        """qemu is still running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop qemu by its PID (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        stop_all([self.proc], timeout)
        self.proc = None
        with contextlib.suppress(OSError):
            os.unlink(self.workdir / "qemu.pid")


def main(argv: list[str] | None = None) -> int:
    """CLI: boot an image and show its console until qemu exits or --seconds pass."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--slot", choices=("A", "B"), help="default: from the boot state on p4")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    ap.add_argument("--workdir", default="")
    a = ap.parse_args(argv)
    import tempfile

    work = Path(a.workdir or tempfile.mkdtemp(prefix="echoel-qemu-"))
    box = QemuBox(Path(a.image), work, a.slot)
    try:
        box.start()
        print(f"qemu pid {box.proc.pid if box.proc else '?'} slot {box.slot}; console in "
              f"{box.serial_log}", flush=True)
        shown = 0
        end = time.monotonic() + a.seconds if a.seconds else float("inf")
        while box.alive() and time.monotonic() < end:
            text = box.serial()
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
            time.sleep(0.5)
    except BootError as exc:
        print(f"qemu_boot: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        box.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
