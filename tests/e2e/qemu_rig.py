"""What the qemu end-to-end tests share: the built qemu image (built when absent), the
reasons to skip, flashing it to a "card" file and provisioning the card for a fleet on the
host's loopback (10.0.2.2 from the guest)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from echoel.provisioning import image_layout
from echoel.provisioning.pki import FleetPki
from echoel.provisioning.provision import (
    BoxSettings,
    check_settings,
    issue_identity,
    write_provisioning,
)

REPO = Path(__file__).resolve().parents[2]
BOARD = "qemu-amd64"
OUT = REPO / "build" / "image" / BOARD
IMAGE = OUT / f"echoel-{BOARD}.img"
BMAP = IMAGE.with_suffix(".bmap")
GUEST_HOST = "10.0.2.2"  # the host's loopback, seen from qemu's user network
TOOLS = ("qemu-system-x86_64", "bmaptool", "mcopy", "debugfs", "mosquitto")


def skip_reasons(tools: tuple[str, ...] = TOOLS) -> str | None:
    """Why an end-to-end test cannot run here (None when it can)."""
    if os.environ.get("ECHOEL_E2E") != "1":
        return "end-to-end test: run with `make test-e2e` (ECHOEL_E2E=1)"
    if os.geteuid() != 0:
        return "needs root (image build, loop mounts for provisioning)"
    missing = [t for t in tools if shutil.which(t) is None and
               not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        return (f"missing tools {missing}: apt-get install qemu-system-x86 bmap-tools mtools "
                "e2fsprogs mosquitto rauc squashfs-tools")
    return None


def built_image(tools: tuple[str, ...] = TOOLS) -> Path:
    """The qemu image (built now when absent); skips the test when it cannot run here."""
    if why := skip_reasons(tools):
        pytest.skip(why)
    if not IMAGE.exists() or not BMAP.exists():
        from image.build_image import ImageBuild
        from image.recipe import board

        ImageBuild(board(BOARD), REPO / "build" / "image").run()
    return IMAGE


def flash(image: Path, dest: Path, extra_bytes: int) -> None:
    """Flash the image to a file with its bmap, then make the 'card' `extra_bytes` bigger than
    the image (/data grows into it on first boot)."""
    r = subprocess.run(["bmaptool", "copy", "--bmap", str(BMAP), str(image), str(dest)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    with open(dest, "r+b") as f:
        f.truncate(image.stat().st_size + extra_bytes)


def provision(card: Path, pki: FleetPki, box: str, broker_port: int, group: str) -> None:
    """Give the card box's identity and the host's broker (as 10.0.2.2)."""
    settings = check_settings(BoxSettings(device_id=box, broker_host=GUEST_HOST,
                                          broker_port=broker_port, group=group))
    ident = issue_identity(pki, box)
    with image_layout.data_mounted(card) as root:
        write_provisioning(root, settings, ident)
