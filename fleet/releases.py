"""Releases the fleet can roll out: name, artifact kind, where the boxes download it, its size
and SHA-256, and which running software it installs over.

Stored in the fleet store (SQLite or PostgreSQL, same SQL) beside the devices; the table is made
on first use. A release is immutable once recorded: boxes verify the SHA-256 they were sent, so
a name always means the same bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from echoel.fleet.store import FleetStore

ARTIFACTS = ("system", "models", "config")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# what a file's name says about its kind when --kind is not given
SUFFIX_KIND = {".raucb": "system", ".swu": "system", ".bundle": "system", ".img": "system",
               ".tflite": "models", ".onnx": "models", ".model": "models", ".toml": "config"}

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS releases (name TEXT PRIMARY KEY, artifact TEXT NOT NULL,
        url TEXT NOT NULL, size BIGINT NOT NULL, sha256 TEXT NOT NULL, compatible TEXT NOT NULL,
        notes TEXT NOT NULL DEFAULT '', created DOUBLE PRECISION NOT NULL)""",
]


class ReleaseError(ValueError):
    """A release that cannot be recorded or found; the message says which value and why."""


@dataclass(frozen=True)
class Release:
    """One release: what the `update` command carries, plus what it may install over."""

    name: str
    artifact: str
    url: str
    size: int
    sha256: str
    compatible: tuple[str, ...] = ()  # glob patterns of running software; empty: any
    notes: str = ""
    created: float = field(default_factory=time.time)

    def installs_over(self, software: str | None) -> bool:
        """Whether a box running `software` may take this release."""
        if not self.compatible:
            return True
        return software is not None and any(fnmatch.fnmatchcase(software, p)
                                            for p in self.compatible)

    def command_args(self, reboot: str) -> dict:
        """The `update` command's args (the agreed protocol)."""
        return {"release": self.name, "artifact": self.artifact, "url": self.url,
                "size": self.size, "sha256": self.sha256, "reboot": reboot}


def ensure_tables(store: FleetStore) -> None:
    """Create the releases table if it is not there."""
    with store.tx() as cur:
        for stmt in SCHEMA:
            cur.execute(stmt)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def check(rel: Release) -> Release:
    """The release if every field is usable, else ReleaseError naming the first bad one."""
    if not NAME_RE.match(rel.name):
        raise ReleaseError(f"release name {rel.name!r}: use 1-64 letters, digits, '.', '_', "
                           "'+' or '-', starting with a letter or digit (e.g. 2026.11.2)")
    if rel.artifact not in ARTIFACTS:
        raise ReleaseError(f"artifact {rel.artifact!r}: allowed: {', '.join(ARTIFACTS)}")
    if not rel.url.startswith("https://") or len(rel.url) <= len("https://"):
        raise ReleaseError(f"url {rel.url!r}: boxes download over https only "
                           "(https://host/path)")
    if isinstance(rel.size, bool) or not isinstance(rel.size, int) or rel.size <= 0:
        raise ReleaseError(f"size {rel.size!r}: must be a positive number of bytes")
    if not SHA_RE.match(rel.sha256):
        raise ReleaseError(f"sha256 {rel.sha256!r}: must be 64 lowercase hex digits")
    for p in rel.compatible:
        if not p or len(p) > 64:
            raise ReleaseError(f"compatible pattern {p!r}: 1-64 characters (e.g. 2026.10.*)")
    return rel


def from_artifact(artifact: str, *, name: str | None = None, kind: str | None = None,
                  url: str | None = None, sha256: str | None = None, size: int | None = None,
                  compatible: tuple[str, ...] = (), notes: str = "") -> Release:
    """A release from a local file (size and SHA-256 measured; `url` says where boxes fetch
    it) or from a URL (then `sha256` and `size` are required)."""
    if artifact.startswith(("https://", "http://")):
        if sha256 is None or size is None:
            raise ReleaseError(f"{artifact}: a release given by URL needs --sha256 and --size "
                               "(the boxes verify both)")
        url = url or artifact
        stem = artifact.rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(artifact)
        if not path.is_file():
            raise ReleaseError(f"{artifact}: no such file (give a bundle, a signed model or "
                               "config file, or an https:// URL with --sha256 and --size)")
        if url is None:
            raise ReleaseError(f"{artifact}: say where the boxes download it: --url https://...")
        measured_size, measured_sha = file_digest(path)
        if sha256 is not None and sha256.lower() != measured_sha:
            raise ReleaseError(f"{artifact}: --sha256 {sha256} does not match the file's "
                               f"{measured_sha}")
        if size is not None and size != measured_size:
            raise ReleaseError(f"{artifact}: --size {size} does not match the file's "
                               f"{measured_size} bytes")
        size, sha256 = measured_size, measured_sha
        stem = path.name
    if kind is None:
        suffix = "." + stem.rsplit(".", 1)[-1] if "." in stem else ""
        kind = SUFFIX_KIND.get(suffix.lower())
        if kind is None:
            what = suffix or "a name without suffix"
            raise ReleaseError(f"{artifact}: cannot tell the artifact kind from {what}: give "
                               f"--kind {'|'.join(ARTIFACTS)}")
    if name is None:
        name = stem.rsplit(".", 1)[0] if "." in stem else stem
    return check(Release(name, kind, url, int(size), sha256.lower(), tuple(compatible), notes))


def add(store: FleetStore, rel: Release) -> Release:
    """Record a release; ReleaseError if the name is taken by different bytes."""
    check(rel)
    ensure_tables(store)
    old = get(store, rel.name)
    if old is not None:
        if (old.artifact, old.url, old.size, old.sha256) == (rel.artifact, rel.url, rel.size,
                                                             rel.sha256):
            return old
        raise ReleaseError(f"release {rel.name!r} is already recorded with other content "
                           f"({old.artifact}, sha256 {old.sha256[:12]}..., {old.size} bytes): "
                           "a release name always means the same bytes; pick a new name")
    with store.tx() as cur:
        cur.execute("INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (rel.name, rel.artifact, rel.url, rel.size, rel.sha256,
                     json.dumps(list(rel.compatible)), rel.notes, rel.created))
    return rel


def _row(r: tuple) -> Release:
    return Release(r[0], r[1], r[2], int(r[3]), r[4], tuple(json.loads(r[5])), r[6], float(r[7]))


def get(store: FleetStore, name: str) -> Release | None:
    """A recorded release, or None."""
    ensure_tables(store)
    with store.tx() as cur:
        r = cur.execute("SELECT name, artifact, url, size, sha256, compatible, notes, created "
                        "FROM releases WHERE name = ?", (name,)).fetchone()
    return _row(r) if r else None


def require(store: FleetStore, name: str) -> Release:
    """A recorded release, or ReleaseError listing the newest ones."""
    rel = get(store, name)
    if rel is None:
        known = [r.name for r in list_all(store)[:8]]
        raise ReleaseError(f"no release {name!r}; recorded: {', '.join(known) or 'none'} "
                           "(`echoel fleet release add` records one)")
    return rel


def list_all(store: FleetStore) -> list[Release]:
    """Every release, newest first."""
    ensure_tables(store)
    with store.tx() as cur:
        rows = cur.execute("SELECT name, artifact, url, size, sha256, compatible, notes, "
                           "created FROM releases ORDER BY created DESC").fetchall()
    return [_row(r) for r in rows]
