"""Build a complete, bootable Echoel Box image for one board (`make image BOARD=...`).

    python image/build_image.py --board qemu-amd64 [--out build/image] [--snapshot STAMP]
        [--update-ca PEM] [--keep-rootfs]
    python image/build_image.py --list

Steps (each timed in build/image/BOARD/build.json):
  base      Debian rootfs with mmdebstrap (cached tarball per package inputs)
  stack     the stack's wheel (`pip wheel --no-deps` of this checkout) and its dependencies
            from PyPI, pinned to this checkout's venv versions, into /opt/echoel/venv; models
            from build/models into /opt/echoel/models
  config    the echoel user, units (echoel, echoel-agent, echoel-firstboot, data.mount,
            RAUC's), /etc/echoel/box.toml for the board, RAUC system.conf and backend
  warm      numba's kernels compiled once (the engine on ALSA's null PCM) into the cache
            shipped on the data partition
  trim      build-only packages purged, apt caches and SSH host keys removed
  genimage  boot vfat + rootfs A + rootfs B (empty) + data, MBR, 4 MiB alignment
  outputs   bmap, zstd-compressed image, SHA256SUMS, manifest.json (the SBOM)

Needs root (chroot, mounts) and the Debian packages mmdebstrap, genimage, bmap-tools,
dosfstools, mtools, e2fsprogs, zstd; arm64 boards also qemu-user-static, binfmt-support and
arch-test. Outputs go to build/image/BOARD/ (never into git).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `image` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echoel.daemon.model_store import sha256_file

from image import chroot
from image.base_rootfs import HOST_ARCH, BaseError, base_tarball
from image.manifest import (
    debian_packages,
    git_commit,
    models,
    python_packages,
    write_manifest,
    write_sums,
)
from image.recipe import IMAGE_DIR, LAYOUT, Board, RecipeError, load_boards

REPO = IMAGE_DIR.parent
HOST_PY = Path(sys.executable)
TOOLS = {"mmdebstrap": "mmdebstrap", "genimage": "genimage", "bmaptool": "bmap-tools",
         "mkdosfs": "dosfstools", "mcopy": "mtools", "mke2fs": "e2fsprogs", "zstd": "zstd",
         "chroot": "coreutils", "openssl": "openssl"}
VENV = "/opt/echoel/venv"
BUILD_DIR_IN_ROOT = "tmp/echoel-build"
PIP_CACHE_IN_ROOT = "var/cache/echoel-build-pip"
WARM_SECONDS = 20.0
WARM_SECONDS_EMULATED = 240.0  # qemu-user: the engine needs minutes to reach streaming


class BuildError(RuntimeError):
    """The image cannot be built; the message names the step and what to do."""


# ------------------------------------------------------------------------------ small helpers
def _sh(cmd: list[str], what: str, log: Path, timeout: float = 3600, **kw) -> str:
    with open(log, "a") as lf:
        lf.write(f"$ {' '.join(cmd)}\n")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    with open(log, "a") as lf:
        lf.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise BuildError(f"{what}: {' '.join(cmd[:3])}... exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()[-1500:]}")
    return r.stdout


def missing_tools() -> list[str]:
    """Debian packages to install before building (from the tools not found)."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def du_bytes(path: Path) -> int:
    """Apparent size of a tree in bytes (du -sb)."""
    out = subprocess.run(["du", "-sb", "--one-file-system", str(path)], capture_output=True,
                         text=True, check=False, timeout=600).stdout
    return int(out.split()[0]) if out else 0


def source_epoch(repo: Path = REPO) -> int:
    """SOURCE_DATE_EPOCH: the checkout's last commit time (now when not a git checkout)."""
    r = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%ct"],
                       capture_output=True, text=True, check=False, timeout=60)
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else int(time.time())


def copy_checkout(repo: Path, dest: Path) -> int:
    """Copy the checkout's files (tracked and untracked, not ignored: no build/, no venv) to
    dest, where the wheel is built without touching the checkout; the number of files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True, timeout=120)
    shutil.rmtree(dest, ignore_errors=True)
    n = 0
    for rel in out.stdout.decode().split("\0"):
        if not rel or not (repo / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest / rel)
        n += 1
    return n


UPDATE_DIR = "/data/echoel/update"  # [update] dir: the data partition both slots share
REBOOT_REQUEST = f"{UPDATE_DIR}/reboot-request"


def box_toml(board: Board) -> str:
    """/etc/echoel/box.toml of the image: the board's engine device; [agent] comes from
    provisioning (echoel first-boot)."""
    return (f"# Echoel Box config: image defaults for {board.name}. `echoel config keys` lists "
            f"every key.\n# The [agent] section is written at provisioning (echoel-firstboot)."
            f"\n[engine]\ndevice = \"{board.engine_device}\"\nformat = \"{board.engine_format}"
            f"\"\nperiod = {board.engine_period}\n\n[daemon]\nrun_dir = \"/run/echoel\"\n"
            f"state_dir = \"/data/echoel/state\"\n\n"
            "# updates live on the data partition both slots share; the agent (user echoel,\n"
            "# no new privileges) asks root's echoel-update-reboot.path for the reboot\n"
            f"[update]\ndir = \"{UPDATE_DIR}\"\n"
            f"reboot_command = \"touch {REBOOT_REQUEST}\"\n")


def system_conf(board: Board) -> str:
    """RAUC's system.conf for the board, from image/rauc/system.conf.in."""
    template = (IMAGE_DIR / "rauc" / "system.conf.in").read_text()
    return template.format(compatible=board.rauc_compatible, slot_a=board.root_a,
                           slot_b=board.root_b, keyring="/etc/rauc/update-ca.pem",
                           data_dir="/data/rauc", mount_prefix="/run/rauc/mnt",
                           backend=f"/usr/lib/echoel/rauc/{board.rauc_backend}",
                           bundle_formats="verity")


def genimage_config(board: Board, boot_files: list[str], epoch: int) -> str:
    """The board's genimage config with the boot file list and timestamp filled in."""
    text = (IMAGE_DIR / "genimage" / board.genimage).read_text()
    files = ", ".join(json.dumps(f) for f in boot_files)
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y%m%d%H%M%S")
    return text.replace("@BOOT_FILES@", files).replace("@EPOCH_DATE@", stamp)


def dev_update_ca(folder: Path, log: Path) -> Path:
    """A development update CA (for images built without --update-ca); its cert path."""
    crt = folder / "update-ca.crt"
    if not crt.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(folder / "update-ca.key"),
             "-out", str(crt), "-days", "3650", "-subj", "/CN=Echoel development update CA"],
            "development update CA", log)
        os.chmod(folder / "update-ca.key", 0o600)
    return crt


def host_ca_bundle() -> Path:
    """The CA bundle this host's pip trusts (PIP_CERT, REQUESTS_CA_BUNDLE, or Debian's)."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    return Path("/etc/ssl/certs/ca-certificates.crt")


def host_constraints() -> str:
    """This checkout's venv versions as pip constraints (what the tests ran against)."""
    out = subprocess.run([str(HOST_PY), "-m", "pip", "freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return "".join(line + "\n" for line in out.splitlines()
                   if "==" in line and " @ " not in line and not line.startswith("-e"))


# ------------------------------------------------------------------------------ build steps
class ImageBuild:
    """One image build for one board; run() does every step and returns the report."""

    def __init__(self, board: Board, out_root: Path, snapshot: str = "",
                 update_ca: Path | None = None, models_dir: Path | None = None,
                 keep_rootfs: bool = False) -> None:
        self.board = board
        self.out = out_root / board.name
        self.cache = out_root / "cache"
        self.snapshot = snapshot
        self.update_ca = update_ca
        self.models_dir = models_dir or REPO / "build" / "models"
        self.keep_rootfs = keep_rootfs
        self.root = self.out / "rootfs"
        self.data = self.out / "data"
        self.boot = self.out / "boot"
        self.log = self.out / "build.log"
        self.epoch = source_epoch()
        self.times: dict[str, float] = {}
        self.facts: dict = {}

    def _step(self, name: str, fn) -> None:
        t0 = time.monotonic()
        print(f"[{self.board.name}] {name}...", flush=True)
        fn()
        self.times[name] = round(time.monotonic() - t0, 1)
        print(f"[{self.board.name}] {name}: {self.times[name]} s", flush=True)

    def run(self) -> dict:
        """Build every step; the report (also written to build.json)."""
        if os.geteuid() != 0:
            raise BuildError("building an image needs root (chroot, mounts, device nodes)")
        if missing := missing_tools():
            raise BuildError(f"missing build tools: apt-get install {' '.join(missing)}")
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self._step("base", self.step_base)
        self._step("stack", self.step_stack_and_config)
        self._step("boot", self.step_boot_files)
        self._step("genimage", self.step_genimage)
        self._step("outputs", self.step_outputs)
        if not self.keep_rootfs:
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.data, ignore_errors=True)
        self.times["total"] = round(time.monotonic() - t0, 1)
        report = {"board": self.board.name, "seconds": self.times, **self.facts}
        (self.out / "build.json").write_text(json.dumps(report, indent=1) + "\n")
        return report

    # -- base
    def step_base(self) -> None:
        tar, built, secs = base_tarball(self.board, self.cache, self.snapshot, self.log,
                                        self.epoch)
        self.facts["base"] = {"tarball": tar.name, "cached": not built,
                              "mmdebstrap_s": round(secs, 1), "bytes": tar.stat().st_size}
        for d in (self.root, self.data, self.boot):
            shutil.rmtree(d, ignore_errors=True)
        self.root.mkdir(parents=True)
        _sh(["tar", "-xpf", str(tar), "--numeric-owner", "--xattrs", "--xattrs-include=*",
             "-C", str(self.root)], "unpack the base rootfs", self.log)

    # -- stack, config, warm, trim (one chroot session)
    def step_stack_and_config(self) -> None:
        b, root = self.board, self.root
        wheels = self.out / "wheels"
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        src = self.out / "src"
        copy_checkout(REPO, src)
        _sh([str(HOST_PY), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
             str(src)], "the stack's wheel", self.log)
        shutil.rmtree(src, ignore_errors=True)
        wheel = next(wheels.glob("echoel_box-*.whl"))
        (wheels / "constraints.txt").write_text(host_constraints())
        (wheels / "warm.toml").write_text(
            f'[engine]\ndevice = "null"\nformat = "{b.engine_format}"\n'
            f'period = {b.engine_period}\nrescan_ms = 60000\n'
            f'[realtime]\nmlock = false\ncpu = -1\n'
            f'[daemon]\nrun_dir = "/run/echoel-warm"\nstate_dir = "/tmp/echoel-warm"\n')
        # the build host's CA bundle (its pip may reach PyPI through a proxy with its own CA):
        # used for the build only, never copied into the image
        shutil.copy(host_ca_bundle(), wheels / "host-ca.pem")
        pip_env = {"PIP_CERT": f"/{BUILD_DIR_IN_ROOT}/host-ca.pem",
                   "PIP_DEFAULT_TIMEOUT": "180"}
        binds = {BUILD_DIR_IN_ROOT: wheels, PIP_CACHE_IN_ROOT: self.cache / f"pip-{b.arch}"}
        t_stack = time.monotonic()
        with chroot.mounted(root, binds):
            run = self._chroot
            run("groupadd", "--system", "echoel")
            run("useradd", "--system", "--gid", "echoel", "--groups", "audio", "--home-dir",
                "/data/echoel", "--no-create-home", "--shell", "/usr/sbin/nologin", "echoel")
            run("python3", "-m", "venv", VENV)
            run(f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check",
                "--cache-dir", f"/{PIP_CACHE_IN_ROOT}", "--constraint",
                f"/{BUILD_DIR_IN_ROOT}/constraints.txt", f"/{BUILD_DIR_IN_ROOT}/{wheel.name}",
                env=pip_env, timeout=3600)
            freeze = run(f"{VENV}/bin/pip", "freeze", "--disable-pip-version-check").stdout
            self.facts["python_packages"] = python_packages(freeze)
            self.times["stack.pip"] = round(time.monotonic() - t_stack, 1)
            self._install_models()
            self._install_config()
            t_warm = time.monotonic()
            self._warm_numba()
            self.times["warm"] = round(time.monotonic() - t_warm, 1)
            self._trim()
        for mountpoint in binds:  # empty again once unmounted
            os.rmdir(root / mountpoint)
        self.facts["debian_packages"] = debian_packages(root)
        self.facts["kernel"] = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
        # the data partition's tree: /data of the rootfs moves to its own file system
        shutil.rmtree(self.data, ignore_errors=True)
        os.replace(root / "data", self.data)
        (root / "data").mkdir(mode=0o755)
        self.facts["bytes"] = {"rootfs": du_bytes(root), "venv": du_bytes(root / VENV[1:]),
                               "models": du_bytes(root / "opt/echoel/models"),
                               "data": du_bytes(self.data)}

    def _chroot(self, *cmd: str, env: dict[str, str] | None = None,
                timeout: float = 1800, check: bool = True):
        try:
            return chroot.run(self.root, *cmd, env=env, timeout=timeout, check=check,
                              log=self.log)
        except chroot.ChrootError as exc:
            raise BuildError(str(exc)) from None

    def _install_models(self) -> None:
        dest = self.root / "opt/echoel/models"
        if not (self.models_dir / "basic-pitch" / "active").exists():
            _sh([str(HOST_PY), "-m", "echoel.daemon.model_fetch", "--store",
                 str(self.models_dir)], "fetch the models (make models)", self.log)
        shutil.copytree(self.models_dir, dest, symlinks=True, dirs_exist_ok=True)
        for p in [dest, *dest.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        self.facts["models"] = models(dest)

    def _install_config(self) -> None:
        b, root = self.board, self.root
        # the overlay: units, mounts, first boot, network, journald, sshd
        shutil.copytree(IMAGE_DIR / "rootfs", root, symlinks=True, dirs_exist_ok=True)
        units = root / "etc/systemd/system"
        shutil.copy(REPO / "daemon/units/echoel.service", units / "echoel.service")
        dropin = units / "echoel.service.d"
        dropin.mkdir(exist_ok=True)
        numba = f"[Service]\nEnvironment=NUMBA_CPU_NAME={b.numba_cpu}\n"
        if b.bootable_here:  # qemu TCG: an emulated CPU is far slower than the board's
            numba += "WatchdogSec=60s\n"
        (dropin / "board.conf").write_text(numba)
        etc = root / "etc/echoel"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "box.toml").write_text(box_toml(b))
        (root / "etc/hostname").write_text("echoel-box\n")
        (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\techoel-box\n"
                                        "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
        (root / "etc/fstab").write_text(
            "# / is mounted by the kernel (root= on its command line), read-only on boards "
            "that allow it;\n# /data and /boot/firmware are data.mount and "
            "boot-firmware.mount.\n"
            "tmpfs\t/tmp\ttmpfs\tmode=1777,nosuid,nodev,size=25%\t0\t0\n"
            "tmpfs\t/var/tmp\ttmpfs\tmode=1777,nosuid,nodev,size=10%\t0\t0\n"
            "# logind, timesyncd, rfkill, backlight keep state here (StateDirectory=): in RAM\n"
            "tmpfs\t/var/lib/systemd\ttmpfs\tmode=0755,nosuid,nodev,size=16M\t0\t0\n")
        (root / "boot/firmware").mkdir(parents=True, exist_ok=True)
        if b.modules:
            (root / "etc/modules-load.d/echoel.conf").write_text("\n".join(b.modules) + "\n")
        # RAUC: system.conf, backend, D-Bus and systemd files, the update CA
        rauc = IMAGE_DIR / "rauc"
        (root / "etc/rauc").mkdir(parents=True, exist_ok=True)
        (root / "etc/rauc/system.conf").write_text(system_conf(b))
        lib = root / "usr/lib/echoel/rauc"
        lib.mkdir(parents=True, exist_ok=True)
        for script in rauc.glob("backend-*.sh"):
            shutil.copy(script, lib / script.name)
            os.chmod(lib / script.name, 0o755)
        for name, dest in [("rauc.service", "etc/systemd/system"),
                           ("echoel-update-health.service", "etc/systemd/system"),
                           ("de.pengutronix.rauc.service", "usr/share/dbus-1/system-services"),
                           ("de.pengutronix.rauc.conf", "usr/share/dbus-1/system.d")]:
            if (rauc / name).exists():
                (root / dest).mkdir(parents=True, exist_ok=True)
                shutil.copy(rauc / name, root / dest / name)
        ca = self.update_ca or dev_update_ca(self.out.parent / "dev-update-ca", self.log)
        shutil.copy(ca, root / "etc/rauc/update-ca.pem")
        self.facts["update_ca"] = {"path": str(ca), "sha256": sha256_file(ca),
                                   "development": self.update_ca is None}
        # the data partition's skeleton (lives in rootfs/data until genimage)
        data = root / "data"
        for d in ("echoel/state", "echoel/cache/numba", "provisioning", "rauc/boot-state",
                  "ssh"):
            (data / d).mkdir(parents=True, exist_ok=True)
        for slot, state in (("A", "good"), ("B", "bad")):  # B is empty until an update
            (data / f"rauc/boot-state/state.{slot}").write_text(state + "\n")
        (data / "rauc/boot-state/primary").write_text("A\n")
        os.chmod(data / "ssh", 0o700)
        # enable: systemctl in the chroot (it only makes links)
        enable = ["echoel.service", "echoel-agent.service", "echoel-firstboot.service",
                  "data.mount", "boot-firmware.mount", "systemd-networkd.service",
                  "systemd-resolved.service", "ssh.service", "echoel-update-reboot.path"]
        if (units / "echoel-update-health.service").exists():
            enable.append("echoel-update-health.service")
        self._chroot("systemctl", "enable", *enable)
        self._chroot("systemctl", "disable", "systemd-networkd-wait-online.service",
                     check=False)
        self._chroot("ln", "-sf", "/run/systemd/resolve/stub-resolv.conf",
                     "/etc/.resolv.conf.image")

    def _warm_numba(self) -> None:
        """Run the engine on ALSA's null PCM once: numba compiles every kernel into the cache
        that ships on the data partition (same source paths, same NUMBA_CPU_NAME)."""
        b = self.board
        env = {"NUMBA_CACHE_DIR": "/data/echoel/cache/numba", "NUMBA_CPU_NAME": b.numba_cpu,
               "PYTHONUNBUFFERED": "1"}
        seconds = WARM_SECONDS if b.arch == HOST_ARCH else WARM_SECONDS_EMULATED
        r = self._chroot(f"{VENV}/bin/echoel", "run", "--config",
                         f"/{BUILD_DIR_IN_ROOT}/warm.toml", "--duration", str(seconds),
                         env=env, timeout=1800, check=False)
        cache = self.root / "data/echoel/cache/numba"
        n = sum(1 for _ in cache.rglob("*.nbi"))
        self.facts["numba_cache"] = {"index_files": n, "warm_exit": r.returncode,
                                     "cpu": b.numba_cpu}
        if n == 0:
            raise BuildError(f"warming numba's cache compiled nothing (echoel run exited "
                             f"{r.returncode}); see {self.log}")
        self._chroot("chown", "-R", "echoel:audio", "/data/echoel")
        self._chroot("rm", "-rf", "/tmp/echoel-warm")

    def _trim(self) -> None:
        b = self.board
        self._chroot("apt-get", "purge", "-y", "-q", *b.build_packages, timeout=900)
        self._chroot("apt-get", "autoremove", "--purge", "-y", "-q", timeout=900)
        self._chroot("apt-get", "clean")
        root = self.root
        for p in root.glob("etc/ssh/ssh_host_*"):
            p.unlink()
        (root / "etc/machine-id").write_text("")
        (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "root/.cache", ignore_errors=True)

    # -- boot partition
    def step_boot_files(self) -> None:
        b, root, boot = self.board, self.root, self.boot
        shutil.rmtree(boot, ignore_errors=True)
        boot.mkdir(parents=True)
        kernels = sorted(root.glob("boot/vmlinuz-*"))
        initrds = sorted(root.glob("boot/initrd.img-*"))
        if not kernels or not initrds:
            raise BuildError(f"no kernel or initrd in {root}/boot: the board's "
                             f"kernel_packages {b.packages} did not install one")
        files: list[str] = []
        if b.boot_files == "kernel":
            shutil.copy(kernels[-1], boot / "vmlinuz")
            shutil.copy(initrds[-1], boot / "initrd.img")
            for slot in ("A", "B"):
                (boot / f"cmdline-{slot.lower()}.txt").write_text(b.cmdline_for(slot) + "\n")
            files = ["vmlinuz", "initrd.img", "cmdline-a.txt", "cmdline-b.txt"]
        elif b.boot_files == "rpi":
            fw = root / "usr/lib/raspi-firmware"
            for f in sorted(fw.glob("*")) if fw.is_dir() else []:
                if f.is_file():
                    shutil.copy(f, boot / f.name)
                    files.append(f.name)
            dtbs = sorted((root / "usr/lib").glob("linux-image-*/broadcom/bcm27*.dtb"))
            for slot in ("A", "B"):
                d = boot / f"slot-{slot.lower()}"
                d.mkdir()
                (d / "cmdline.txt").write_text(b.cmdline_for(slot) + "\n")
                if slot == "A":  # B is filled by the first update
                    shutil.copy(kernels[-1], d / "vmlinuz")
                    shutil.copy(initrds[-1], d / "initrd.img")
                    for dtb in dtbs:
                        shutil.copy(dtb, d / dtb.name)
                files.append(d.name)
            (boot / "config.txt").write_text(
                "# Echoel Box: the firmware boots the committed slot's folder (os_prefix);\n"
                "# the RAUC backend rewrites the echoel-ab block.\n[all]\narm_64bit=1\n"
                "enable_uart=1\nupstream_kernel=1\nkernel=vmlinuz\n"
                "initramfs initrd.img followkernel\n"
                "# echoel-ab begin\n[all]\nos_prefix=slot-a/\n[tryboot]\nos_prefix=slot-a/\n"
                "[all]\n# echoel-ab end\n")
            files.append("config.txt")
        else:  # jetson: extlinux for L4T's UEFI; NVIDIA's flash tools write the boot chain
            d = boot / "extlinux"
            d.mkdir()
            shutil.copy(kernels[-1], boot / "vmlinuz")
            shutil.copy(initrds[-1], boot / "initrd.img")
            (d / "extlinux.conf").write_text(
                "TIMEOUT 30\nDEFAULT A\n"
                f"LABEL A\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {b.cmdline_for('A')}\n"
                f"LABEL B\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {b.cmdline_for('B')}\n")
            files = ["vmlinuz", "initrd.img", "extlinux"]
        self.facts["boot_files"] = files
        self.facts["bytes"]["boot"] = du_bytes(boot)

    # -- genimage
    def step_genimage(self) -> None:
        b = self.board
        for stale in self.out.glob("echoel-*.img*"):
            stale.unlink()
        cfg = self.out / "genimage.cfg"
        cfg.write_text(genimage_config(b, self.facts["boot_files"], self.epoch))
        tmp = self.out / "genimage-tmp"
        empty = self.out / "genimage-root"
        for d in (tmp, empty):
            shutil.rmtree(d, ignore_errors=True)
        empty.mkdir()
        _sh(["genimage", "--config", str(cfg), "--rootpath", str(empty), "--tmppath",
             str(tmp), "--inputpath", str(self.boot), "--outputpath", str(self.out)],
            "genimage", self.log, cwd=self.out)
        shutil.rmtree(tmp, ignore_errors=True)
        empty.rmdir()

    # -- outputs
    def step_outputs(self) -> None:
        b, out = self.board, self.out
        img = out / f"echoel-{b.name}.img"
        if not img.exists():
            raise BuildError(f"genimage made no {img.name}; see {self.log}")
        bmap = img.with_suffix(".bmap")
        _sh(["bmaptool", "create", "-o", str(bmap), str(img)], "bmaptool create", self.log)
        zst = img.with_name(img.name + ".zst")
        _sh(["zstd", "-q", "-f", "-T0", "-3", str(img), "-o", str(zst)],
            "zstd", self.log)
        names = [img.name, bmap.name, zst.name]
        self.facts["outputs"] = {n: (out / n).stat().st_size for n in names}
        self.facts["outputs"]["image_allocated"] = img.stat().st_blocks * 512
        doc = {
            "board": b.to_json(),
            "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source_date_epoch": self.epoch,
            "stack": {"wheel": next((out / "wheels").glob("echoel_box-*.whl")).name,
                      **git_commit(REPO)},
            "python_packages": self.facts["python_packages"],
            "models": self.facts["models"],
            "debian": {
                "suite": b.suite, "arch": b.arch,
                "reproducibility": (f"pinned: snapshot.debian.org {self.snapshot}"
                                    if self.snapshot else
                                    "live mirror deb.debian.org; every package version is "
                                    "recorded below (rebuild with --snapshot to pin)"),
                "packages": self.facts["debian_packages"]},
            "kernel": self.facts["kernel"],
            "update_ca": self.facts["update_ca"],
            "numba_cache": self.facts["numba_cache"],
            "layout": {str(n): {"name": v[0], "fs": v[1], "label": v[2]}
                       for n, v in LAYOUT.items()},
            "outputs": {n: {"bytes": (out / n).stat().st_size} for n in names},
        }
        write_manifest(out / "manifest.json", doc)
        write_sums(out, [*names, "manifest.json"])
        shutil.rmtree(out / "wheels", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: build one board's image, or list the boards."""
    ap = argparse.ArgumentParser(description="Build an Echoel Box image for one board.")
    ap.add_argument("--board", help="rpi4, rpi5, jetson or qemu-amd64")
    ap.add_argument("--out", default=str(REPO / "build" / "image"), help="output root")
    ap.add_argument("--snapshot", default="",
                    help="snapshot.debian.org timestamp (e.g. 20250520T000000Z) to pin the "
                         "Debian packages; default: the live mirror, versions recorded")
    ap.add_argument("--update-ca", help="PEM of the update signing CA (RAUC keyring); "
                                        "default: a development CA under build/image")
    ap.add_argument("--keep-rootfs", action="store_true", help="keep the unpacked trees")
    ap.add_argument("--list", action="store_true", help="print the board table")
    a = ap.parse_args(argv)
    try:
        boards = load_boards()
        if a.list or not a.board:
            for name, b in sorted(boards.items()):
                print(f"{name:12} {b.arch:6} boot={b.boot_files:7} rauc={b.rauc_compatible} "
                      f"{'boots in qemu here' if b.bootable_here else 'build only'}")
            return 0 if a.list else 2
        if a.board not in boards:
            raise RecipeError(f"board {a.board!r}: allowed: {', '.join(sorted(boards))}")
        report = ImageBuild(boards[a.board], Path(a.out), a.snapshot,
                            Path(a.update_ca) if a.update_ca else None,
                            keep_rootfs=a.keep_rootfs).run()
    except (BuildError, BaseError, RecipeError) as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in report.items()
                      if k not in ("python_packages", "debian_packages", "models")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
