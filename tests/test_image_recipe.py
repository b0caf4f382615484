"""The image recipe without building an image: the board table, the genimage layout (genimage
run on the real configs with the sizes scaled down, read back by provisioning's MBR reader),
the RAUC backend's protocol on file slots, the config files the image writes (checked by the
daemon's own config loader), the first-boot fallback, the manifest writer, the qemu harness's
readers."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from echoel.daemon import config
from echoel.provisioning import image_layout

from image import build_image, manifest, recipe
from image.qemu_boot import boot_slot, read_boot_file, read_data_file

IMAGE_DIR = Path(recipe.__file__).parent
ROOTFS = IMAGE_DIR / "rootfs"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values]}} (repeated keys kept)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


# ------------------------------------------------------------------------------ board table
def test_board_table_is_complete():
    boards = recipe.load_boards()
    assert set(boards) == set(recipe.BOARDS)
    for b in boards.values():
        assert (IMAGE_DIR / "genimage" / b.genimage).is_file(), b.name
        assert (IMAGE_DIR / "rauc" / b.rauc_backend).is_file(), b.name
        a, bb = b.cmdline_for("A"), b.cmdline_for("B")
        assert f"root={b.root_a}" in a and "rauc.slot=A" in a and "@" not in a
        assert f"root={b.root_b}" in bb and "rauc.slot=B" in bb
        assert b.root_a != b.root_b
        assert b.root_a.endswith("2") and b.root_b.endswith("3")  # p2, p3 of the layout
        for pkg in ("systemd", "python3-venv", "rauc", "e2fsprogs", "fdisk"):
            assert pkg in b.packages, (b.name, pkg)
    assert boards["qemu-amd64"].arch == "amd64" and boards["qemu-amd64"].bootable_here
    assert {b.arch for n, b in boards.items() if n != "qemu-amd64"} == {"arm64"}
    assert "snd-dummy" in boards["qemu-amd64"].modules
    # the cache key follows the package inputs, not the board's name
    assert boards["rpi4"].base_key() == boards["rpi5"].base_key()
    assert boards["rpi4"].base_key() != boards["qemu-amd64"].base_key()
    with pytest.raises(recipe.RecipeError, match="allowed: A, B"):
        boards["rpi4"].cmdline_for("C")


def test_board_table_errors_name_the_board_and_key(tmp_path):
    text = (IMAGE_DIR / "boards.toml").read_text()
    bad = tmp_path / "boards.toml"
    bad.write_text(text.replace('arch = "amd64"', 'arch = "mips"', 1))
    with pytest.raises(recipe.RecipeError, match=r"'qemu-amd64' arch 'mips'.*allowed"):
        recipe.load_boards(bad)
    bad.write_text(re.sub(r'\ngenimage = "jetson.cfg"', "", text))
    with pytest.raises(recipe.RecipeError, match="'jetson' has no 'genimage'"):
        recipe.load_boards(bad)
    bad.write_text(text.replace("[boards.rpi5]", "[boards.rpi5x]"))
    with pytest.raises(recipe.RecipeError, match=r"missing.*rpi5"):
        recipe.load_boards(bad)


def test_mirror_sources_and_cache_key():
    from image.base_rootfs import cache_key, sources

    boards = recipe.load_boards()
    rpi, qemu = boards["rpi4"], boards["qemu-amd64"]
    live = sources(rpi)
    assert live[0] == "deb http://deb.debian.org/debian bookworm main non-free-firmware"
    assert any("bookworm-security" in s for s in live)
    pinned = sources(qemu, "20250520T000000Z")
    assert all("snapshot.debian.org/archive/" in s and "20250520T000000Z" in s and
               "[check-valid-until=no]" in s for s in pinned)
    # the tarball cache follows the mirror and the package set
    assert cache_key(qemu) != cache_key(qemu, "20250520T000000Z")
    assert cache_key(qemu) == cache_key(qemu) != cache_key(rpi)


# ------------------------------------------------------------------------------ genimage
def _scaled_config(board: recipe.Board) -> str:
    """The board's real genimage config, sizes scaled down to MiB (for a fast run)."""
    text = build_image.genimage_config(board, ["vmlinuz", "initrd.img", "cmdline-a.txt",
                                               "cmdline-b.txt"], 1_700_000_000)
    return re.sub(r"size = \d+[MG]", "size = 16M", text)


@pytest.mark.parametrize("name", recipe.BOARDS)
def test_genimage_config_makes_the_agreed_layout(name, tmp_path):
    if shutil.which("genimage") is None or shutil.which("mkdosfs") is None:
        pytest.skip("genimage/dosfstools not installed (apt-get install genimage dosfstools "
                    "mtools)")
    board = recipe.load_boards()[name]
    work = tmp_path
    (work / "boot").mkdir()
    for f, data in [("vmlinuz", b"kernel"), ("initrd.img", b"initrd"),
                    ("cmdline-a.txt", board.cmdline_for("A").encode()),
                    ("cmdline-b.txt", board.cmdline_for("B").encode())]:
        (work / "boot" / f).write_bytes(data)
    (work / "rootfs" / "etc").mkdir(parents=True)
    (work / "rootfs" / "etc" / "hostname").write_text("echoel-box\n")
    state = work / "data" / "rauc" / "boot-state"
    state.mkdir(parents=True)
    (state / "primary").write_text("B\n")
    (state / "state.A").write_text("good\n")
    (state / "state.B").write_text("bad\n")
    (work / "genimage-root").mkdir()
    cfg = work / "genimage.cfg"
    cfg.write_text(_scaled_config(board))
    r = subprocess.run(["genimage", "--config", str(cfg), "--rootpath", "genimage-root",
                        "--tmppath", "tmp", "--inputpath", "boot", "--outputpath", "out"],
                       cwd=work, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    img = work / "out" / f"echoel-{name}.img"
    # read back by provisioning's MBR reader (the one flashing and provisioning use)
    parts = {p.number: p for p in image_layout.read_partitions(img)}
    assert sorted(parts) == [1, 2, 3, 4]
    for n, p in parts.items():
        assert p.start % image_layout.ALIGN == 0, (n, p.start)
        assert p.type_id == image_layout.MBR_TYPES[n]
        assert p.bootable == (n == 1)
    assert parts[1].end <= parts[2].start < parts[3].start < parts[4].start
    for n in (2, 3, 4):
        assert image_layout.ext4_label(img, parts[n].start) == image_layout.LABELS[n]
    assert image_layout.data_partition(img).number == 4
    blkid = subprocess.run(["blkid", "-p", "-O", str(parts[1].start), "-o", "export",
                            str(img)], capture_output=True, text=True, timeout=60).stdout
    assert "TYPE=vfat" in blkid and "LABEL=ECHOEL-BOOT" in blkid, blkid
    # the qemu harness reads p1 (mtools) and p4 (debugfs) at their offsets
    got = read_boot_file(img, "cmdline-b.txt", work / "cmdline-b.txt").read_text()
    assert got == board.cmdline_for("B")
    assert read_data_file(img, "/rauc/boot-state/primary") == "B\n"
    assert boot_slot(img) == "A", "primary B is bad: the harness boots A"
    assert read_data_file(img, "/no/such/file") is None


# ------------------------------------------------------------------------------ RAUC backend
def _backend(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = IMAGE_DIR / "rauc" / recipe.load_boards()["qemu-amd64"].rauc_backend
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True,
                          timeout=30, check=False,
                          env={"PATH": "/usr/bin:/bin", "ECHOEL_BOOT_STATE": str(tmp_path)})


def test_qemu_rauc_backend_answers_its_protocol_on_file_slots(tmp_path):
    def out(*a: str) -> str:
        r = _backend(tmp_path, *a)
        assert r.returncode == 0, (a, r.stderr)
        return r.stdout.strip()

    # the image seeds the same state the build writes into /data/rauc/boot-state
    (tmp_path / "primary").write_text("A\n")
    (tmp_path / "state.A").write_text("good\n")
    (tmp_path / "state.B").write_text("bad\n")
    assert out("get-primary") == "A"
    assert out("get-state", "B") == "bad"
    # what RAUC does on install into B: mark it bad, write it, set-primary
    out("set-state", "B", "bad")
    out("set-primary", "B")
    assert out("get-primary") == "B" and out("get-state", "B") == "good"
    # the new slot fails its health check: marked bad, the next boot takes A again
    out("set-state", "B", "bad")
    assert out("get-primary") == "A"
    r = _backend(tmp_path, "set-state", "C", "good")
    assert r.returncode != 0 and "allowed: A, B" in r.stderr
    r = _backend(tmp_path, "set-state", "A", "maybe")
    assert r.returncode != 0 and "allowed: good, bad" in r.stderr


def test_rauc_system_conf_for_every_board():
    for b in recipe.load_boards().values():
        text = build_image.system_conf(b)
        assert "{" not in text, text
        assert f"compatible={b.rauc_compatible}" in text
        assert f"device={b.root_a}" in text and f"device={b.root_b}" in text
        assert f"/usr/lib/echoel/rauc/{b.rauc_backend}" in text
        assert "check-purpose=codesign" in text and "bootname=A" in text


# ------------------------------------------------------------------------------ image config
@pytest.mark.parametrize("name", recipe.BOARDS)
def test_box_toml_of_every_board_passes_the_daemon_config_check(name, tmp_path):
    board = recipe.load_boards()[name]
    path = tmp_path / "box.toml"
    path.write_text(build_image.box_toml(board))
    cfg = config.load(path)
    assert cfg["engine"]["device"] == board.engine_device
    assert cfg["engine"]["format"] == board.engine_format
    assert cfg["daemon"]["state_dir"].startswith("/data/")


def test_units_order_first_boot_before_the_services():
    units = ROOTFS / "etc/systemd/system"
    fb = _unit(units / "echoel-firstboot.service")
    assert fb["Service"]["Type"] == ["oneshot"]
    before = " ".join(fb["Unit"]["Before"])
    assert "echoel.service" in before and "echoel-agent.service" in before
    assert "data.mount" in " ".join(fb["Unit"]["Requires"])
    agent = _unit(units / "echoel-agent.service")
    assert "echoel-firstboot.service" in " ".join(agent["Unit"]["After"])
    assert agent["Service"]["ExecStart"][0].startswith("/opt/echoel/venv/bin/echoel agent")
    data = _unit(units / "data.mount")
    assert data["Mount"]["What"] == ["/dev/disk/by-label/echoel-data"]
    assert data["Mount"]["Where"] == ["/data"]
    dropin = _unit(units / "echoel.service.d/image.conf")
    assert dropin["Service"]["StateDirectory"] == [""]  # the read-only root has no /var/lib
    assert "/data/echoel" in dropin["Service"]["ReadWritePaths"]
    for script in (ROOTFS / "usr/local/sbin/echoel-firstboot",):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                           timeout=30, check=False)
        assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------ manifest
def test_manifest_and_sums(tmp_path):
    if not Path("/var/lib/dpkg/status").exists():
        pytest.skip("not a Debian host (no dpkg database)")
    pkgs = manifest.debian_packages(Path("/"))
    names = {p["name"]: p for p in pkgs}
    ref = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpkg"], capture_output=True,
                         text=True, timeout=60).stdout
    assert names["dpkg"]["version"] == ref
    rows = manifest.python_packages("numpy==2.4.6\n# c\nfoo @ file:///x\n")
    assert rows == [{"name": "foo", "version": "file:///x"},
                    {"name": "numpy", "version": "2.4.6"}]
    (tmp_path / "a.img").write_bytes(b"x" * 5000)
    doc = {"board": {"name": "qemu-amd64"}, "debian": {"packages": pkgs[:3]}}
    manifest.write_manifest(tmp_path / "manifest.json", doc)
    manifest.write_sums(tmp_path, ["a.img", "manifest.json"])
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert manifest.sha256_file(tmp_path / "a.img") == hashlib.sha256(b"x" * 5000).hexdigest()
    assert json.loads((tmp_path / "manifest.json").read_text())["schema"] == manifest.SCHEMA
    store = Path(__file__).resolve().parents[1] / "build" / "models"
    if (store / "basic-pitch" / "active").exists():
        m = manifest.models(store)
        assert m and m[0]["name"] == "basic-pitch" and len(m[0]["sha256"]) == 64
