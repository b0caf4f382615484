"""Run commands inside an image's root tree: the kernel file systems mounted for the duration,
always unmounted again (also on errors), with the build host's DNS during the build."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

# (source, target inside the root, type, options): mounted in this order, unmounted reversed
KERNEL_MOUNTS = [
    ("proc", "proc", "proc", "nosuid,nodev,noexec"),
    ("sysfs", "sys", "sysfs", "ro,nosuid,nodev,noexec"),
    ("/dev", "dev", None, "bind"),
    ("devpts", "dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666,newinstance"),
    ("tmpfs", "dev/shm", "tmpfs", "mode=1777,nosuid,nodev"),
    ("tmpfs", "run", "tmpfs", "mode=755,nosuid,nodev"),
]


class ChrootError(RuntimeError):
    """A command in the root tree failed; the message names it and quotes its output."""


def _mount(src: str, target: Path, fstype: str | None, opts: str) -> None:
    cmd = ["mount"] + (["-t", fstype] if fstype else []) + ["-o", opts, src, str(target)]
    if fstype is None:
        cmd = ["mount", "--bind", src, str(target)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise ChrootError(f"mount {src} on {target} failed: {r.stderr.strip()}")
    # never let a mount made inside the root propagate back to the host (a shared /dev would
    # get the build's devpts and shm on top of its own)
    subprocess.run(["mount", "--make-private", str(target)], capture_output=True, timeout=60,
                   check=False)


def _umount(target: Path) -> None:
    for attempt in range(10):
        r = subprocess.run(["umount", str(target)], capture_output=True, timeout=60,
                           check=False)
        if r.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))
    subprocess.run(["umount", "--lazy", str(target)], capture_output=True, timeout=60,
                   check=False)


@contextlib.contextmanager
def mounted(root: Path, binds: dict[str, Path] | None = None) -> Iterator[Path]:
    """proc, sys, dev, dev/pts, dev/shm and run mounted in root, plus binds {path in root:
    host folder}; the host's resolv.conf in place of the image's for the duration."""
    done: list[Path] = []
    resolv = root / "etc" / "resolv.conf"
    saved = root / "etc" / ".resolv.conf.image"
    had_resolv = resolv.is_symlink() or resolv.exists()
    if had_resolv:
        os.replace(resolv, saved)
    shutil.copy("/etc/resolv.conf", resolv)
    try:
        for src, rel, fstype, opts in KERNEL_MOUNTS:
            target = root / rel
            target.mkdir(parents=True, exist_ok=True)
            _mount(src, target, fstype, opts)
            done.append(target)
        for rel, host in (binds or {}).items():
            target = root / rel.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            host.mkdir(parents=True, exist_ok=True)
            _mount(str(host), target, None, "bind")
            done.append(target)
        yield root
    finally:
        for target in reversed(done):
            _umount(target)
        resolv.unlink(missing_ok=True)
        if saved.exists() or saved.is_symlink():
            os.replace(saved, resolv)


def run(root: Path, *cmd: str, env: dict[str, str] | None = None, timeout: float = 1800,
        check: bool = True, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run cmd in the root tree (chroot), with a clean environment plus env."""
    full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
                **(env or {})}
    r = subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True,
                       env=full_env, timeout=timeout, check=False)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n")
    if check and r.returncode != 0:
        raise ChrootError(f"in {root}: {' '.join(cmd)} exited {r.returncode}: "
                          f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r
