"""The box's disk layout: find its partitions in an image file or on a card, reach the data
partition, and write files into it.

Agreed layout (the image recipe builds it; keep it exact): an MBR partition table, partitions
aligned to 4 MiB:

    p1  boot      vfat  label ECHOEL-BOOT
    p2  rootfs A  ext4  label echoel-a
    p3  rootfs B  ext4  label echoel-b
    p4  data      ext4  label echoel-data   (mounted at /data on the box)

The MBR is parsed here (no partition nodes are needed: this kernel gives none for loop devices).
The data partition is reached through a loop device with --offset/--sizelimit on the image file
or the whole block device, mounted in a private temp folder, and always unmounted and detached
again, also on errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
ALIGN = 4 * 1024 * 1024
DATA_PART = 4
DATA_LABEL = "echoel-data"
LABELS = {1: "ECHOEL-BOOT", 2: "echoel-a", 3: "echoel-b", 4: DATA_LABEL}
MBR_TYPES = {1: 0x0C, 2: 0x83, 3: 0x83, 4: 0x83}  # FAT32 LBA, Linux x3
BLKGETSIZE64 = 0x80081272
CMD_TIMEOUT_S = 120.0


class LayoutError(RuntimeError):
    """An image or card that does not have the agreed layout, or cannot be reached."""


@dataclass(frozen=True)
class Partition:
    """One MBR primary partition, in bytes from the start of the disk."""

    number: int
    type_id: int
    start: int
    size: int
    bootable: bool

    @property
    def end(self) -> int:
        """First byte after the partition."""
        return self.start + self.size


def is_block_device(path: str | Path) -> bool:
    """True when path is a block device node."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def target_size(path: str | Path) -> int:
    """Size in bytes of an image file or a block device (0 for a file not yet there)."""
    path = Path(path)
    if is_block_device(path):
        rdev = os.stat(path).st_rdev
        sysfs = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size")
        with contextlib.suppress(OSError, ValueError):
            return int(sysfs.read_text()) * SECTOR  # sysfs counts 512-byte sectors
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        finally:
            os.close(fd)
        return struct.unpack("Q", buf)[0]
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(size)


def read_partitions(target: str | Path) -> list[Partition]:
    """The MBR primary partitions of an image file or a block device, by number."""
    target = Path(target)
    try:
        mbr = _read_at(target, 0, SECTOR)
    except OSError as exc:
        raise LayoutError(f"{target}: cannot read the partition table: {exc.strerror}") from None
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise LayoutError(f"{target}: no MBR partition table (no 55 AA signature at byte 510); "
                          "flash the Echoel image first")
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        boot, ptype = entry[0], entry[4]
        lba, count = struct.unpack("<II", entry[8:16])
        if ptype == 0 or count == 0:
            continue
        if ptype == 0xEE:
            raise LayoutError(f"{target}: a GPT disk; the Echoel layout uses an MBR table")
        parts.append(Partition(i + 1, ptype, lba * SECTOR, count * SECTOR, boot == 0x80))
    return parts


def ext4_label(target: str | Path, offset: int) -> str | None:
    """The label of the ext2/3/4 file system at offset, or None when there is none."""
    sb = _read_at(Path(target), offset + 1024, 1024)
    if len(sb) < 0x88 or sb[0x38:0x3A] != b"\x53\xef":
        return None
    return sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")


def ext4_read_text(target: str | Path, path: str, offset: int = 0) -> str | None:
    """A file of the ext4 file system at `offset` in an image (debugfs, nothing mounted), or
    None when it is absent. debugfs does not replay the journal: read file systems that no
    one has mounted read-write since their last clean unmount."""
    fs = f"{target}?offset={offset}" if offset else str(target)
    r = subprocess.run(["debugfs", "-R", f"cat {path}", fs], capture_output=True, timeout=120,
                       check=False)
    text = r.stdout.decode(errors="replace")
    return text if r.returncode == 0 and text else None


def data_partition(target: str | Path) -> Partition:
    """Partition 4 of the agreed layout, checked: ext4, label echoel-data, inside the disk."""
    target = Path(target)
    parts = {p.number: p for p in read_partitions(target)}
    if DATA_PART not in parts:
        raise LayoutError(f"{target}: no partition {DATA_PART}; the Echoel layout has boot, "
                          "rootfs A, rootfs B and data (p4)")
    p = parts[DATA_PART]
    size = target_size(target)
    if p.end > size:
        raise LayoutError(f"{target}: partition 4 ends at byte {p.end}, beyond the end of the "
                          f"disk ({size} bytes): a truncated image or a card too small")
    label = ext4_label(target, p.start)
    if label != DATA_LABEL:
        what = "no ext4 file system" if label is None else f"an ext4 labelled {label!r}"
        raise LayoutError(f"{target}: partition 4 holds {what}; expected ext4 labelled "
                          f"{DATA_LABEL!r}")
    return p


def _run(cmd: list[str], what: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
                             check=False)
    except FileNotFoundError:
        raise LayoutError(f"{what}: {cmd[0]} is not installed (apt-get install "
                          f"{_PACKAGES.get(cmd[0], cmd[0])})") from None
    except subprocess.TimeoutExpired:
        raise LayoutError(f"{what}: {' '.join(cmd)} did not finish in "
                          f"{CMD_TIMEOUT_S:.0f} s") from None
    if out.returncode != 0:
        raise LayoutError(f"{what}: {' '.join(cmd)} failed: "
                          f"{(out.stderr or out.stdout).strip()}")
    return out.stdout


_PACKAGES = {"losetup": "util-linux", "mount": "mount", "umount": "mount",
             "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "mkfs.vfat": "dosfstools",
             "e2fsck": "e2fsprogs"}


@contextlib.contextmanager
def attached(target: str | Path, part: Partition, readonly: bool = False) -> Iterator[Path]:
    """A loop device over one partition of target (offset/sizelimit); detached on exit."""
    cmd = ["losetup", "--find", "--show", "--offset", str(part.start),
           "--sizelimit", str(part.size)]
    if readonly:
        cmd.append("--read-only")
    dev = None
    for attempt in range(5):  # another process may take the free loop device first
        try:
            dev = Path(_run([*cmd, str(target)], f"{target} p{part.number}").strip())
            break
        except LayoutError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    assert dev is not None
    try:
        yield dev
    finally:
        _detach(dev)


def _detach(dev: Path) -> None:
    """Detach a loop device. While another process has it open (udev, a blkid, another
    losetup looking for a free device) the kernel only marks it to detach on last close:
    wait a little for that, then leave it to the kernel."""
    status = Path("/sys/block") / dev.name / "loop"
    for attempt in range(20):
        if not status.exists():
            return
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True,
                       timeout=CMD_TIMEOUT_S, check=False)
        if not status.exists():
            return
        time.sleep(0.05 * (attempt + 1))


@contextlib.contextmanager
def mounted(target: str | Path, part: Partition, readonly: bool = False) -> Iterator[Path]:
    """Partition part of target mounted in a private temp folder (0700); always unmounted,
    detached and removed again, also when the body raises."""
    with attached(target, part, readonly) as dev:
        where = Path(tempfile.mkdtemp(prefix="echoel-p4-"))
        os.chmod(where, 0o700)
        try:
            opts = "ro,nosuid,nodev,noexec" if readonly else "nosuid,nodev,noexec"
            _run(["mount", "-t", "ext4", "-o", opts, str(dev), str(where)],
                 f"{target} p{part.number}")
            try:
                yield where
            finally:
                _unmount(where)
        finally:
            with contextlib.suppress(OSError):
                where.rmdir()


def _unmount(where: Path) -> None:
    for attempt in range(10):
        r = subprocess.run(["umount", str(where)], capture_output=True, text=True,
                           timeout=CMD_TIMEOUT_S, check=False)
        if r.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))
    subprocess.run(["umount", "--lazy", str(where)], capture_output=True,
                   timeout=CMD_TIMEOUT_S, check=False)


@contextlib.contextmanager
def data_mounted(target: str | Path, readonly: bool = False) -> Iterator[Path]:
    """The data partition (p4) of an image file or a card, mounted privately; after a
    writable mount the target itself is flushed (a card may be pulled right after)."""
    with mounted(target, data_partition(target), readonly) as where:
        yield where
    if not readonly:
        sync_target(target)


def sync_target(target: str | Path) -> None:
    """Flush what the loop device wrote through the page cache down to the file or card."""
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file whole or not at all: temp file with its mode, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def build_image(path: str | Path, part_mib: tuple[int, int, int, int] = (8, 8, 8, 12),
                root_tree: str | Path | None = None) -> list[Partition]:
    """A blank image with the agreed layout (for tests and benchmarks; the real images come
    from genimage): sfdisk and mkfs at offsets, no loop device, no root needed. root_tree,
    if given, fills rootfs A (mke2fs -d)."""
    path = Path(path)
    mib = 1024 * 1024
    if any(s < 4 for s in part_mib):
        raise LayoutError(f"partition sizes {part_mib} MiB: each must be at least 4 MiB")
    sizes = [s * mib for s in part_mib]
    starts = [ALIGN]
    for s in sizes[:-1]:
        starts.append(starts[-1] + -(-s // ALIGN) * ALIGN)
    total = starts[-1] + sizes[-1]
    with open(path, "wb") as f:
        f.truncate(total)
    table = "label: dos\n" + "".join(
        f"start={st // SECTOR}, size={sz // SECTOR}, type={MBR_TYPES[n]:x}"
        + (", bootable" if n == 1 else "") + "\n"
        for n, (st, sz) in enumerate(zip(starts, sizes, strict=True), 1))
    r = subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
                       input=table, capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
                       check=False)
    if r.returncode != 0:
        raise LayoutError(f"{path}: sfdisk failed: {r.stderr.strip()}")
    fat = [] if part_mib[0] < 64 else ["-F", "16" if part_mib[0] < 256 else "32"]
    _run(["mkfs.vfat", *fat, "-n", LABELS[1], "--offset", str(starts[0] // SECTOR), str(path),
          str(sizes[0] // 1024)], f"{path} p1")
    for n in (2, 3, 4):
        cmd = ["mkfs.ext4", "-q", "-F", "-L", LABELS[n], "-E", f"offset={starts[n - 1]}"]
        if n == 2 and root_tree is not None:
            cmd += ["-d", str(root_tree)]
        _run([*cmd, str(path), f"{sizes[n - 1] // 1024}k"], f"{path} p{n}")
    return read_partitions(path)


def have_tools(*names: str) -> list[str]:
    """The command-line tools among names that are missing."""
    return [n for n in names if shutil.which(n) is None]


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    """A loop device over a sparse backing file of `size` bytes (a stand-in card for tests
    and benchmarks); detached on exit."""
    with open(backing, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60, check=False)
