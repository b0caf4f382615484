"""`make bundle` (image/release_bundle.py): a release made from a built disk image. Here the
image is a small one with the agreed layout (sfdisk + mke2fs -d); the bundle is signed by a
real update CA and its signature checked by RAUC; the release's rootfs is read back with
debugfs. The full-size path (a real image's rootfs into a booted qemu box) is the end-to-end
update test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from echoel.drivers.rauc_client import host_missing
from echoel.provisioning import image_layout
from echoel.provisioning.image_layout import ext4_read_text
from echoel.provisioning.update_signing import UpdateCa

from image import release_bundle
from image.bundle import BundleError, check_signature

COMPATIBLE = "echoel-box-test"
BOX_TOML = '[engine]\ndevice = "hw:Dummy"\n'

pytestmark = pytest.mark.skipif(host_missing() is not None,
                                reason=f"RAUC cannot run here: {host_missing()}")


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    """A 40 MiB image: rootfs A holds /etc/echoel/{release,box.toml} and 1 MiB of noise."""
    work = tmp_path_factory.mktemp("relbundle")
    tree = work / "tree"
    (tree / "etc" / "echoel").mkdir(parents=True)
    (tree / "etc" / "echoel" / "release").write_text("2026.11.1\n")
    (tree / "etc" / "echoel" / "box.toml").write_text(BOX_TOML)
    (tree / "noise.bin").write_bytes(os.urandom(1 << 20))
    img = work / "box.img"
    image_layout.build_image(img, (4, 12, 12, 8), tree)
    return img


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ca") / "update-ca"
    UpdateCa(root).init()
    return root


def test_release_rootfs_carries_the_release_and_is_shrunk(disk: Path, tmp_path: Path):
    out = tmp_path / "rootfs.ext4"
    box = BOX_TOML + "\n[update]\nhealth_deadline_s = 150.0\n"
    size = release_bundle.release_rootfs(disk, out, "2026.11.2", box,
                                         files={"/etc/echoel/extra": "x\n"})
    assert ext4_read_text(out, release_bundle.RELEASE_FILE) == "2026.11.2\n"
    assert ext4_read_text(out, release_bundle.BOX_TOML) == box
    assert ext4_read_text(out, "/etc/echoel/extra") == "x\n"
    _, part = release_bundle.partition_offset(disk, 2)
    assert size == out.stat().st_size and size < part  # resize2fs -M: smaller than the slot
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # the source image is untouched
    start, _ = release_bundle.partition_offset(disk, 2)
    assert ext4_read_text(disk, release_bundle.RELEASE_FILE, start) == "2026.11.1\n"


def test_cli_signs_with_the_update_ca_and_rauc_accepts_it(disk: Path, ca: Path, tmp_path: Path,
                                                          capsys):
    out = tmp_path / "echoel-2026.11.2.raucb"
    rc = release_bundle.main(["--image", str(disk), "--release", "2026.11.2", "--update-ca",
                              str(ca), "--out", str(out), "--compatible", COMPATIBLE])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["release"] == "2026.11.2" and doc["bundle"]["size"] == out.stat().st_size
    assert (ca / "signing" / "release.crt").exists()  # issued once, reused next time
    # RAUC checks it as the box does (keyring = the update CA, check-purpose=codesign)
    check_signature(out, COMPATIBLE, ca / "update-ca.crt", tmp_path)
    info = subprocess.run(["rauc", "info", "--no-verify", "--output-format=json", str(out)],
                          capture_output=True, text=True, timeout=120)
    got = json.loads(info.stdout)
    assert got["compatible"] == COMPATIBLE and got["version"] == "2026.11.2"
    # a bundle made by another CA does not pass this CA's keyring
    rogue = tmp_path / "rogue"
    UpdateCa(rogue).init("Someone else")
    bad = tmp_path / "rogue.raucb"
    assert release_bundle.main(["--image", str(disk), "--release", "2026.11.3", "--update-ca",
                                str(rogue), "--out", str(bad), "--compatible", COMPATIBLE]) == 0
    with pytest.raises(BundleError, match="does not verify"):
        check_signature(bad, COMPATIBLE, ca / "update-ca.crt", tmp_path)


def test_cli_refusals_name_the_input(disk: Path, tmp_path: Path, capsys):
    out = str(tmp_path / "x.raucb")
    assert release_bundle.main(["--image", str(tmp_path / "none.img"), "--release", "1",
                                "--update-ca", str(tmp_path), "--out", out,
                                "--compatible", COMPATIBLE]) == 1
    assert "none.img: no such image" in capsys.readouterr().err
    assert release_bundle.main(["--image", str(disk), "--release", "1", "--update-ca",
                                str(tmp_path / "noca"), "--out", out,
                                "--compatible", COMPATIBLE]) == 1
    assert "no update CA there" in capsys.readouterr().err
    assert release_bundle.main(["--board", "no-such-board", "--release", "1",
                                "--update-ca", str(tmp_path)]) == 1
    assert "no-such-board" in capsys.readouterr().err
    assert not Path(out).exists()
