"""The image's manifest: what is in it (an SBOM) and the checksums of the outputs.

manifest.json holds the board, the stack's version and git commit, every Python package of the
venv, the models (name, version, sha256), every Debian package (name, version, architecture,
source) and how reproducible the package set is (a snapshot.debian.org timestamp, or the live
mirror with the versions recorded here). SHA256SUMS lists the output files.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from echoel.daemon.model_store import sha256_file

SCHEMA = 1
DPKG_FORMAT = "${Package}\t${Version}\t${Architecture}\t${source:Package}\t${db:Status-Abbrev}\n"


def debian_packages(root: Path) -> list[dict[str, str]]:
    """Every installed Debian package of a root tree (dpkg-query --admindir)."""
    out = subprocess.run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W",
                          f"-f={DPKG_FORMAT}"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    rows = []
    for line in out.splitlines():
        name, version, arch, source, status = (line.split("\t") + [""] * 5)[:5]
        if status.startswith("ii"):
            rows.append({"name": name, "version": version, "arch": arch,
                         "source": source or name})
    return sorted(rows, key=lambda r: r["name"])


def python_packages(freeze: str) -> list[dict[str, str]]:
    """`pip freeze` lines as name/version rows."""
    rows = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line:
            name, version = line.split(" @ ", 1)
        else:
            name, version = line, ""
        rows.append({"name": name, "version": version})
    return sorted(rows, key=lambda r: r["name"].lower())


def models(store: Path) -> list[dict[str, Any]]:
    """The models in a model store folder: name, active version, file sha256 and size."""
    rows = []
    for folder in sorted(p for p in store.iterdir() if p.is_dir()) if store.is_dir() else []:
        active = folder / "active"
        if not active.is_symlink():
            continue
        version = os.readlink(active)
        for f in sorted((folder / version).iterdir()):
            if f.name == "manifest.json":
                continue
            rows.append({"name": folder.name, "version": version, "file": f.name,
                         "sha256": sha256_file(f), "bytes": f.stat().st_size})
    return rows


def git_commit(repo: Path) -> dict[str, Any]:
    """The source checkout's commit and whether it had local changes."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                           timeout=60, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def write_manifest(path: Path, doc: dict[str, Any]) -> Path:
    """Write manifest.json (sorted keys, stable), atomically."""
    doc = {"schema": SCHEMA, **doc}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_sums(folder: Path, names: list[str]) -> Path:
    """SHA256SUMS for the named files of folder (sha256sum -c compatible)."""
    lines = [f"{sha256_file(folder / n)}  {n}\n" for n in names]
    out = folder / "SHA256SUMS"
    out.write_text("".join(lines))
    return out
