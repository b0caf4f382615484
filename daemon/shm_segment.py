"""Named shared-memory segments under /dev/shm, created by the supervisor, mapped by others.

Plain files in /dev/shm plus mmap (not multiprocessing.shared_memory, whose resource tracker
unlinks segments when an attaching process exits).
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

SHM_DIR = Path(os.environ.get("ECHOEL_SHM_DIR", "/dev/shm"))
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def segment_path(instance: str, name: str) -> Path:
    """Where the segment `name` of `instance` lives."""
    full = f"echoel.{instance}.{name}"
    if not _NAME.match(full):
        raise ValueError(f"shared-memory name {full!r}: use letters, digits, '_', '.', '-' only")
    return SHM_DIR / full


def create(path: Path, size: int, init=None) -> mmap.mmap:
    """Create (or replace) a zero-filled segment of `size` bytes and map it.

    `init(mapping)` runs before the segment appears under its name, so nobody can attach
    to a half-written header.
    """
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o660)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    m.write(b"\0" * size)  # fault every page in now, not in the real-time loop
    m.seek(0)
    if init is not None:
        init(m)
    os.replace(tmp, path)
    return m


def attach(path: Path) -> mmap.mmap:
    """Map an existing segment read-write."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shared-memory segment {path} does not exist: is the engine's supervisor "
            f"(`echoel run`) running for this instance?") from None
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Unlink a segment; mappings stay valid until closed."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
