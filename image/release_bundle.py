"""Make a release from a built image: its rootfs with /etc/echoel/release (and optionally
box.toml) set, shrunk, and a signed RAUC bundle of it (what the end-to-end update test ships).

    python image/release_bundle.py --board qemu-amd64 --release 2026.11.2 \
        --update-ca build/image/dev-update-ca [--box-toml FILE]       (what `make bundle` runs)
    python image/release_bundle.py --image IMG --release R --cert SIGNING.crt --key SIGNING.key \
        --keyring update-ca.crt --out OUT.raucb --compatible echoel-box-qemu-amd64

Nothing is mounted: the rootfs partition (p2) is copied out sparsely, edited with debugfs and
shrunk with resize2fs -M (a slot's file system may be smaller than its partition; RAUC then
writes fewer bytes). Needs e2fsprogs, rauc and squashfs-tools; no root.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echoel.provisioning.image_layout import ext4_read_text, read_partitions
from echoel.provisioning.pki import PkiError
from echoel.provisioning.update_signing import UpdateCa

from image.bundle import BundleError, BundleInfo, build_bundle
from image.recipe import RecipeError, board

REPO = Path(__file__).resolve().parents[1]

ROOTFS_PART = 2
RELEASE_FILE = "/etc/echoel/release"
BOX_TOML = "/etc/echoel/box.toml"
CHUNK = 4 << 20
TIMEOUT_S = 900


class ReleaseError(RuntimeError):
    """A release that cannot be made; the message names the input and the tool."""


def _run(cmd: list[str], what: str, ok: tuple[int, ...] = (0,)) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ReleaseError(f"{what}: {cmd[0]} is not installed (apt-get install e2fsprogs)") \
            from None
    if r.returncode not in ok:
        raise ReleaseError(f"{what}: {' '.join(cmd)} exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-600:]}")
    return r.stdout


def partition_offset(image: Path, number: int) -> tuple[int, int]:
    """(start, size) in bytes of partition `number` of a disk image."""
    part = next((p for p in read_partitions(image) if p.number == number), None)
    if part is None:
        raise ReleaseError(f"{image}: no partition {number}")
    return part.start, part.size


def extract_partition(image: Path, number: int, out: Path) -> Path:
    """Copy partition `number` of `image` to the file `out`, leaving zero blocks as holes."""
    start, size = partition_offset(image, number)
    zero = bytes(CHUNK)
    with open(image, "rb") as src, open(out, "wb") as dst:
        src.seek(start)
        left = size
        while left > 0:
            block = src.read(min(CHUNK, left))
            if not block:
                raise ReleaseError(f"{image}: partition {number} runs past the end of the file")
            if block == zero[:len(block)]:
                dst.seek(len(block), 1)
            else:
                dst.write(block)
            left -= len(block)
        dst.truncate(size)
    return out


def _fs(ext4: Path, offset: int = 0) -> str:
    return f"{ext4}?offset={offset}" if offset else str(ext4)


def write_text(ext4: Path, path: str, text: str, offset: int = 0) -> None:
    """Replace (or create) the file `path` (mode 0644, root) in an ext4 image with `text`."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
        local = Path(f.name)
    try:
        local.chmod(0o644)
        script = (f"rm {path}\nwrite {local} {path}\nsif {path} uid 0\nsif {path} gid 0\n"
                  f"sif {path} mode 0100644\n")
        r = subprocess.run(["debugfs", "-w", "-f", "-", _fs(ext4, offset)], input=script,
                           capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        if r.returncode != 0:
            raise ReleaseError(f"debugfs could not write {path} into {ext4}: {r.stderr[-400:]}")
    finally:
        local.unlink(missing_ok=True)
    got = ext4_read_text(ext4, path, offset)
    if got != text:
        raise ReleaseError(f"{ext4}: {path} reads back {got!r} after writing {text!r}")


def shrink(ext4: Path) -> int:
    """e2fsck -f and resize2fs -M: the file system at its minimum size; its new byte size."""
    _run(["e2fsck", "-f", "-y", str(ext4)], f"e2fsck {ext4}", ok=(0, 1))
    _run(["resize2fs", "-M", str(ext4)], f"resize2fs -M {ext4}")
    out = _run(["dumpe2fs", "-h", str(ext4)], f"dumpe2fs {ext4}")
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    size = int(fields["Block count"]) * int(fields["Block size"])
    with open(ext4, "r+b") as f:
        f.truncate(size)
    return size


@dataclass(frozen=True)
class Release:
    """A built release: its bundle and what making it took."""

    release: str
    bundle: BundleInfo
    rootfs_bytes: int
    rootfs_s: float
    bundle_s: float


def release_rootfs(image: Path, out: Path, release: str, box_toml: str | None = None,
                   files: dict[str, str] | None = None) -> int:
    """The image's rootfs (p2) as `out`, with `release` in /etc/echoel/release and, when given,
    `box_toml` as /etc/echoel/box.toml and `files` (absolute path -> text); shrunk. Its size
    in bytes."""
    extract_partition(image, ROOTFS_PART, out)
    write_text(out, RELEASE_FILE, release + "\n")
    if box_toml is not None:
        write_text(out, BOX_TOML, box_toml)
    for path, text in (files or {}).items():
        write_text(out, path, text)
    return shrink(out)


def make_release(image: Path, release: str, cert: Path, key: Path, out: Path,
                 keyring: Path | None = None, box_toml: str | None = None,
                 compatible: str = "echoel-box-qemu-amd64", fmt: str = "verity",
                 files: dict[str, str] | None = None) -> Release:
    """Build release `release` from `image`: rootfs then a signed bundle at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".release-") as td:
        rootfs = Path(td) / "rootfs.ext4"
        t0 = time.monotonic()
        size = release_rootfs(image, rootfs, release, box_toml, files)
        t1 = time.monotonic()
        info = build_bundle(rootfs, release, compatible, cert, key, out, fmt, keyring)
        t2 = time.monotonic()
    return Release(release, info, size, round(t1 - t0, 1), round(t2 - t1, 1))


def _signing(ca_dir: Path) -> tuple[Path, Path, Path]:
    """(cert, key, keyring) of the update CA folder's `release` signing identity (issued
    once, then reused)."""
    ca = UpdateCa(ca_dir)
    if not ca.exists():
        raise ReleaseError(f"--update-ca {ca_dir}: no update CA there (update-ca.crt and "
                           "update-ca.key); `make image` makes a development one in "
                           "build/image/dev-update-ca, or give the fleet's")
    ident = ca.paths("release")
    if not (ident.cert.exists() and ident.key.exists()):
        ident = ca.issue_signing("release")
    return ident.cert, ident.key, ca.ca_cert_path


def main(argv: list[str] | None = None) -> int:
    """Command line: make one release bundle and print its figures as JSON."""
    ap = argparse.ArgumentParser(prog="python image/release_bundle.py",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--board", help="a board of image/boards.toml: its built image, its "
                    "compatible string and build/bundles/echoel-BOARD-RELEASE.raucb")
    ap.add_argument("--image", help="a built disk image (echoel-BOARD.img)")
    ap.add_argument("--release", required=True, help="release name, e.g. 2026.11.2")
    ap.add_argument("--update-ca", help="an update CA folder: sign with its `release` "
                    "certificate (issued on first use)")
    ap.add_argument("--cert", help="update signing certificate (PEM)")
    ap.add_argument("--key", help="its private key (PEM)")
    ap.add_argument("--keyring", help="update CA certificate: check the signature at once")
    ap.add_argument("--out", help="the bundle file to write (.raucb)")
    ap.add_argument("--box-toml", help="a file to install as /etc/echoel/box.toml")
    ap.add_argument("--compatible", help="RAUC compatible string (default: the board's)")
    a = ap.parse_args(argv)
    try:
        compatible, image, out = a.compatible, a.image, a.out
        if a.board:
            b = board(a.board)
            compatible = compatible or b.rauc_compatible
            image = image or str(REPO / "build" / "image" / b.name / f"echoel-{b.name}.img")
            out = out or str(REPO / "build" / "bundles" / f"echoel-{b.name}-{a.release}.raucb")
        missing = [n for n, v in (("--image or --board", image), ("--out or --board", out),
                                  ("--compatible or --board", compatible)) if not v]
        if missing:
            ap.error(f"missing {', '.join(missing)}")
        if not Path(image).exists():
            raise ReleaseError(f"{image}: no such image; build it first "
                               f"(make image BOARD={a.board or '...'})")
        if a.update_ca:
            cert, key, keyring = _signing(Path(a.update_ca))
        elif a.cert and a.key:
            cert, key = Path(a.cert), Path(a.key)
            keyring = Path(a.keyring) if a.keyring else None
        else:
            ap.error("give --update-ca DIR, or --cert and --key")
        rel = make_release(Path(image), a.release, cert, key, Path(out), keyring,
                           Path(a.box_toml).read_text() if a.box_toml else None, compatible)
    except (ReleaseError, BundleError, PkiError, RecipeError, OSError) as exc:
        print(f"release_bundle: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(rel), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
