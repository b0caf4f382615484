"""The image recipe's board table (image/boards.toml), read and checked.

A board is everything that differs between images: Debian architecture, kernel packages, the
genimage layout, how the boot partition is filled, RAUC's compatible and bootloader backend,
the kernel command line and the engine's default device.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_DIR = Path(__file__).resolve().parent
BOARDS_FILE = IMAGE_DIR / "boards.toml"
BOARDS = ("rpi4", "rpi5", "jetson", "qemu-amd64")
ARCHES = ("amd64", "arm64")
BOOT_FILES = ("kernel", "rpi", "jetson")
BOARD_KEYS = {
    "arch": str, "kernel_packages": list, "packages": list, "genimage": str,
    "boot_files": str, "rauc_compatible": str, "rauc_backend": str, "cmdline": str,
    "root_a": str, "root_b": str, "numba_cpu": str, "engine_device": str,
    "engine_format": str, "modules": list, "read_only_root": bool, "bootable_here": bool,
}
OPTIONAL_KEYS = {"components": list, "engine_period": int}
# The agreed disk layout (provisioning/image_layout.py reads the same): MBR, 4 MiB alignment.
LAYOUT = {1: ("boot", "vfat", "ECHOEL-BOOT"), 2: ("rootfs-a", "ext4", "echoel-a"),
          3: ("rootfs-b", "ext4", "echoel-b"), 4: ("data", "ext4", "echoel-data")}


class RecipeError(ValueError):
    """The board table is wrong: the message names the board, the key and what is allowed."""


@dataclass(frozen=True)
class Board:
    """One board of the table, with the common settings merged in."""

    name: str
    arch: str
    suite: str
    variant: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    build_packages: tuple[str, ...]
    genimage: str
    boot_files: str
    rauc_compatible: str
    rauc_backend: str
    cmdline: str
    root_a: str
    root_b: str
    numba_cpu: str
    engine_device: str
    engine_format: str
    modules: tuple[str, ...]
    read_only_root: bool
    bootable_here: bool
    engine_period: int = 128

    def cmdline_for(self, slot: str) -> str:
        """The kernel command line booting slot "A" or "B"."""
        if slot not in ("A", "B"):
            raise RecipeError(f"slot {slot!r}: allowed: A, B")
        root = self.root_a if slot == "A" else self.root_b
        return self.cmdline.replace("@ROOT@", root).replace("@SLOT@", slot)

    def base_key(self) -> str:
        """Hash of everything the mmdebstrap tarball depends on (its cache key)."""
        spec = {"arch": self.arch, "suite": self.suite, "variant": self.variant,
                "components": sorted(self.components),
                "packages": sorted({*self.packages, *self.build_packages})}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        """The board as a JSON-ready dict (for the manifest)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_boards(path: str | Path = BOARDS_FILE) -> dict[str, Board]:
    """Every board of the table, checked: all keys present with the right types."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the board table: {exc}") from None
    common = raw.get("common", {})
    for key in ("suite", "variant", "packages", "build_packages"):
        if key not in common:
            raise RecipeError(f"{path}: [common] has no {key!r}")
    boards = {}
    for name, b in raw.get("boards", {}).items():
        for key, typ in BOARD_KEYS.items():
            if key not in b:
                raise RecipeError(f"{path}: board {name!r} has no {key!r}")
            if not isinstance(b[key], typ):
                raise RecipeError(f"{path}: board {name!r} key {key!r} = {b[key]!r}: must be "
                                  f"a {typ.__name__}")
        for key, typ in OPTIONAL_KEYS.items():
            if key in b and not isinstance(b[key], typ):
                raise RecipeError(f"{path}: board {name!r} key {key!r} = {b[key]!r}: must be "
                                  f"a {typ.__name__}")
        extra = set(b) - set(BOARD_KEYS) - set(OPTIONAL_KEYS)
        if extra:
            raise RecipeError(f"{path}: board {name!r}: unknown keys {sorted(extra)}; allowed: "
                              f"{sorted({*BOARD_KEYS, *OPTIONAL_KEYS})}")
        if b["arch"] not in ARCHES:
            raise RecipeError(f"{path}: board {name!r} arch {b['arch']!r}: allowed: {ARCHES}")
        if b["boot_files"] not in BOOT_FILES:
            raise RecipeError(f"{path}: board {name!r} boot_files {b['boot_files']!r}: "
                              f"allowed: {BOOT_FILES}")
        if "@ROOT@" not in b["cmdline"]:
            raise RecipeError(f"{path}: board {name!r} cmdline has no @ROOT@ placeholder")
        boards[name] = Board(
            name=name, arch=b["arch"], suite=common["suite"], variant=common["variant"],
            components=tuple(b.get("components", ["main"])),
            packages=tuple(common["packages"] + b["kernel_packages"] + b["packages"]),
            build_packages=tuple(common["build_packages"]), genimage=b["genimage"],
            boot_files=b["boot_files"], rauc_compatible=b["rauc_compatible"],
            rauc_backend=b["rauc_backend"], cmdline=b["cmdline"], root_a=b["root_a"],
            root_b=b["root_b"], numba_cpu=b["numba_cpu"], engine_device=b["engine_device"],
            engine_format=b["engine_format"], modules=tuple(b["modules"]),
            read_only_root=b["read_only_root"], bootable_here=b["bootable_here"],
            engine_period=b.get("engine_period", 128))
    missing = set(BOARDS) - set(boards)
    if missing:
        raise RecipeError(f"{path}: boards missing from the table: {sorted(missing)}")
    return boards


def board(name: str) -> Board:
    """One board by name; RecipeError naming the boards allowed."""
    boards = load_boards()
    if name not in boards:
        raise RecipeError(f"board {name!r}: allowed: {', '.join(sorted(boards))}")
    return boards[name]
