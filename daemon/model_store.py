"""The on-device model store: install, verify, activate atomically, roll back.

Layout:
    STORE/NAME/VERSION/model.tflite
    STORE/NAME/VERSION/manifest.json
    STORE/NAME/active   -> VERSION   (symlink, swapped atomically with rename)
    STORE/NAME/previous -> VERSION   (the version active before the last switch)
    STORE/.staging/     (downloads and checks happen here; a version folder appears whole)
    STORE/.lock         (flock: one writer at a time)

A model is refused (ModelRefusedError, naming the file, the field, the value and what was expected)
unless its manifest is valid, its size and sha256 match, and LiteRT loads it with exactly the
manifest's tensors. A refused model never touches the active one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from echoel.daemon import model_manifest
from echoel.daemon.litert_runner import LiteRTRunner, ModelLoadError
from echoel.daemon.model_manifest import Manifest, ManifestError

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
ACTIVE = "active"
PREVIOUS = "previous"
MAX_DOWNLOAD = 512 * 1024 * 1024
URL_SCHEMES = ("http", "https", "file")


class ModelRefusedError(RuntimeError):
    """A model failed a check; the store is unchanged."""


@dataclass(frozen=True)
class InstalledModel:
    """One version in the store."""

    name: str
    version: str
    folder: Path
    manifest: Manifest
    active: bool = False

    @property
    def model_path(self) -> Path:
        """The .tflite file."""
        return self.folder / MODEL_FILE


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of re-checking one installed version."""

    name: str
    version: str
    active: bool
    ok: bool
    error: str = ""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model_file(path: Path, manifest: Manifest, load: bool = True) -> None:
    """Raise ModelRefusedError unless `path` is the file `manifest` describes (size, sha256, and,
    with load, the tensors LiteRT reports)."""
    who = f"{manifest.name} {manifest.version}"
    if not path.is_file():
        raise ModelRefusedError(f"{path}: model file missing (manifest of {who})")
    size = path.stat().st_size
    if size != manifest.size:
        raise ModelRefusedError(f"{path}: size is {size} bytes; the manifest of {who} expects "
                           f"{manifest.size} (truncated or a different file)")
    digest = sha256_file(path)
    if digest != manifest.sha256:
        raise ModelRefusedError(f"{path}: sha256 is {digest}; the manifest of {who} expects "
                           f"{manifest.sha256} (corrupted or a different file)")
    if load:
        try:
            LiteRTRunner(path, manifest, num_threads=1)
        except ModelLoadError as exc:
            raise ModelRefusedError(str(exc)) from None


def _fetch(source: str, dest: Path, limit: int = MAX_DOWNLOAD) -> None:
    """Copy a local path or http/https/file URL to dest, refusing more than limit bytes."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter
        if parsed.scheme not in URL_SCHEMES:
            raise ModelRefusedError(f"{source}: URL scheme '{parsed.scheme}' not allowed; allowed: "
                               f"{', '.join(URL_SCHEMES)}")
        try:
            with urllib.request.urlopen(source, timeout=30) as r, open(dest, "wb") as f:
                n = 0
                while chunk := r.read(1 << 20):
                    n += len(chunk)
                    if n > limit:
                        raise ModelRefusedError(f"{source}: larger than {limit} bytes, refused")
                    f.write(chunk)
        except OSError as exc:  # URLError is an OSError
            raise ModelRefusedError(f"{source}: cannot download ({exc})") from None
        return
    src = Path(source)
    if not src.is_file():
        raise ModelRefusedError(f"{src}: file missing")
    if src.stat().st_size > limit:
        raise ModelRefusedError(f"{src}: larger than {limit} bytes, refused")
    shutil.copyfile(src, dest)


def _sibling_manifest(source: str) -> str | None:
    """manifest next to a local model file: FILE.manifest.json, STEM.manifest.json or
    manifest.json in the same folder."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme != "file":
        return source + ".manifest.json"
    p = Path(parsed.path if parsed.scheme == "file" else source)
    for cand in (p.with_name(p.name + ".manifest.json"), p.with_suffix(".manifest.json"),
                 p.with_name(MANIFEST_FILE)):
        if cand.is_file():
            return str(cand)
    return None


class ModelStore:
    """Models on disk under one root folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Model names in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def _pointer(self, name: str, which: str) -> str | None:
        link = self.root / name / which
        if not link.is_symlink():
            return None
        return os.readlink(link)

    def active_version(self, name: str) -> str | None:
        """The active version of `name`, or None."""
        return self._pointer(name, ACTIVE)

    def previous_version(self, name: str) -> str | None:
        """The version active before the last switch, or None."""
        return self._pointer(name, PREVIOUS)

    def versions(self, name: str) -> list[str]:
        """Installed versions of `name`."""
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.is_symlink())

    def get(self, name: str, version: str) -> InstalledModel:
        """One installed version (its manifest validated, its file not re-hashed)."""
        folder = self.root / name / version
        if not folder.is_dir():
            have = self.versions(name)
            raise ModelRefusedError(f"{folder}: model {name} version {version} is not installed "
                               f"(installed: {', '.join(have) if have else 'none'})")
        try:
            m = model_manifest.load(folder / MANIFEST_FILE)
        except ManifestError as exc:
            raise ModelRefusedError(str(exc)) from None
        return InstalledModel(name, version, folder, m, self.active_version(name) == version)

    def active(self, name: str, verify: bool = True) -> InstalledModel:
        """The active version of `name`; with verify, its size and sha256 are checked again."""
        v = self.active_version(name)
        if v is None:
            raise ModelRefusedError(f"{self.root / name}: no active version of model {name} "
                               f"(install one: echoel models install FILE --manifest M)")
        m = self.get(name, v)
        if verify:
            check_model_file(m.model_path, m.manifest, load=False)
        return m

    def list(self) -> list[InstalledModel]:
        """Every installed version, active ones flagged."""
        out = []
        for name in self.names():
            for v in self.versions(name):
                try:
                    out.append(self.get(name, v))
                except ModelRefusedError:
                    folder = self.root / name / v
                    out.append(InstalledModel(name, v, folder, _broken_manifest(name, v),
                                              self.active_version(name) == v))
        return out

    # ---------------------------------------------------------------- writing
    def install(self, source: str | Path, manifest: str | Path | Manifest | None = None,
                activate: bool = False) -> InstalledModel:
        """Install a model from a file or URL with its manifest (path, URL or object).

        Idempotent: the same version with the same sha256 is left as is. The same version with
        different content is refused (bump the version).
        """
        source = str(source)
        if manifest is None:
            manifest = _sibling_manifest(source)
            if manifest is None:
                raise ModelRefusedError(f"{source}: no manifest given and none beside it "
                                   f"(pass --manifest M)")
        with self._locked():
            staging = self.root / ".staging"
            staging.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=staging))
            try:
                if isinstance(manifest, Manifest):
                    m = manifest
                else:
                    _fetch(str(manifest), tmp / MANIFEST_FILE, 1 << 20)
                    try:
                        m = model_manifest.load(tmp / MANIFEST_FILE)
                    except ManifestError as exc:
                        raise ModelRefusedError(f"{exc} (manifest from {manifest})") from None
                _fetch(source, tmp / MODEL_FILE, min(MAX_DOWNLOAD, m.size + 1))
                check_model_file(tmp / MODEL_FILE, m, load=True)
                model_manifest.dump(m, tmp / MANIFEST_FILE)
                for f in (MODEL_FILE, MANIFEST_FILE):
                    _fsync_file(tmp / f)
                target = self.root / m.name / m.version
                if target.exists():
                    old = self.get(m.name, m.version)
                    if old.manifest.sha256 != m.sha256:
                        raise ModelRefusedError(
                            f"{target}: version {m.version} of {m.name} is installed with "
                            f"sha256 {old.manifest.sha256}; the new file has {m.sha256}: "
                            f"give the new model another version")
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _fsync_dir(tmp)
                    os.rename(tmp, target)
                    _fsync_dir(target.parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if activate:
                self._activate_locked(m.name, m.version)
        return self.get(m.name, m.version)

    def activate(self, name: str, version: str) -> InstalledModel:
        """Make `version` the active one after checking it again; the old one is kept as
        previous."""
        with self._locked():
            self._activate_locked(name, version)
        return self.get(name, version)

    def rollback(self, name: str) -> InstalledModel:
        """Make the previous version active again (the current one becomes previous)."""
        with self._locked():
            prev = self.previous_version(name)
            if prev is None:
                raise ModelRefusedError(f"{self.root / name}: model {name} has no previous version "
                                   f"to roll back to")
            self._activate_locked(name, prev)
        return self.get(name, prev)

    def _activate_locked(self, name: str, version: str) -> None:
        m = self.get(name, version)
        check_model_file(m.model_path, m.manifest, load=True)
        if m.manifest.name != name or m.manifest.version != version:
            raise ModelRefusedError(f"{m.folder / MANIFEST_FILE}: says {m.manifest.name} "
                               f"{m.manifest.version}; it is stored as {name} {version}")
        cur = self.active_version(name)
        if cur == version:
            return
        if cur is not None:
            _swap_link(self.root / name, PREVIOUS, cur)
        _swap_link(self.root / name, ACTIVE, version)

    def verify(self) -> list[VerifyResult]:
        """Check every installed version again (manifest, size, sha256, tensors)."""
        out = []
        for name in self.names():
            act = self.active_version(name)
            if act is not None and not (self.root / name / act).is_dir():
                out.append(VerifyResult(name, act, True, False,
                                        f"{self.root / name / ACTIVE} points to {act}, "
                                        f"which is not installed"))
            for v in self.versions(name):
                try:
                    m = self.get(name, v)
                    check_model_file(m.model_path, m.manifest, load=True)
                    out.append(VerifyResult(name, v, act == v, True))
                except ModelRefusedError as exc:
                    out.append(VerifyResult(name, v, act == v, False, str(exc)))
        return out


def _broken_manifest(name: str, version: str) -> Manifest:
    from echoel.daemon.model_manifest import TensorSpec

    t = [TensorSpec("?", (1,), "float32")]
    return Manifest(name=name, version=version, sha256="0" * 64, size=1, inputs=t, outputs=t,
                    notes="manifest unreadable: run `echoel models verify`")


def _swap_link(folder: Path, link: str, target: str) -> None:
    """Point folder/link at target atomically (a new symlink renamed over the old one)."""
    tmp = folder / f".{link}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, folder / link)
    _fsync_dir(folder)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
