"""Build a signed RAUC bundle from a rootfs ext4 image (what `make bundle` runs).

    python image/bundle.py --rootfs build/image/BOARD/rootfs.ext4 --version 2026.11.2 \
        --compatible echoel-box-qemu-amd64 --cert signing/release.crt \
        --key signing/release.key --out build/bundles/echoel-2026.11.2.raucb [--format verity]

The bundle's manifest names the compatible string, the version (the release name) and the
image; `rauc bundle` adds the image's sha256 and size and signs the whole with the update
signing certificate (provisioning/update_signing.py). Format "plain" installs on any kernel;
"verity" needs device-mapper on the box (the images have it; this build host does not).
Importable by path (tests, the benchmark): build_bundle() does the work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from echoel.daemon.model_store import sha256_file

EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"
COMPATIBLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
FORMATS = ("plain", "verity")
IMAGE_NAME = "rootfs.ext4"
TIMEOUT_S = 1800.0


class BundleError(RuntimeError):
    """A bundle that cannot be built; the message names the input and what is allowed."""


@dataclass(frozen=True)
class BundleInfo:
    """What was built: the bundle and the figures an artifact listing needs."""

    path: str
    size: int
    sha256: str
    version: str
    compatible: str
    format: str
    image_sha256: str
    image_size: int
    seconds: float


def check_ext4(path: Path) -> None:
    """Raise BundleError unless `path` is an ext4 (ext2/3/4 superblock) image file."""
    if not path.is_file():
        raise BundleError(f"--rootfs {path}: no such file (the image engineer's rootfs ext4 "
                          "is under build/image/BOARD/)")
    with open(path, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        magic = f.read(2)
    if magic != EXT4_MAGIC:
        raise BundleError(f"--rootfs {path}: not an ext4 image (no ext superblock magic "
                          f"at byte {EXT4_MAGIC_OFFSET})")


def manifest_text(version: str, compatible: str, fmt: str, build: str) -> str:
    """The RAUC manifest (manifest.raucm) of a one-image rootfs bundle."""
    return (f"[update]\ncompatible={compatible}\nversion={version}\nbuild={build}\n"
            f"description=Echoel Box {version}\n\n[bundle]\nformat={fmt}\n\n"
            f"[image.rootfs]\nfilename={IMAGE_NAME}\n")


def check_signature(bundle: Path, compatible: str, keyring: Path, work: Path) -> None:
    """Raise BundleError unless `rauc info` accepts the bundle's signature against `keyring`
    with the box's rule (check-purpose=codesign: `rauc bundle --keyring` would check the
    S/MIME purpose instead and refuse a code-signing certificate)."""
    conf = work / "check.conf"
    conf.write_text(f"[system]\ncompatible={compatible}\nbootloader=noop\n\n"
                    f"[keyring]\npath={keyring}\ncheck-purpose=codesign\n")
    r = subprocess.run(["rauc", f"--conf={conf}", "info", "--output-format=json", str(bundle)],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    if r.returncode != 0:
        raise BundleError(f"the signed bundle does not verify against --keyring {keyring}: "
                          f"{(r.stderr or r.stdout).strip()[-600:]}")


def image_checksum(bundle: Path) -> tuple[str, int]:
    """sha256 and size of the rootfs image as the bundle's manifest records them (rauc
    computed them while bundling: the image is not read a second time)."""
    r = subprocess.run(["rauc", "info", "--no-verify", "--output-format=json", str(bundle)],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    if r.returncode != 0:
        raise BundleError(f"rauc info of the new bundle failed: {r.stderr.strip()[-400:]}")
    for entry in json.loads(r.stdout).get("images", []):
        img = entry.get("rootfs")
        if img:
            return str(img["checksum"]), int(img["size"])
    raise BundleError("the new bundle's manifest has no rootfs image")


def build_bundle(rootfs: str | Path, version: str, compatible: str, cert: str | Path,
                 key: str | Path, out: str | Path, fmt: str = "plain",
                 keyring: str | Path | None = None, build: str | None = None) -> BundleInfo:
    """Build and sign a RAUC bundle of `rootfs`; replaces `out` only when the build succeeds.

    With `keyring` (the update CA), rauc checks the new signature against it at once.
    """
    rootfs, out = Path(rootfs), Path(out)
    check_ext4(rootfs)
    if not VERSION_RE.match(version):
        raise BundleError(f"--version {version!r}: 1-64 characters 0-9 A-Z a-z . _ + - "
                          "(the release name, e.g. 2026.11.2)")
    if not COMPATIBLE_RE.match(compatible):
        raise BundleError(f"--compatible {compatible!r}: letters, digits, . _ - (the box's "
                          "[system] compatible in /etc/rauc/system.conf)")
    if fmt not in FORMATS:
        raise BundleError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    for what, p in (("--cert", Path(cert)), ("--key", Path(key))):
        if not p.is_file():
            raise BundleError(f"{what} {p}: no such file (the update signing certificate and "
                              "key: provisioning/update_signing.UpdateCa.issue_signing)")
    if shutil.which("rauc") is None or shutil.which("mksquashfs") is None:
        raise BundleError("rauc and mksquashfs are needed: apt-get install rauc squashfs-tools")
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".bundle-") as td:
        content = Path(td) / "content"
        content.mkdir()
        image = content / IMAGE_NAME
        try:
            os.link(rootfs, image)
        except OSError:
            shutil.copyfile(rootfs, image)
        (content / "manifest.raucm").write_text(
            manifest_text(version, compatible, fmt, build or time.strftime("%Y%m%d%H%M%S")))
        tmp_out = Path(td) / "bundle.raucb"
        cmd = ["rauc", "bundle", f"--cert={cert}", f"--key={key}", str(content), str(tmp_out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        if r.returncode != 0:
            raise BundleError(f"rauc bundle failed ({r.returncode}): "
                              f"{(r.stderr or r.stdout).strip()[-800:]}")
        if keyring:
            check_signature(tmp_out, compatible, Path(keyring).resolve(), Path(td))
        image_sha, image_size = image_checksum(tmp_out)
        os.replace(tmp_out, out)
    return BundleInfo(path=str(out), size=out.stat().st_size, sha256=sha256_file(out),
                      version=version, compatible=compatible, format=fmt,
                      image_sha256=image_sha, image_size=image_size,
                      seconds=round(time.monotonic() - t0, 3))


def main(argv: list[str] | None = None) -> int:
    """Command line: build one bundle and print its listing entry as JSON."""
    ap = argparse.ArgumentParser(prog="python image/bundle.py",
                                 description="build a signed RAUC bundle from a rootfs ext4")
    ap.add_argument("--rootfs", required=True, help="the rootfs ext4 image file")
    ap.add_argument("--version", required=True, help="release name, e.g. 2026.11.2")
    ap.add_argument("--compatible", required=True, help="the boxes' RAUC compatible string")
    ap.add_argument("--cert", required=True, help="update signing certificate (PEM)")
    ap.add_argument("--key", required=True, help="its private key (PEM)")
    ap.add_argument("--out", required=True, help="the bundle file to write (.raucb)")
    ap.add_argument("--format", default="plain", choices=FORMATS)
    ap.add_argument("--keyring", help="update CA certificate: check the signature at once")
    args = ap.parse_args(argv)
    try:
        info = build_bundle(args.rootfs, args.version, args.compatible, args.cert, args.key,
                            args.out, args.format, args.keyring)
    except (BundleError, subprocess.TimeoutExpired) as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(info), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
