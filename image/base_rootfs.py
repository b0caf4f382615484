"""The Debian base of an image: one mmdebstrap tarball per board inputs, cached.

The tarball depends only on the architecture, suite, variant, components, package list and
mirror (a snapshot.debian.org timestamp, or the live mirror): the cache key is a hash of those,
so a rebuild with unchanged inputs skips mmdebstrap (which dominates the build time).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from image.recipe import Board

LIVE_MIRRORS = ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")
SNAPSHOT = "http://snapshot.debian.org/archive/{archive}/{stamp}"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class BaseError(RuntimeError):
    """The base rootfs cannot be built; the message says what is missing or what failed."""


def sources(board: Board, snapshot: str = "") -> list[str]:
    """The apt source lines mmdebstrap uses: the live mirror, or a snapshot.debian.org
    timestamp (e.g. 20250520T000000Z) for a reproducible package set."""
    comps = " ".join(board.components)
    s = board.suite
    if snapshot:
        opt = "[check-valid-until=no] "
        deb = SNAPSHOT.format(archive="debian", stamp=snapshot)
        sec = SNAPSHOT.format(archive="debian-security", stamp=snapshot)
    else:
        opt, (deb, sec) = "", LIVE_MIRRORS
    return [f"deb {opt}{deb} {s} {comps}", f"deb {opt}{deb} {s}-updates {comps}",
            f"deb {opt}{sec} {s}-security {comps}"]


def cache_key(board: Board, snapshot: str = "") -> str:
    """The tarball's cache key: the board's package inputs and the mirror."""
    import hashlib

    h = hashlib.sha256((board.base_key() + "|" + "|".join(sources(board, snapshot))).encode())
    return h.hexdigest()[:16]


def ensure_binfmt(arch: str) -> None:
    """Foreign-architecture builds need qemu-user through binfmt_misc; set it up or say how."""
    if arch == HOST_ARCH:
        return
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)],
                       capture_output=True, check=False, timeout=30)
    qemu = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}[arch]
    if not (misc / qemu).exists():
        subprocess.run(["update-binfmts", "--enable", qemu], capture_output=True, check=False,
                       timeout=30)
    if not (misc / qemu).exists():
        raise BaseError(f"an {arch} rootfs on this {HOST_ARCH} machine needs {qemu} in "
                        f"binfmt_misc: apt-get install qemu-user-static binfmt-support "
                        f"arch-test, then `update-binfmts --enable {qemu}`")


def base_tarball(board: Board, cache_dir: Path, snapshot: str = "", log: Path | None = None,
                 epoch: int | None = None) -> tuple[Path, bool, float]:
    """The cached mmdebstrap tarball for the board: (path, built now, seconds spent)."""
    if shutil.which("mmdebstrap") is None:
        raise BaseError("mmdebstrap is not installed: apt-get install mmdebstrap")
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"base-{board.arch}-{cache_key(board, snapshot)}.tar"
    if out.is_file():
        return out, False, 0.0
    ensure_binfmt(board.arch)
    t0 = time.monotonic()
    tmp = out.with_suffix(".tar.part")
    pkgs = sorted({*board.packages, *board.build_packages})
    cmd = ["mmdebstrap", f"--architectures={board.arch}", f"--variant={board.variant}",
           f"--components={','.join(board.components)}", f"--include={','.join(pkgs)}",
           "--format=tar", board.suite, str(tmp), *sources(board, snapshot)]
    env = dict(os.environ)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    with open(log or os.devnull, "a") as lf:
        lf.write(f"$ {' '.join(cmd)}\n")
        lf.flush()
        r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=3600,
                           check=False)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BaseError(f"mmdebstrap for {board.name} ({board.arch}) exited {r.returncode}; "
                        f"see {log}")
    os.replace(tmp, out)
    return out, True, time.monotonic() - t0
