"""Provisioning and flashing against real image files and loop devices.

A small image with the agreed layout is built here (sfdisk + mkfs at offsets), then
provisioned, flashed to files and loop devices in parallel, read back and checked against
references computed in the same run: the image's own bytes, blkid, openssl verify, the CA's
public key. Needs root (loop devices, mount) and bmap-tools, e2fsprogs, dosfstools, fdisk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from echoel.daemon import config as config_mod
from echoel.provisioning import first_boot, flash, image_layout, provision
from echoel.provisioning.flash_cli import add_flash_parser
from echoel.provisioning.pki import FleetPki
from echoel.provisioning.provision_cli import add_provision_parser

TOOLS = ("bmaptool", "sfdisk", "mkfs.ext4", "mkfs.vfat", "losetup", "mount", "blkid",
         "openssl", "zstd")
MISSING = image_layout.have_tools(*TOOLS)
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {MISSING} (apt-get install "
                       "bmap-tools e2fsprogs dosfstools fdisk util-linux openssl zstd)"),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="loop devices and mount need root")
SSH_PUB = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdTm1k3B6lD1pPzQ0h2y1vWm5b8vHcQzW0XKJmD5e1Q "
           "tech@bench")


def _cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="echoel")
    sub = ap.add_subparsers(dest="command", required=True)
    add_provision_parser(sub)
    add_flash_parser(sub)
    args = ap.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flash")


@pytest.fixture(scope="module")
def image(work: Path) -> Path:
    """A 44 MiB image with the agreed layout, some data in rootfs A, and its bmap."""
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=echoel\n")
    (tree / "blob").write_bytes(os.urandom(600_000))
    img = work / "box.img"
    image_layout.build_image(img, (8, 8, 8, 12), tree)
    subprocess.run(["bmaptool", "-q", "create", "-o", f"{img}.bmap", str(img)], check=True,
                   timeout=120)
    return img


@pytest.fixture(scope="module")
def pki(work: Path) -> FleetPki:
    p = FleetPki(work / "pki")
    p.init()
    return p


def _loops_over(path: Path, wait_s: float = 15.0) -> list[str]:
    """Loop devices still attached to path (the kernel detaches a loop device another
    process has open when that process closes it: wait for that)."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["losetup", "--list", "--noheadings", "--output",
                              "NAME,BACK-FILE"], capture_output=True, text=True,
                             timeout=60).stdout
        hits = [ln for ln in out.splitlines() if ln.split(None, 1)[1:] == [str(path)]]
        if not hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.2)


def _private_keys_under(folder: Path) -> list[Path]:
    hits = []
    for p in folder.rglob("*"):
        if p.is_file() and p.stat().st_size < 1_000_000 and b"PRIVATE KEY" in p.read_bytes():
            hits.append(p)
    return hits


def _check_identity(got: dict, device_id: str, pki: FleetPki, work: Path) -> None:
    """CN = device id, issued by the fleet CA (openssl verify too), key 0600 and matching."""
    cert = x509.load_pem_x509_certificate(got["device.crt"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    cert.verify_directly_issued_by(ca)
    assert got["ca.crt"] == pki.ca_cert_path.read_bytes()
    key = serialization.load_pem_private_key(got["device.key"], None)
    assert key.public_key() == cert.public_key()
    assert got["modes"]["device.key"] == 0o600
    assert got["modes"]["provision.json"] == 0o600
    crt = work / f"check-{device_id}.crt"
    crt.write_bytes(got["device.crt"])
    r = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca_cert_path), str(crt)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert got["provision"]["device_id"] == device_id


def test_layout_matches_the_agreement_and_blkid(image: Path) -> None:
    parts = image_layout.read_partitions(image)
    assert [p.number for p in parts] == [1, 2, 3, 4]
    assert all(p.start % image_layout.ALIGN == 0 for p in parts)
    assert parts[0].bootable and parts[0].type_id == 0x0C
    js = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                   text=True, check=True, timeout=60).stdout)
    ref = [(p["start"] * 512, p["size"] * 512) for p in js["partitiontable"]["partitions"]]
    assert [(p.start, p.size) for p in parts] == ref
    for p in parts:
        label = subprocess.run(["blkid", "-p", "-O", str(p.start), "-s", "LABEL", "-o",
                                "value", str(image)], capture_output=True, text=True,
                               timeout=60).stdout.strip()
        assert label == image_layout.LABELS[p.number]
        if p.number > 1:
            assert image_layout.ext4_label(image, p.start) == label
    assert image_layout.data_partition(image).number == 4
    with pytest.raises(image_layout.LayoutError, match="no MBR"):
        image_layout.read_partitions(image.with_suffix(".img.bmap"))


@needs_root
def test_provision_an_image_file_and_read_it_back(image: Path, pki: FleetPki, work: Path,
                                                  monkeypatch) -> None:
    target = work / "prov.img"
    shutil.copyfile(image, target)
    cwd = work / "technician"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "tech.pub").write_text(SSH_PUB + "\n")
    (cwd / "psk.txt").write_text("correct horse battery\n")
    rc = _cli(["provision", str(target), "--device-id", "box-0001", "--pki", str(pki.root),
               "--broker", "fleet.example:8884", "--group", "studio-a", "--wifi-ssid",
               "Studio Net", "--wifi-psk-file", "psk.txt", "--ssh-key", "tech.pub"])
    assert rc == 0
    got = provision.read_back(target)
    _check_identity(got, "box-0001", pki, work)
    doc = got["provision"]
    assert (doc["broker_host"], doc["broker_port"], doc["group"]) == ("fleet.example", 8884,
                                                                      "studio-a")
    assert doc["network"] == {"mode": "wifi", "ssid": "Studio Net",
                              "psk": "correct horse battery"}
    assert doc["ssh_authorized_keys"] == [SSH_PUB]
    assert doc["hostname"] == "box-0001" and doc["schema"] == provision.SCHEMA_VERSION
    serial = x509.load_pem_x509_certificate(got["device.crt"]).serial_number
    assert str(serial) in [r["serial"] for r in pki.list() if r["name"] == "box-0001"]
    # nothing secret left behind: not in the working folder, not in the PKI folder
    assert _private_keys_under(cwd) == []
    assert [p.name for p in _private_keys_under(pki.root)] == ["ca.key"]
    assert _loops_over(target) == []
    # asked to keep it: the key lands there, 0600
    keep = work / "kept"
    assert _cli(["provision", str(target), "--device-id", "box-0001", "--pki", str(pki.root),
                 "--broker", "fleet.example", "--keep-secrets", str(keep)]) == 0
    kept = keep / "box-0001.key"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes() == provision.read_back(target)["device.key"]


@needs_root
def test_provision_refuses_bad_input_and_cleans_up_on_errors(image: Path, pki: FleetPki,
                                                             work: Path, monkeypatch,
                                                             capsys) -> None:
    target = work / "err.img"
    shutil.copyfile(image, target)
    base = ["provision", str(target), "--pki", str(pki.root), "--broker", "fleet.example"]
    assert _cli([*base, "--device-id", "Bad_Id"]) == 2
    assert "device id 'Bad_Id'" in capsys.readouterr().err
    assert _cli([*base, "--device-id", "box-x", "--static", "10.0.0.5/24",
                 "--gateway", "10.9.9.1", "--dns", "10.0.0.1"]) == 2
    assert "gateway 10.9.9.1: not in the box's network" in capsys.readouterr().err
    blank = work / "blank.img"
    blank.write_bytes(b"\0" * 1_048_576)
    assert _cli([*base[:1], str(blank), *base[2:], "--device-id", "box-x"]) == 2
    assert "no MBR partition table" in capsys.readouterr().err

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    made: list[str] = []
    real_mkdtemp = image_layout.tempfile.mkdtemp

    def mkdtemp(*a, **k) -> str:
        made.append(real_mkdtemp(*a, **k))
        return made[-1]

    monkeypatch.setattr(provision, "write_provisioning", boom)
    monkeypatch.setattr(image_layout.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(OSError, match="No space left"):
        provision.provision_target(target, provision.BoxSettings("box-x", "fleet.example"), pki)
    assert len(made) == 1  # it was mounted there
    assert _loops_over(target) == []  # detached
    assert not Path(made[0]).exists()  # unmounted and removed
    assert f" {made[0]} " not in Path("/proc/self/mountinfo").read_text()


@needs_root
def test_flash_four_targets_in_parallel_with_batch(image: Path, pki: FleetPki, work: Path,
                                                   monkeypatch, capsys) -> None:
    d = work / "par"
    d.mkdir()
    monkeypatch.chdir(d)
    files = [d / "card-a.img", d / "card-b.img"]
    size = 64 * 1024 * 1024
    with image_layout.loop_device(d / "lo1.bin", size) as lo1, \
            image_layout.loop_device(d / "lo2.bin", size) as lo2:
        serial2 = flash.inspect_target(lo2).serial
        (d / "batch.csv").write_text(
            "target,serial,device_id,hostname,group\n"
            f"{files[0]},,box-a,,\n"
            f"{files[1]},,box-b,studio-b-1,\n"
            f"{lo1},,box-c,,rack\n"
            f",{serial2},box-d,,\n")
        summary = d / "summary.json"
        rc = _cli(["flash", str(image), *map(str, files), str(lo1), str(lo2), "--batch",
                   "batch.csv", "--pki", str(pki.root), "--broker", "10.1.2.3", "--jobs", "4",
                   "--json", str(summary)])
        out = capsys.readouterr()
        assert rc == 0, out.out + out.err
        doc = json.loads(summary.read_text())
        assert doc["ok"] and len(doc["targets"]) == 4
        assert all(t["verified"] and t["provisioned"] for t in doc["targets"])
        assert "box-c" in out.out and "verified" in out.out  # the summary table
        ids = {"box-a": files[0], "box-b": files[1], "box-c": lo1, "box-d": lo2}
        p4 = image_layout.data_partition(image)
        ref = image.read_bytes()[: p4.start]  # everything before p4 is the image's bytes
        for dev_id, t in ids.items():
            with open(t, "rb") as f:
                assert f.read(p4.start) == ref, t
            got = provision.read_back(t)
            _check_identity(got, dev_id, pki, work)
        assert provision.read_back(files[1])["provision"]["hostname"] == "studio-b-1"
        assert provision.read_back(lo1)["provision"]["group"] == "rack"
        assert _private_keys_under(d) == []
        for t in (*files, lo1, lo2):
            assert _loops_over(t) == []  # no partition loop left attached


@needs_root
def test_read_back_catches_a_changed_byte_and_zst_images_flash(image: Path, work: Path) -> None:
    bmap = flash.read_bmap(f"{image}.bmap")
    target = work / "rb.img"
    zst = work / "boxz.img.zst"
    subprocess.run(["zstd", "-q", "-f", "-o", str(zst), str(image)], check=True, timeout=120)
    shutil.copyfile(f"{image}.bmap", work / "boxz.img.bmap")
    _, jobs = flash.plan(zst, [target])
    run = flash.flash(zst, jobs, bmap, quiet=True)
    assert run.ok, run.to_json()
    assert target.read_bytes() == image.read_bytes()
    flash.verify_target(target, bmap)
    start, length, _ = list(bmap.byte_ranges())[2]
    with open(target, "r+b") as f:  # one flipped bit, as a bad card would return it
        f.seek(start + length // 2)
        b = f.read(1)
        f.seek(start + length // 2)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(flash.FlashError, match=r"read-back of .* checksum mismatch"):
        flash.verify_target(target, bmap)


def _root_disk() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[4] == "/":
            sysdev = Path(f"/sys/dev/block/{f[2]}")
            if sysdev.exists():
                name = sysdev.resolve().name
                if (sysdev / "partition").exists():
                    name = sysdev.resolve().parent.name
                node = Path("/dev") / name
                return node if image_layout.is_block_device(node) else None
    return None


@needs_root
def test_refusals(image: Path, work: Path, capsys) -> None:
    d = work / "refuse"
    d.mkdir()
    # a short target: a 16 MiB card for a 44 MiB image
    with image_layout.loop_device(d / "short.bin", 16 * 1024 * 1024) as short:
        with pytest.raises(flash.FlashError, match=r"too small: 16777216 bytes"):
            flash.plan(image, [short])
    # a mounted target: a loop card whose p4 is mounted, and an image file likewise
    mounted_file = d / "mounted.img"
    shutil.copyfile(image, mounted_file)
    with image_layout.loop_device(d / "m.bin", 64 * 1024 * 1024) as card:
        run = flash.flash(image, flash.plan(image, [card])[1], flash.read_bmap(
            f"{image}.bmap"), quiet=True)
        assert run.ok
        with image_layout.data_mounted(card), image_layout.data_mounted(mounted_file):
            for t in (card, mounted_file):
                with pytest.raises(flash.FlashError, match=r"is mounted: /dev/loop\d+ at "):
                    flash.plan(image, [t])
                with pytest.raises(provision.ProvisionError, match=r"refused: .* is mounted"):
                    provision.provision_target(t, provision.BoxSettings(
                        "box-m", "fleet.example"), FleetPki(work / "no-pki"))
        flash.plan(image, [card, mounted_file])  # unmounted again: accepted
    # the image itself, directly or through a loop device
    with pytest.raises(flash.FlashError, match="is the image"):
        flash.plan(image, [image])
    lo = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)],
                        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    try:
        with pytest.raises(flash.FlashError, match="is a loop device over the image"):
            flash.plan(image, [lo])
    finally:
        subprocess.run(["losetup", "-d", lo], capture_output=True, timeout=60, check=False)
    # a card that is not there: never a file created under /dev
    with pytest.raises(flash.FlashError, match="no such block device"):
        flash.plan(image, ["/dev/echoel-no-such-card"])
    assert not Path("/dev/echoel-no-such-card").exists()
    # the system disk
    root = _root_disk()
    if root is not None:
        with pytest.raises(flash.FlashError, match="holds the running system"):
            flash.plan(image, [root])
    # a corrupt image (one byte changed after its bmap was made): refused before writing
    bad = d / "bad.img"
    shutil.copyfile(image, bad)
    shutil.copyfile(f"{image}.bmap", f"{bad}.bmap")
    start, _, _ = list(flash.read_bmap(f"{bad}.bmap").byte_ranges())[-2]
    with open(bad, "r+b") as f:
        f.seek(start + 7)
        f.write(b"\x5a" if f.read(1) != b"\x5a" else b"\xa5")
    out = d / "never.img"
    assert _cli(["flash", str(bad), str(out), "--quiet"]) == 2
    assert "corrupt image bad.img: checksum mismatch" in capsys.readouterr().err
    assert not out.exists()
    # a damaged bmap is refused too
    bm = Path(f"{bad}.bmap")
    bm.write_text(bm.read_text().replace("<ImageSize> ", "<ImageSize> 1"))
    with pytest.raises(flash.FlashError, match="its own checksum does not match"):
        flash.read_bmap(bm)
    if root is None:
        pytest.skip("/ is not on a block device here: the system-disk refusal was not tried")


def test_batch_csv_names_bad_rows_by_line(work: Path, image: Path) -> None:
    csv_path = work / "bad-batch.csv"
    csv_path.write_text("target,serial,device_id\n"
                        "/tmp/a.img,,box-1\n"
                        "/tmp/b.img,,Box_2\n"
                        ",,box-3\n"
                        "/tmp/c.img,,box-1\n"
                        "/tmp/a.img,,box-5\n"
                        "/tmp/d.img,,box-6,extra\n")
    with pytest.raises(flash.FlashError) as exc:
        flash.read_batch(csv_path)
    msg = str(exc.value)
    for n, what in [(3, "Box_2"), (4, "neither target nor serial"),
                    (5, "already on line 2"), (6, "already on line 2"), (7, "more fields")]:
        assert f"line {n}: " in msg and what in msg, (n, msg)
    assert "line 2:" not in msg
    ok = work / "ok-batch.csv"
    ok.write_text("device_id,serial\nbox-9,SER123\n")
    rows = flash.read_batch(ok)
    t = flash.Target(Path("/dev/fake"), True, 0, "SER123")
    assert flash.match_batch(rows, t) == rows[0]
    base = provision.BoxSettings("x-placeholder", "fleet.example")
    with pytest.raises(flash.FlashError, match="no row in the batch manifest"):
        flash.plan(image, [work / "nobody.img"], batch=rows, base=base)


# ---------------------------------------------------------------------------- first boot
def _fake_root(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                     "tech:x:1001:1001::/home/tech:/bin/bash\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n")
    (root / "home/tech/.ssh").mkdir(parents=True)
    (root / "home/tech/.ssh/authorized_keys").write_text("ssh-rsa AAAAB3Nza other@host\n")
    (root / "etc/echoel").mkdir()
    (root / "etc/echoel/box.toml").write_text('# image defaults\n[engine]\nrate = 48000\n\n'
                                              '[chain]\ngain_db = -3.0\n\n[[chain.eq]]\n'
                                              'freq = 200.0\n')
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _assert_marked(root: Path, state: str, reason: str) -> None:
    """box.toml says the state, in [provisioning] and in a comment for a reader."""
    text = (root / first_boot.BOX_TOML).read_text()
    box = tomllib.loads(text)["provisioning"]
    assert (box["state"], box["reason"]) == (state, reason)
    assert f"# provisioning state: {state}" in text


def test_first_boot_applies_provisioning_idempotently(tmp_path: Path, pki: FleetPki) -> None:
    root, data = _fake_root(tmp_path), tmp_path / "data"
    settings = provision.BoxSettings(
        "box-fb1", "fleet.example", 8883, "studio", "", provision.Network(
            "wifi", ssid='My "Net"', psk="passphrase-123"), (SSH_PUB,))
    provision.write_provisioning(data, settings, provision.issue_identity(pki, "box-fb1"))
    done = first_boot.apply(root, data)
    assert done.state == "provisioned", done.reason
    assert (root / "etc/hostname").read_text() == "box-fb1\n"
    assert "127.0.1.1\tbox-fb1" in (root / "etc/hosts").read_text()
    assert "debian" not in (root / "etc/hosts").read_text()
    wpa = root / first_boot.WPA_FILE
    ssid_hex = b'My "Net"'.hex()
    assert f"ssid={ssid_hex}\n" in wpa.read_text()
    assert 'psk="passphrase-123"\n' in wpa.read_text()
    assert stat.S_IMODE(wpa.stat().st_mode) == 0o600
    assert "Type=ether" in (root / first_boot.WIRED_FILE).read_text()
    ak = root / "home/tech/.ssh/authorized_keys"
    assert done.ssh_keys_file == "/home/tech/.ssh/authorized_keys"
    lines = ak.read_text().splitlines()
    assert "ssh-rsa AAAAB3Nza other@host" in lines and SSH_PUB in lines
    if os.geteuid() == 0:
        assert ak.stat().st_uid == 1001
    cfg = config_mod.load(root / first_boot.BOX_TOML)  # the daemon's own loader accepts it
    assert cfg["agent"]["enabled"] and cfg["agent"]["broker_host"] == "fleet.example"
    assert cfg["engine"]["rate"] == 48000 and cfg["chain"]["eq"][0]["freq"] == 200.0
    assert (root / first_boot.BOX_TOML).read_text().startswith("# image defaults\n")
    for k in ("ca_file", "cert_file", "key_file"):
        assert Path(cfg["agent"][k]).is_file()
    _assert_marked(root, "provisioned", "")
    state = first_boot.read_state(data)
    assert state["state"] == "provisioned" and state["device_id"] == "box-fb1"
    before = _snapshot(root) | {"state": (data / "provisioning/state.json").read_bytes()}
    again = first_boot.apply(root, data)
    after = _snapshot(root) | {"state": (data / "provisioning/state.json").read_bytes()}
    assert again.state == "provisioned" and after == before  # idempotent
    # the technician re-provisions it wired static: the Wi-Fi files go away
    static = provision.BoxSettings("box-fb1", "fleet.example", network=provision.Network(
        "static", "192.168.7.20/24", "192.168.7.1", ("192.168.7.1",)))
    provision.write_provisioning(data, static, provision.issue_identity(pki, "box-fb1"))
    first_boot.apply(root, data)
    assert not wpa.exists() and not (root / first_boot.WIFI_FILE).exists()
    assert "Address=192.168.7.20/24" in (root / first_boot.WIRED_FILE).read_text()


def test_first_boot_reports_unprovisioned(tmp_path: Path, pki: FleetPki, work: Path) -> None:
    root, data = _fake_root(tmp_path), tmp_path / "data"
    done = first_boot.apply(root, data)
    assert done.state == "unprovisioned" and "provision.json" in done.reason
    assert config_mod.load(root / first_boot.BOX_TOML)["agent"]["enabled"] is False
    _assert_marked(root, "unprovisioned", done.reason)
    assert first_boot.read_state(data)["state"] == "unprovisioned"
    assert not (root / "etc/hostname").exists()
    # a certificate from another CA: refused, the agent stays off
    other = FleetPki(work / "other-ca")
    if not other.exists():
        other.init("Another fleet")
    settings = provision.BoxSettings("box-fb2", "fleet.example")
    ident = provision.issue_identity(other, "box-fb2")
    provision.write_provisioning(data, settings, ident)
    (data / "provisioning/pki/ca.crt").write_bytes(pki.ca_cert_path.read_bytes())
    done = first_boot.apply(root, data)
    assert done.state == "unprovisioned" and "not issued by ca.crt" in done.reason
    # an expired certificate: refused
    provision.write_provisioning(data, settings, provision.issue_identity(pki, "box-fb2", 0))
    done = first_boot.apply(root, data)
    assert done.state == "unprovisioned" and "expired" in done.reason
    # a key anyone can read: refused
    provision.write_provisioning(data, settings, provision.issue_identity(pki, "box-fb2"))
    assert first_boot.apply(root, data).state == "provisioned"
    os.chmod(data / "provisioning/pki/device.key", 0o644)
    done = first_boot.apply(root, data)
    assert done.state == "unprovisioned" and "mode 644" in done.reason
    assert tomllib.loads((root / first_boot.BOX_TOML).read_text())["agent"]["enabled"] is False


GENIMAGE_CFG = """
image boot.vfat {{ vfat {{ label = "ECHOEL-BOOT" files = {{ "kernel" }} }} size = 8M
  temporary = true }}
image a.ext4 {{ ext4 {{ label = "echoel-a" use-mke2fs = true }} srcpath = "{src}/rootfs"
  size = 8M temporary = true }}
image b.ext4 {{ ext4 {{ label = "echoel-b" use-mke2fs = true }} empty = true size = 8M
  temporary = true }}
image data.ext4 {{ ext4 {{ label = "echoel-data" use-mke2fs = true }} srcpath = "{src}/data"
  size = 12M temporary = true }}
image box.img {{
  hdimage {{ partition-table-type = "mbr" align = 4M }}
  partition boot {{ partition-type = 0x0C bootable = true image = "boot.vfat" }}
  partition rootfs-a {{ partition-type = 0x83 image = "a.ext4" }}
  partition rootfs-b {{ partition-type = 0x83 image = "b.ext4" }}
  partition data {{ partition-type = 0x83 image = "data.ext4" }}
}}
"""


@needs_root
@pytest.mark.skipif(shutil.which("genimage") is None, reason="genimage not installed "
                    "(apt-get install genimage)")
def test_an_image_made_by_genimage_is_provisioned(tmp_path: Path, pki: FleetPki) -> None:
    """The image recipe builds with genimage: the same layout, read and provisioned."""
    src = tmp_path / "in"
    for d in ("boot", "rootfs/etc", "data/echoel"):
        (src / d).mkdir(parents=True)
    (src / "boot/kernel").write_bytes(b"kernel")
    (src / "rootfs/etc/hostname").write_text("echoel-box\n")
    cfg = tmp_path / "g.cfg"
    cfg.write_text(GENIMAGE_CFG.format(src=src))
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["genimage", "--config", str(cfg), "--inputpath", str(src / "boot"),
                        "--rootpath", str(src), "--outputpath", str(out), "--tmppath",
                        str(tmp_path / "tmp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    img = out / "box.img"
    parts = image_layout.read_partitions(img)
    assert [(p.number, p.start % image_layout.ALIGN) for p in parts] == [(1, 0), (2, 0), (3, 0),
                                                                          (4, 0)]
    provision.provision_target(img, provision.BoxSettings("box-gen", "fleet.example"), pki)
    got = provision.read_back(img)
    _check_identity(got, "box-gen", pki, tmp_path)
    with image_layout.data_mounted(img, readonly=True) as data:
        assert (data / "echoel").is_dir()  # the data skeleton is kept


def test_agent_of_an_unprovisioned_box_says_so_and_exits(tmp_path: Path, capsys) -> None:
    from echoel.daemon import cli

    box = tmp_path / "box.toml"
    box.write_text('[provisioning]\nstate = "unprovisioned"\nreason = "no provision.json"\n')
    assert cli.main(["agent", "--config", str(box)]) == 0
    err = capsys.readouterr().err
    assert "unprovisioned (no provision.json)" in err and "echoel provision" in err
