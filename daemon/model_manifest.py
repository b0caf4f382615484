"""The manifest of an on-device model: what the .tflite file must be, checked before use.

A manifest is JSON (manifest.json beside model.tflite in the store). Its fields:
name, version, format ("tflite"), sha256 and size of the model file, signature (the LiteRT
signature key), inputs and outputs (name, shape with -1 for a dynamic axis, dtype),
sample_rate (Hz of the audio the model expects), licence, source_url, notes (free text), and
`signatures`: detached signatures for fleet signing (each {"key_id", "algorithm", "value"}),
computed over `canonical_bytes(manifest)`, which is the manifest without its `signatures` field
as compact JSON with sorted keys. Adding a signature therefore never changes what is signed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "tflite"
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
RESERVED_VERSIONS = ("active", "previous")


class ManifestError(ValueError):
    """A manifest is missing a field or has a value outside what is allowed."""

    def __init__(self, source: str, field_name: str, value: Any, expected: str) -> None:
        self.source, self.field, self.value, self.expected = source, field_name, value, expected
        super().__init__(f"{source}: field '{field_name}' is {value!r}; expected {expected}")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: its signature name, shape (-1 = dynamic) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def matches(self, shape: tuple[int, ...], dtype: str) -> bool:
        """True when a concrete or signature shape and dtype fit this spec."""
        if dtype != self.dtype or len(shape) != len(self.shape):
            return False
        return all(w == -1 or s == -1 or w == s for w, s in zip(self.shape, shape, strict=True))

    def describe(self) -> str:
        """`name [d0, d1, ...] dtype`, for messages."""
        return f"{self.name} {list(self.shape)} {self.dtype}"


@dataclass
class Manifest:
    """What a model artifact is: identity, integrity, interface, provenance."""

    name: str
    version: str
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    signature: str = "serving_default"
    sample_rate: int | None = None
    licence: str = ""
    source_url: str = ""
    notes: str = ""
    format: str = FORMAT
    signatures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tensor shapes as lists)."""
        d = asdict(self)
        for key in ("inputs", "outputs"):
            d[key] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                      for t in getattr(self, key)]
        return d

    def output(self, name: str) -> TensorSpec:
        """The output spec called `name`."""
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"model {self.name} {self.version} has no output '{name}' "
                       f"(outputs: {[t.name for t in self.outputs]})")


def canonical_bytes(manifest: Manifest | dict[str, Any]) -> bytes:
    """The bytes a detached signature covers: the manifest less `signatures`, sorted compact
    JSON in UTF-8."""
    d = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    d.pop("signatures", None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str,
          expected: str) -> Any:
    if key not in d:
        raise ManifestError(source, key, None, expected)
    v = d[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise ManifestError(source, key, v, expected)
    return v


def _tensors(d: dict[str, Any], key: str, source: str) -> list[TensorSpec]:
    raw = _need(d, key, list, source, "a non-empty list of {name, shape, dtype}")
    if not raw:
        raise ManifestError(source, key, raw, "a non-empty list of {name, shape, dtype}")
    out = []
    for i, t in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise ManifestError(source, where, t, "an object {name, shape, dtype}")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError(source, f"{where}.name", name, "a non-empty string")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1)
                           for s in shape)):
            raise ManifestError(source, f"{where}.shape", shape,
                                "a non-empty list of positive integers (-1 for a dynamic axis)")
        dtype = t.get("dtype")
        if dtype not in DTYPES:
            raise ManifestError(source, f"{where}.dtype", dtype, f"one of {', '.join(DTYPES)}")
        out.append(TensorSpec(name, tuple(shape), dtype))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ManifestError(source, key, names, "distinct tensor names")
    return out


def from_dict(d: Any, source: str = "manifest") -> Manifest:
    """A validated Manifest from parsed JSON; ManifestError names the bad field."""
    if not isinstance(d, dict):
        raise ManifestError(source, "(top level)", type(d).__name__, "a JSON object")
    name = _need(d, "name", str, source, "a lower-case name like basic-pitch")
    if not NAME_RE.match(name):
        raise ManifestError(source, "name", name,
                            "1-64 characters a-z 0-9 . _ - starting with a letter or digit")
    version = _need(d, "version", str, source, "a version string like 0.4.0")
    if not VERSION_RE.match(version) or version in RESERVED_VERSIONS:
        raise ManifestError(source, "version", version,
                            "1-64 characters 0-9 A-Z a-z . _ + - (not 'active' or 'previous')")
    fmt = d.get("format", FORMAT)
    if fmt != FORMAT:
        raise ManifestError(source, "format", fmt, f"'{FORMAT}'")
    sha = _need(d, "sha256", str, source, "64 lower-case hex digits")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ManifestError(source, "sha256", sha, "64 lower-case hex digits")
    size = _need(d, "size", int, source, "the file size in bytes, a positive integer")
    if size <= 0:
        raise ManifestError(source, "size", size, "a positive integer (bytes)")
    rate = d.get("sample_rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool)
                             or not 1000 <= rate <= 384000):
        raise ManifestError(source, "sample_rate", rate, "null or an integer 1000..384000 Hz")
    sigs = d.get("signatures", [])
    if not isinstance(sigs, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), str) for k in
                                        ("key_id", "algorithm", "value")) for s in sigs):
        raise ManifestError(source, "signatures", sigs,
                            "a list of {key_id, algorithm, value} strings")
    texts = {}
    for key in ("signature", "licence", "source_url", "notes"):
        v = d.get(key, "serving_default" if key == "signature" else "")
        if not isinstance(v, str):
            raise ManifestError(source, key, v, "a string")
        texts[key] = v
    known = {"name", "version", "format", "sha256", "size", "inputs", "outputs", "signature",
             "sample_rate", "licence", "source_url", "notes", "signatures"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(source, unknown[0], d[unknown[0]], f"only the fields {sorted(known)}")
    return Manifest(name=name, version=version, sha256=sha, size=size,
                    inputs=_tensors(d, "inputs", source), outputs=_tensors(d, "outputs", source),
                    sample_rate=rate, signatures=[dict(s) for s in sigs], **texts)


def load(path: str | Path) -> Manifest:
    """Read and validate a manifest file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(str(p), "(file)", "missing", "an existing manifest.json") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(str(p), "(json)", f"line {exc.lineno}: {exc.msg}",
                            "valid JSON") from None
    return from_dict(data, str(p))


def dump(manifest: Manifest, path: str | Path) -> None:
    """Write a manifest as indented JSON (not atomic: the store writes into a staging folder)."""
    Path(path).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n",
                          encoding="utf-8")
