"""Fetch basic-pitch's model (Spotify, Apache-2.0) from its PyPI wheel into the model store.

    python -m echoel.daemon.model_fetch --store DIR [--cache DIR] [--no-activate]

The basic-pitch 0.4.0 wheel carries basic_pitch/saved_models/icassp_2022/nmp.tflite. The wheel
comes from `pip download --no-deps basic-pitch==0.4.0` (PyPI's JSON API when pip is missing),
is kept in the cache folder (reused offline) and checked by sha256, as is the model read out
of it. Running it again changes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from echoel.daemon.model_manifest import Manifest, TensorSpec
from echoel.daemon.model_store import InstalledModel, ModelRefusedError, ModelStore


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned PyPI wheel."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int


BASIC_PITCH = WheelModel(
    package="basic-pitch",
    version="0.4.0",
    wheel="basic_pitch-0.4.0-py2.py3-none-any.whl",
    wheel_sha256="738adb503aae7fdfc7d1e1511aa0ce35052315f260a19531ef4c356708425db0",
    member="basic_pitch/saved_models/icassp_2022/nmp.tflite",
    sha256="3db297d54af8e01c6e5618245c956b1d71b6a2b978cb2dedb527173186552676",
    size=204448,
)
MODEL_NAME = "basic-pitch"
PYPI_JSON = "https://pypi.org/pypi/{package}/{version}/json"


def default_cache() -> Path:
    """build/wheels in a source checkout, else ~/.cache/echoel/wheels."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "wheels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "echoel" / "wheels"


def basic_pitch_manifest(spec: WheelModel = BASIC_PITCH) -> Manifest:
    """The manifest of basic-pitch's nmp.tflite (tensors as LiteRT reports them)."""
    return Manifest(
        name=MODEL_NAME, version=spec.version, sha256=spec.sha256, size=spec.size,
        inputs=[TensorSpec("input_2", (-1, 43844, 1), "float32")],
        outputs=[TensorSpec("contour", (-1, 172, 264), "float32"),
                 TensorSpec("note", (-1, 172, 88), "float32"),
                 TensorSpec("onset", (-1, 172, 88), "float32")],
        signature="serving_default", sample_rate=22050, licence="Apache-2.0 (Spotify AB)",
        source_url=f"https://pypi.org/project/{spec.package}/{spec.version}/ "
                   f"({spec.wheel}!{spec.member})",
        notes="2 s windows (43844 samples at 22050 Hz), 172 frames each at 22050/256 Hz; "
              "note/onset bin = MIDI - 21; contour 3 bins per semitone")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_with_pip(spec: WheelModel, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), f"{spec.package}=={spec.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise ModelRefusedError(f"pip download {spec.package}=={spec.version} failed "
                           f"({r.returncode}): {r.stderr.strip()[-400:]}")


def _download_with_json_api(spec: WheelModel, dest: Path) -> None:
    url = PYPI_JSON.format(package=spec.package, version=spec.version)
    with urllib.request.urlopen(url, timeout=30) as r:
        info = json.load(r)
    for f in info.get("urls", []):
        if f.get("filename") == spec.wheel:
            with urllib.request.urlopen(f["url"], timeout=120) as r:
                (dest / spec.wheel).write_bytes(r.read())
            return
    raise ModelRefusedError(f"{url}: no file {spec.wheel} listed")


def fetch_wheel(cache: Path, spec: WheelModel = BASIC_PITCH) -> Path:
    """The pinned wheel in `cache` (downloaded when missing), sha256 checked."""
    wheel = cache / spec.wheel
    if wheel.is_file() and _sha256(wheel) == spec.wheel_sha256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as td:
        errors = []
        for how in (_download_with_pip, _download_with_json_api):
            try:
                how(spec, Path(td))
                break
            except (ModelRefusedError, OSError, ValueError) as exc:
                errors.append(f"{how.__name__}: {exc}")
        got = Path(td) / spec.wheel
        if not got.is_file():
            raise ModelRefusedError(f"cannot fetch {spec.wheel} (offline? put it in {cache}): "
                               + "; ".join(errors))
        digest = _sha256(got)
        if digest != spec.wheel_sha256:
            raise ModelRefusedError(f"{got}: sha256 is {digest}; expected {spec.wheel_sha256} "
                               f"for {spec.wheel}")
        os.replace(got, wheel)
    return wheel


def extract_model(wheel: Path, dest: Path, spec: WheelModel = BASIC_PITCH) -> Path:
    """Write the model member of the wheel to dest, sha256 checked."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(spec.member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelRefusedError(f"{wheel}: cannot read {spec.member} ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise ModelRefusedError(f"{wheel}!{spec.member}: sha256 is {digest}; "
                                f"expected {spec.sha256}")
    dest.write_bytes(data)
    return dest


def fetch_into_store(store: str | Path, cache: str | Path | None = None,
                     activate: bool = True) -> InstalledModel:
    """basic-pitch's model installed in the store; with activate, made active when no
    version of it is (a version chosen by hand or by rollback is left alone)."""
    st = ModelStore(store)
    wheel = fetch_wheel(Path(cache) if cache else default_cache())
    with tempfile.TemporaryDirectory() as td:
        model = extract_model(wheel, Path(td) / "nmp.tflite")
        return st.install(model, basic_pitch_manifest(),
                          activate=activate and st.active_version(MODEL_NAME) is None)


def main(argv: list[str] | None = None) -> int:
    """Command line: fetch basic-pitch's model into a store."""
    ap = argparse.ArgumentParser(prog="python -m echoel.daemon.model_fetch",
                                 description="fetch basic-pitch's nmp.tflite into a model store")
    ap.add_argument("--store", required=True, help="model store folder")
    ap.add_argument("--cache", help=f"wheel cache folder (default {default_cache()})")
    ap.add_argument("--no-activate", action="store_true", help="install without activating")
    args = ap.parse_args(argv)
    try:
        m = fetch_into_store(args.store, args.cache, activate=not args.no_activate)
    except ModelRefusedError as exc:
        print(f"model_fetch: {exc}", file=sys.stderr)
        return 1
    print(f"{m.name} {m.version}: {m.model_path} sha256 {m.manifest.sha256}"
          + (" (active)" if m.active else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
