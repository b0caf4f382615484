"""The LiteRT interpreter behind one model: load, check against the manifest, run.

LiteRT (`ai_edge_litert`) is used when installed, `tflite_runtime` otherwise (frozen since 2023,
needs numpy < 2). A runner is NOT thread-safe: give each inference thread its own runner
(loading the basic-pitch model takes a few ms).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from echoel.daemon.model_manifest import Manifest, TensorSpec

BACKENDS = ("ai_edge_litert", "tflite_runtime")


class ModelLoadError(RuntimeError):
    """The model file cannot be loaded or does not fit its manifest."""


def interpreter_class(prefer: str | None = None) -> tuple[type, str]:
    """(Interpreter class, backend name): LiteRT first, tflite_runtime as fallback."""
    order = [prefer] if prefer else list(BACKENDS)
    errors = []
    for name in order:
        if name not in BACKENDS:
            raise ModelLoadError(f"backend {name!r} unknown; allowed: {', '.join(BACKENDS)}")
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert.interpreter import Interpreter
            else:
                from tflite_runtime.interpreter import Interpreter
            return Interpreter, name
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ModelLoadError("no TFLite interpreter: install ai-edge-litert (pip install "
                         "ai-edge-litert) or tflite-runtime; " + "; ".join(errors))


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the interpreter reports it."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        """`name [d0, d1, ...] dtype`, for messages."""
        return f"{self.name} {list(self.shape)} {self.dtype}"


def _infos(details: Mapping[str, dict[str, Any]]) -> dict[str, TensorInfo]:
    out = {}
    for name, d in details.items():
        sig = d.get("shape_signature")
        shape = tuple(int(s) for s in (sig if sig is not None and len(sig) else d["shape"]))
        out[name] = TensorInfo(name, int(d["index"]), shape, np.dtype(d["dtype"]).name)
    return out


def check_tensors(path: str | Path, manifest: Manifest, inputs: Mapping[str, TensorInfo],
                  outputs: Mapping[str, TensorInfo]) -> None:
    """Raise ModelLoadError unless the model's tensors are those the manifest names."""
    for kind, specs, have in (("input", manifest.inputs, inputs),
                              ("output", manifest.outputs, outputs)):
        want_names = sorted(t.name for t in specs)
        if sorted(have) != want_names:
            raise ModelLoadError(
                f"{path}: {kind}s are {sorted(have)}; the manifest of {manifest.name} "
                f"{manifest.version} expects {want_names}")
        for spec in specs:
            got = have[spec.name]
            if not spec.matches(got.shape, got.dtype):
                raise ModelLoadError(
                    f"{path}: {kind} '{spec.name}' is {list(got.shape)} {got.dtype}; the "
                    f"manifest of {manifest.name} {manifest.version} expects "
                    f"{list(spec.shape)} {spec.dtype}")


class LiteRTRunner:
    """One interpreter on one model file, checked at load against `manifest` when given."""

    def __init__(self, path: str | Path, manifest: Manifest | None = None, num_threads: int = 1,
                 backend: str | None = None, signature: str | None = None) -> None:
        self.path = Path(path)
        if not isinstance(num_threads, int) or not 1 <= num_threads <= 64:
            raise ModelLoadError(f"num_threads is {num_threads!r}; allowed: an integer 1..64")
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: model file missing")
        cls, self.backend = interpreter_class(backend)
        self.num_threads = num_threads
        try:
            self._it = cls(model_path=str(self.path), num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{self.path}: not a loadable TFLite model ({exc}); "
                                 f"re-install it from a known source") from None
        sigs = self._it.get_signature_list()
        key = signature or (manifest.signature if manifest else None) or next(iter(sigs), None)
        if key not in sigs:
            raise ModelLoadError(f"{self.path}: signature {key!r} not in the model "
                                 f"(it has {sorted(sigs)})")
        self.signature = key
        self._it.allocate_tensors()
        runner = self._it.get_signature_runner(key)
        self.inputs = _infos(runner.get_input_details())
        self.outputs = _infos(runner.get_output_details())
        del runner
        self.declared_inputs = dict(self.inputs)  # as the model declares them (-1 = dynamic)
        if manifest is not None:
            check_tensors(self.path, manifest, self.inputs, self.outputs)
        # concrete shapes after allocation (batch 1)
        for name, info in list(self.inputs.items()):
            shape = tuple(int(s) for s in self._it.get_tensor(info.index).shape)
            self.inputs[name] = TensorInfo(name, info.index, shape, info.dtype)

    def input_shape(self, name: str | None = None) -> tuple[int, ...]:
        """Concrete shape of an input (the only one when name is None)."""
        info = self.inputs[name] if name else next(iter(self.inputs.values()))
        return info.shape

    def run(self, *args: np.ndarray, **named: np.ndarray) -> dict[str, np.ndarray]:
        """Run once; inputs by name (or the single input positionally). Returns copies."""
        if args:
            if len(args) != 1 or len(self.inputs) != 1 or named:
                raise TypeError("pass the single input positionally, or all inputs by name")
            named = {next(iter(self.inputs)): args[0]}
        for name, info in self.inputs.items():
            if name not in named:
                raise TypeError(f"input '{name}' missing (inputs: {sorted(self.inputs)})")
            x = named[name]
            if tuple(x.shape) != info.shape or x.dtype.name != info.dtype:
                raise ValueError(f"input '{name}' is {list(x.shape)} {x.dtype.name}; the model "
                                 f"takes {list(info.shape)} {info.dtype}")
            self._it.set_tensor(info.index, x)
        self._it.invoke()
        return {name: self._it.get_tensor(info.index) for name, info in self.outputs.items()}


def describe(path: str | Path, backend: str | None = None) -> dict[str, list[TensorSpec]]:
    """The model's signature tensors as manifest specs (for writing a manifest)."""
    r = LiteRTRunner(path, None, 1, backend)
    return {"inputs": [TensorSpec(t.name, t.shape, t.dtype)
                       for t in r.declared_inputs.values()],
            "outputs": [TensorSpec(t.name, t.shape, t.dtype) for t in r.outputs.values()]}

