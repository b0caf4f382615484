"""Write the box image to cards or image files (`echoel flash`): bmaptool copy, read-back
verification against the bmap's sha256 ranges, refusals, several targets in parallel.

Order per target: refusals (checked for every target before anything is written) -> the image
checked once against its bmap -> bmaptool copy (sparse; it verifies while writing) -> caches
dropped, the written ranges read back and hashed -> provisioning (its own identity) if asked.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from echoel.provisioning import image_layout
from echoel.provisioning.pki import FleetPki
from echoel.provisioning.provision import (
    BoxSettings,
    ProvisionError,
    check_settings,
    provision_target,
)

BLKFLSBUF = 0x1261
CHUNK = 4 * 1024 * 1024
COPY_TIMEOUT_S = 3600.0
SYSTEM_MOUNTS = ("/", "/boot", "/boot/firmware", "/boot/efi", "/usr", "/var", "/home")
_WROTE_RE = re.compile(r"wrote (\d+) blocks out of (\d+)")


class FlashError(RuntimeError):
    """A flash that cannot be done or went wrong; the message names target, value, rule."""


# ---------------------------------------------------------------------------- the bmap
@dataclass(frozen=True)
class Bmap:
    """A block map: image size, block size and the mapped ranges with their sha256."""

    path: Path
    image_size: int
    block_size: int
    ranges: tuple[tuple[int, int, str], ...]  # (first block, last block, sha256 hex)

    @property
    def mapped_bytes(self) -> int:
        """Bytes the ranges cover (what bmaptool writes)."""
        return sum((b - a + 1) * self.block_size for a, b, _ in self.ranges)

    def byte_ranges(self) -> Iterator[tuple[int, int, str]]:
        """(offset, length, sha256) per range, clipped to the image size."""
        for a, b, digest in self.ranges:
            start = a * self.block_size
            yield start, min((b + 1) * self.block_size, self.image_size) - start, digest


def find_bmap(image: str | Path) -> Path:
    """IMAGE.bmap beside the image (for X.img.zst also X.img.bmap)."""
    image = Path(image)
    candidates = [image.with_name(image.name + ".bmap")]
    for suffix in (".zst", ".xz", ".gz", ".bz2"):
        if image.name.endswith(suffix):
            candidates.append(image.with_name(image.name[: -len(suffix)] + ".bmap"))
    candidates.append(image.with_suffix(".bmap"))
    for c in candidates:
        if c.exists():
            return c
    raise FlashError(f"image {image}: no block map beside it (looked for "
                     f"{', '.join(str(c.name) for c in candidates)}); make one with "
                     f"`bmaptool create -o {candidates[0].name} IMAGE.img`")


def read_bmap(path: str | Path) -> Bmap:
    """Parse a bmap 2.x file; its own checksum is checked (a damaged bmap is refused)."""
    path = Path(path)
    try:
        text = path.read_bytes()
        root = ET.fromstring(text)
    except (OSError, ET.ParseError) as exc:
        raise FlashError(f"block map {path}: cannot read it: {exc}") from None
    version = root.get("version", "")
    if root.tag != "bmap" or not version.startswith("2."):
        raise FlashError(f"block map {path}: version {version!r}; allowed: 2.x with sha256 "
                         "(bmaptool 3.x)")
    ctype = (root.findtext("ChecksumType") or "").strip()
    if ctype != "sha256":
        raise FlashError(f"block map {path}: checksum type {ctype!r}; allowed: sha256")
    own = (root.findtext("BmapFileChecksum") or "").strip()
    zeroed = text.replace(own.encode(), b"0" * len(own), 1)
    if not own or hashlib.sha256(zeroed).hexdigest() != own:
        raise FlashError(f"block map {path}: its own checksum does not match: the bmap file "
                         "is damaged or was edited; make it again with `bmaptool create`")
    ranges = []
    for r in root.iter("Range"):
        first, _, last = (r.text or "").strip().partition("-")
        ranges.append((int(first), int(last or first), r.get("chksum", "")))
    return Bmap(path, int((root.findtext("ImageSize") or "0").strip()),
                int((root.findtext("BlockSize") or "4096").strip()), tuple(ranges))


@contextlib.contextmanager
def _image_stream(image: Path) -> Iterator[IO[bytes]]:
    """The image's bytes from the start: the file, or zstd -dc of a .zst."""
    if image.name.endswith(".zst"):
        proc = subprocess.Popen(["zstd", "-dcq", str(image)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            yield proc.stdout
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    else:
        with open(image, "rb") as f:
            yield f


def _hash_ranges(f: IO[bytes], bmap: Bmap, seekable: bool, what: str,
                 progress: Callable[[float], None] | None = None) -> None:
    """Hash each mapped range read from f; FlashError at the first mismatch."""
    pos = 0
    done, total = 0, max(1, bmap.mapped_bytes)
    for i, (start, length, digest) in enumerate(bmap.byte_ranges()):
        if seekable:
            f.seek(start)
        else:
            while pos < start:  # a stream: skip forward by reading
                skipped = len(f.read(min(CHUNK, start - pos)))
                if not skipped:
                    raise FlashError(f"{what}: ends at byte {pos}, before range {i}; the "
                                     f"bmap says the image is {bmap.image_size} bytes")
                pos += skipped
        h = hashlib.sha256()
        left = length
        while left:
            buf = f.read(min(CHUNK, left))
            if not buf:
                raise FlashError(f"{what}: ends inside range {i} (byte {start + length - left})"
                                 f"; the bmap says the image is {bmap.image_size} bytes")
            h.update(buf)
            left -= len(buf)
        pos = start + length
        if h.hexdigest() != digest:
            first, last, _ = bmap.ranges[i]
            raise FlashError(f"{what}: checksum mismatch in blocks {first}-{last} (bytes "
                             f"{start}-{start + length - 1}): sha256 {h.hexdigest()[:16]}..., "
                             f"the bmap says {digest[:16]}...")
        done += length
        if progress:
            progress(done / total)


def check_image(image: str | Path, bmap: Bmap) -> None:
    """Refuse a corrupt image: every mapped range must match the bmap's sha256."""
    image = Path(image)
    if not image.exists():
        raise FlashError(f"image {image}: no such file")
    with _image_stream(image) as f:
        _hash_ranges(f, bmap, not image.name.endswith(".zst"),
                     f"corrupt image {image.name}")


def _drop_cache(fd: int, block: bool) -> None:
    os.fsync(fd)
    if block:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def verify_target(target: str | Path, bmap: Bmap,
                  progress: Callable[[float], None] | None = None) -> None:
    """Read back the written ranges after dropping the page cache; FlashError on a mismatch."""
    target = Path(target)
    block = image_layout.is_block_device(target)
    fd = os.open(target, os.O_RDONLY)
    try:
        _drop_cache(fd, block)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            _hash_ranges(f, bmap, True, f"read-back of {target}", progress)  # type: ignore[arg-type]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A card (block device) or an image file to write."""

    path: Path
    block: bool
    size: int
    serial: str

    @property
    def label(self) -> str:
        """How the target is named in tables."""
        return str(self.path)


def _sysfs_name(dev: Path) -> str | None:
    """The /sys/class/block name of a block device node."""
    rdev = os.stat(dev).st_rdev
    p = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    return p.resolve().name if p.exists() else None


def device_serial(dev: Path) -> str:
    """A block device's serial (sysfs or udev), else its path."""
    name = _sysfs_name(dev)
    if name:
        for f in (f"/sys/block/{name}/device/serial", f"/sys/block/{name}/serial"):
            with contextlib.suppress(OSError):
                s = Path(f).read_text().strip()
                if s:
                    return s
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["udevadm", "info", "--query=property", f"--name={dev}"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        for k in ("ID_SERIAL_SHORT", "ID_SERIAL"):
            if props.get(k):
                return props[k]
    return str(dev)


def inspect_target(path: str | Path) -> Target:
    """What a target is: block device (size, serial) or image file (serial = its path)."""
    p = Path(path)
    if image_layout.is_block_device(p):
        return Target(p, True, image_layout.target_size(p), device_serial(p))
    if p.exists() and not p.is_file():
        raise FlashError(f"target {p}: neither a block device nor a regular file")
    if str(p.absolute()).startswith("/dev/"):
        raise FlashError(f"target {p}: no such block device (is the card in the reader? "
                         "`lsblk` lists the disks); a file is never created under /dev")
    if not p.parent.is_dir():
        raise FlashError(f"target {p}: folder {p.parent} does not exist")
    return Target(p.resolve(), False, image_layout.target_size(p), str(p.resolve()))


def _mountinfo() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            out.append((a[2], a[4].replace("\\040", " "), b[1] if len(b) > 1 else ""))
    return out


def _dev_of(name: str) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/sys/class/block/{name}/dev").read_text().strip()
    return ""


def _disk_of(name: str) -> str:
    """The whole disk a block device belongs to (a partition's parent; itself otherwise)."""
    p = Path(f"/sys/class/block/{name}")
    if (p / "partition").exists():
        return p.resolve().parent.name
    return name


def _loops_over(path: Path) -> list[str]:
    """Loop devices whose backing file is path (an image file or a device node)."""
    out = []
    real = str(path.resolve())
    for lo in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            back = (lo / "loop" / "backing_file").read_text().strip()
            if back.removesuffix(" (deleted)") in (real, str(path)):
                out.append(lo.name)
    return out


def _users(t: Target) -> set[str]:
    """Block devices (names) that sit on the target: partitions, holders, loops over it."""
    seen: set[str] = set()
    todo: list[str] = []
    if t.block:
        name = _sysfs_name(t.path)
        if name:
            todo.append(name)
    todo += _loops_over(t.path)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        base = Path(f"/sys/class/block/{name}")
        todo += [p.parent.name for p in base.glob(f"{name}*/partition")]
        todo += [h.name for h in (base / "holders").glob("*")]
        todo += _loops_over(Path("/dev") / name)
    return seen


def system_disks() -> set[str]:
    """Disks holding the running system (/, /boot, /usr...), by sysfs name."""
    out: set[str] = set()
    by_dev = {_dev_of(p.name): p.name for p in Path("/sys/class/block").glob("*")}
    for devno, point, _ in _mountinfo():
        if point in SYSTEM_MOUNTS and devno in by_dev:
            name = by_dev[devno]
            out.add(_disk_of(name))
            for s in Path(f"/sys/class/block/{name}/slaves").glob("*"):
                out.add(_disk_of(s.name))  # device mapper / md: the disks underneath
    return out


def refusal(t: Target, image_size: int) -> str | None:
    """Why a target must not be written (None: it may be)."""
    if t.block:
        name = _sysfs_name(t.path) or t.path.name
        if Path(f"/sys/class/block/{name}/partition").exists():
            return (f"{t.path} is a partition of {_disk_of(name)}; give the whole disk "
                    f"(/dev/{_disk_of(name)})")
        if name in system_disks():
            return f"{t.path} holds the running system (/, /boot or /usr); never flash it"
    users = _users(t)
    devnos = {_dev_of(u): u for u in users}
    for devno, point, _ in _mountinfo():
        if devno in devnos:
            return (f"{t.path} is mounted: /dev/{devnos[devno]} at {point}; unmount it "
                    f"first (umount {point})")
    with contextlib.suppress(OSError):
        swaps = Path("/proc/swaps").read_text().split("\n")[1:]
        for line in swaps:
            if line.split() and Path(line.split()[0]).name in users:
                return f"{t.path} is in use as swap ({line.split()[0]}); swapoff it first"
    if t.block and t.size < image_size:
        return (f"{t.path} is too small: {t.size} bytes ({t.size / 2**30:.2f} GiB), the image "
                f"needs {image_size} bytes ({image_size / 2**30:.2f} GiB)")
    if not t.block and t.path.is_symlink():
        return f"{t.path} is a symbolic link; give the file itself"
    return None


def _is_image(t: Target, image: Path, bmap_path: Path) -> str | None:
    """Refuse writing over the image or its bmap (directly or through a loop device)."""
    own = {image.resolve(), bmap_path.resolve()}
    if t.path.resolve() in own:
        return f"{t.path} is the image (or its bmap) itself"
    if t.block:
        name = _sysfs_name(t.path) or ""
        with contextlib.suppress(OSError):
            back = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            if Path(back).resolve() in own:
                return f"{t.path} is a loop device over the image {back}"
    return None


# ---------------------------------------------------------------------------- batch CSV
@dataclass(frozen=True)
class BatchRow:
    """One box of a batch manifest: which target or serial gets which identity."""

    line: int
    target: str
    serial: str
    device_id: str
    hostname: str = ""
    group: str = ""


def read_batch(path: str | Path) -> list[BatchRow]:
    """A batch CSV: header with device_id and target and/or serial (optional hostname,
    group). Every bad row is named by its line in one error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FlashError(f"batch {path}: cannot read it: {exc}") from None
    reader = csv.DictReader(line for line in text.splitlines(keepends=True))
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "device_id" not in cols or not ({"target", "serial"} & set(cols)):
        raise FlashError(f"batch {path}: line 1 must be a header with device_id and target "
                         f"and/or serial (optional hostname, group); got {cols}")
    rows: list[BatchRow] = []
    errors: list[str] = []
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    for raw in reader:
        n = reader.line_num
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()
             if isinstance(v, str | type(None))}
        if not any(r.values()) or next(iter(r.values()), "").startswith("#"):
            continue
        row = BatchRow(n, r.get("target", ""), r.get("serial", ""), r.get("device_id", ""),
                       r.get("hostname", ""), r.get("group", ""))
        if None in raw:
            errors.append(f"line {n}: more fields than the header has")
            continue
        if not row.target and not row.serial:
            errors.append(f"line {n}: neither target nor serial given")
            continue
        try:
            check_settings(BoxSettings(row.device_id, "broker.invalid", hostname=row.hostname,
                                       group=row.group))
        except ProvisionError as exc:
            errors.append(f"line {n}: {exc}")
            continue
        if row.device_id in seen_ids:
            errors.append(f"line {n}: device id {row.device_id!r} already on line "
                          f"{seen_ids[row.device_id]}")
            continue
        key = row.target or row.serial
        if key in seen_keys:
            errors.append(f"line {n}: target/serial {key!r} already on line {seen_keys[key]}")
            continue
        seen_ids[row.device_id] = n
        seen_keys[key] = n
        rows.append(row)
    if errors:
        raise FlashError(f"batch {path}: " + "; ".join(errors))
    return rows


def match_batch(rows: list[BatchRow], t: Target) -> BatchRow | None:
    """The row for a target: by its path, or by its serial."""
    for r in rows:
        if r.target and Path(r.target).resolve() in (t.path, t.path.resolve()):
            return r
    for r in rows:
        if r.serial and r.serial == t.serial:
            return r
    return None


# ---------------------------------------------------------------------------- progress
class Progress:
    """One line per target: a bar when the terminal is a tty, milestones otherwise."""

    def __init__(self, labels: list[str], stream: IO[str] | None = None,
                 quiet: bool = False) -> None:
        self.labels = labels
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.state = [("waiting", 0.0)] * len(labels)
        self.lock = threading.Lock()
        self.drawn = False
        self.last_draw = 0.0
        self.last_said: dict[int, tuple[str, int]] = {}
        self.width = max((len(s) for s in labels), default=10)

    def update(self, i: int, stage: str, frac: float = 0.0) -> None:
        """Target i is at stage, frac of it done."""
        with self.lock:
            self.state[i] = (stage, frac)
            if self.quiet:
                return
            if self.tty:
                now = time.monotonic()
                if now - self.last_draw > 0.1 or frac >= 1.0 or frac == 0.0:
                    self._draw()
                    self.last_draw = now
            else:
                step = int(frac * 4)
                if self.last_said.get(i) != (stage, step):
                    self.last_said[i] = (stage, step)
                    self.stream.write(f"{self.labels[i]}: {stage} {frac * 100:3.0f}%\n")
                    self.stream.flush()

    def _draw(self) -> None:
        out = []
        if self.drawn:
            out.append(f"\x1b[{len(self.labels)}F")
        for label, (stage, frac) in zip(self.labels, self.state, strict=True):
            bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
            out.append(f"{label:<{self.width}} [{bar}] {frac * 100:3.0f}% {stage:<24}\x1b[K\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self.drawn = True


# ---------------------------------------------------------------------------- flashing
@dataclass
class FlashResult:
    """What happened to one target."""

    target: str
    serial: str
    device_id: str = ""
    copied: bool = False
    verified: bool = False
    provisioned: bool = False
    seconds: float = 0.0
    copy_s: float = 0.0
    verify_s: float = 0.0
    error: str = ""
    cert_serial: str = ""

    @property
    def ok(self) -> bool:
        """Copied and verified (and provisioned when asked) without error."""
        return self.copied and self.verified and not self.error


def bmap_copy(image: Path, bmap: Bmap, target: Path,
              progress: Callable[[float], None] | None = None) -> None:
    """bmaptool copy (it verifies the sha256 ranges while writing); progress 0..1."""
    cmd = ["bmaptool", "--debug", "copy", "--bmap", str(bmap.path), str(image), str(target)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
    except FileNotFoundError:
        raise FlashError("bmaptool is not installed (apt-get install bmap-tools)") from None
    tail: list[str] = []
    timer = threading.Timer(COPY_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = _WROTE_RE.search(line)
            if m and progress:
                progress(int(m.group(1)) / max(1, int(m.group(2))))
            elif "debug:" not in line:
                tail = [*tail[-5:], line.strip()]
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        errs = [t for t in tail if "ERROR" in t or "error" in t] or tail
        raise FlashError(f"bmaptool copy to {target} failed (exit {rc}): "
                         + " | ".join(errs[-3:]))


@dataclass(frozen=True)
class Job:
    """One target to flash, with the identity it gets (settings None: not provisioned)."""

    target: Target
    settings: BoxSettings | None = None


def plan(image: str | Path, targets: list[str | Path], bmap_path: str | Path | None = None,
         batch: list[BatchRow] | None = None, base: BoxSettings | None = None,
         ) -> tuple[Bmap, list[Job]]:
    """Check everything before anything is written: the bmap, every target (refusals), the
    batch identities. FlashError lists every problem found."""
    image = Path(image)
    if not image.exists():
        raise FlashError(f"image {image}: no such file")
    bmap = read_bmap(bmap_path or find_bmap(image))
    if not targets:
        raise FlashError("no target given: name one or more cards (/dev/sdX) or image files")
    problems: list[str] = []
    jobs: list[Job] = []
    seen: set[Path] = set()
    for raw in targets:
        try:
            t = inspect_target(raw)
        except FlashError as exc:
            problems.append(str(exc))
            continue
        if t.path in seen:
            problems.append(f"target {t.path} given twice")
            continue
        seen.add(t.path)
        why = refusal(t, bmap.image_size) or _is_image(t, image, bmap.path)
        if why:
            problems.append(f"refused: {why}")
            continue
        settings = None
        if base is not None:
            row = match_batch(batch or [], t)
            if row is None and batch is not None:
                problems.append(f"target {t.path} (serial {t.serial}): no row in the batch "
                                "manifest; add one with its target or serial and device_id")
                continue
            if row is None:
                problems.append(f"target {t.path}: no device id for it; flash with --batch "
                                "(target or serial -> device_id)")
                continue
            settings = replace(base, device_id=row.device_id, hostname=row.hostname,
                               group=row.group or base.group)
            try:
                check_settings(settings)
            except ProvisionError as exc:
                problems.append(f"target {t.path}: {exc}")
                continue
        jobs.append(Job(t, settings))
    if problems:
        raise FlashError("; ".join(problems))
    return bmap, jobs


def flash_one(image: Path, bmap: Bmap, job: Job, pki: FleetPki | None,
              progress: Callable[[str, float], None], keep_dir: str | Path | None = None,
              days: int = 825) -> FlashResult:
    """Copy, read back, provision one target; errors land in the result, not raised."""
    t = job.target
    res = FlashResult(str(t.path), t.serial,
                      job.settings.device_id if job.settings else "")
    t0 = time.monotonic()
    try:
        progress("copy", 0.0)
        bmap_copy(image, bmap, t.path, lambda f: progress("copy", f))
        res.copied = True
        res.copy_s = time.monotonic() - t0
        t1 = time.monotonic()
        progress("verify", 0.0)
        verify_target(t.path, bmap, lambda f: progress("verify", f))
        res.verified = True
        res.verify_s = time.monotonic() - t1
        if job.settings is not None and pki is not None:
            progress("provision", 0.5)
            got = provision_target(t.path, job.settings, pki, keep_dir, days)
            res.provisioned = True
            res.cert_serial = str(got.serial)
        progress("done", 1.0)
    except (FlashError, ProvisionError, image_layout.LayoutError, OSError) as exc:
        res.error = str(exc)
        progress("FAILED", 1.0)
    res.seconds = time.monotonic() - t0
    return res


@dataclass
class FlashRun:
    """The whole run: per-target results and timings."""

    image: str
    results: list[FlashResult] = field(default_factory=list)
    check_s: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every target done without error."""
        return bool(self.results) and all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """The summary for scripts."""
        return {"image": self.image, "ok": self.ok, "seconds": round(self.seconds, 3),
                "image_check_s": round(self.check_s, 3),
                "targets": [asdict(r) | {"ok": r.ok} for r in self.results]}


def flash(image: str | Path, jobs: list[Job], bmap: Bmap, pki: FleetPki | None = None,
          parallel: int = 4, stream: IO[str] | None = None, quiet: bool = False,
          check: bool = True, keep_dir: str | Path | None = None,
          days: int = 825) -> FlashRun:
    """Flash every job, `parallel` at a time, with a progress line per target. The image is
    checked against its bmap once first (check=False skips it: bmaptool still verifies)."""
    image = Path(image)
    run = FlashRun(str(image))
    t0 = time.monotonic()
    if check:
        check_image(image, bmap)
    run.check_s = time.monotonic() - t0
    board = Progress([j.target.label for j in jobs], stream, quiet)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(flash_one, image, bmap, job, pki,
                               lambda s, f, i=i: board.update(i, s, f), keep_dir, days)
                   for i, job in enumerate(jobs)]
        run.results = [f.result() for f in futures]
    run.seconds = time.monotonic() - t0
    return run


def summary_table(run: FlashRun) -> str:
    """The end-of-run table: device, serial, id, verified, provisioned, time, error."""
    head = ("device", "serial", "id", "verified", "provisioned", "time s", "error")
    rows = [(r.target, r.serial, r.device_id or "-", "yes" if r.verified else "NO",
             "yes" if r.provisioned else ("-" if not r.device_id else "NO"),
             f"{r.seconds:.1f}", r.error[:60]) for r in run.results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ok = sum(r.ok for r in run.results)
    lines.append(f"{ok}/{len(run.results)} targets written and verified in "
                 f"{run.seconds:.1f} s (image check {run.check_s:.1f} s)")
    return "\n".join(lines)


def write_summary_json(path: str | Path, run: FlashRun) -> None:
    """The JSON summary, written atomically ('-': stdout)."""
    text = json.dumps(run.to_json(), indent=1) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        image_layout.write_atomic(Path(path), text.encode(), 0o644)
