"""Model store, fetch and `echoel models`: real basic-pitch model, real LiteRT, real files.

The wheel comes from PyPI once (pip download) and is reused from build/wheels afterwards.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from echoel.daemon import model_fetch, model_manifest, models_cli
from echoel.daemon.litert_runner import LiteRTRunner, ModelLoadError
from echoel.daemon.model_manifest import Manifest, ManifestError, TensorSpec
from echoel.daemon.model_store import ModelRefusedError, ModelStore, sha256_file


def tiny_tflite(in_shape: tuple[int, ...] = (1, 16), units: int = 4,
                out_name: str = "note") -> bytes:
    """A FULLY_CONNECTED + LOGISTIC model with a serving_default signature (input_2 ->
    out_name), built with LiteRT's flatbuffer object API (no tensorflow)."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools.flatbuffer_utils import convert_object_to_bytearray

    rng = np.random.default_rng(1)
    w = rng.standard_normal((units, in_shape[-1])).astype(np.float32)

    def tensor(name, shape, buf):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), s.TensorType.FLOAT32, buf
        return t

    model = s.ModelT()
    model.version = 3
    empty = s.BufferT()
    wbuf = s.BufferT()
    wbuf.data = np.frombuffer(w.tobytes(), np.uint8)
    model.buffers = [empty, wbuf]
    codes = []
    for op in (s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.LOGISTIC):
        c = s.OperatorCodeT()
        c.builtinCode = op
        c.deprecatedBuiltinCode = op
        c.version = 1
        codes.append(c)
    model.operatorCodes = codes
    g = s.SubGraphT()
    out_shape = (*in_shape[:-1], units)
    g.tensors = [tensor("x", in_shape, 0), tensor("w", (units, in_shape[-1]), 1),
                 tensor("fc", out_shape, 0), tensor("y", out_shape, 0)]
    fc = s.OperatorT()
    fc.opcodeIndex, fc.inputs, fc.outputs = 0, [0, 1, -1], [2]
    fc.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    fc.builtinOptions = s.FullyConnectedOptionsT()
    fc.builtinOptions.keepNumDims = True
    lg = s.OperatorT()
    lg.opcodeIndex, lg.inputs, lg.outputs = 1, [2], [3]
    g.operators = [fc, lg]
    g.inputs, g.outputs = [0], [3]
    model.subgraphs = [g]
    sig = s.SignatureDefT()
    sig.signatureKey = "serving_default"
    tin, tout = s.TensorMapT(), s.TensorMapT()
    tin.name, tin.tensorIndex = "input_2", 0
    tout.name, tout.tensorIndex = out_name, 3
    sig.inputs, sig.outputs = [tin], [tout]
    model.signatureDefs = [sig]
    return bytes(convert_object_to_bytearray(model))


def manifest_for(path: Path, name: str = "tiny", version: str = "1",
                 inputs: list[TensorSpec] | None = None,
                 outputs: list[TensorSpec] | None = None) -> Manifest:
    """A manifest with the file's real hash and size."""
    return Manifest(name=name, version=version, sha256=sha256_file(path),
                    size=path.stat().st_size,
                    inputs=inputs or [TensorSpec("input_2", (1, 16), "float32")],
                    outputs=outputs or [TensorSpec("note", (1, 4), "float32")],
                    licence="test")


@pytest.fixture(scope="module")
def bp_model(tmp_path_factory) -> Path:
    """basic-pitch's nmp.tflite extracted from the (cached) wheel."""
    wheel = model_fetch.fetch_wheel(model_fetch.default_cache())
    return model_fetch.extract_model(wheel, tmp_path_factory.mktemp("bp") / "nmp.tflite")


def test_tiny_model_runs_like_numpy(tmp_path):
    """The flatbuffer-built model is real: LiteRT's output equals sigmoid(W x)."""
    p = tmp_path / "tiny.tflite"
    p.write_bytes(tiny_tflite())
    r = LiteRTRunner(p, manifest_for(p))
    x = np.linspace(-1, 1, 16, dtype=np.float32)[None, :]
    w = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    want = 1 / (1 + np.exp(-(x @ w.T)))
    np.testing.assert_allclose(r.run(x)["note"], want, atol=1e-6)
    with pytest.raises(ValueError, match=r"input 'input_2' is \[1, 8\] float32"):
        r.run(np.zeros((1, 8), np.float32))


def test_fetch_is_idempotent_and_matches_the_manifest(tmp_path, bp_model):
    store = tmp_path / "store"
    m1 = model_fetch.fetch_into_store(store)
    st = ModelStore(store)
    assert m1.active and st.active_version("basic-pitch") == "0.4.0"
    assert sha256_file(m1.model_path) == model_fetch.BASIC_PITCH.sha256
    assert m1.model_path.read_bytes() == bp_model.read_bytes()
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    m2 = model_fetch.fetch_into_store(store)  # second run: nothing changes
    assert m2.version == m1.version
    after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != ".lock"} == \
        {p: t for p, t in before.items() if p.name != ".lock"}
    # the manifest's tensors are what LiteRT reports for the real file
    r = LiteRTRunner(m1.model_path, m1.manifest)
    assert r.input_shape() == (1, 43844, 1)
    out = r.run(np.zeros((1, 43844, 1), np.float32))
    assert {k: v.shape for k, v in out.items()} == {
        "note": (1, 172, 88), "onset": (1, 172, 88), "contour": (1, 172, 264)}
    assert model_fetch.main(["--store", str(store)]) == 0


def test_fetch_offline_reuses_the_cache_and_refuses_a_tampered_wheel(tmp_path, monkeypatch):
    """No index reachable: a good cached wheel is enough; a tampered one is not used."""
    spec = model_fetch.BASIC_PITCH
    good = model_fetch.fetch_wheel(model_fetch.default_cache()).read_bytes()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(model_fetch, "PYPI_JSON", "http://127.0.0.1:9/{package}/{version}")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / spec.wheel).write_bytes(good)
    m = model_fetch.fetch_into_store(tmp_path / "store", cache)
    assert m.active and sha256_file(m.model_path) == spec.sha256
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    (cache / spec.wheel).write_bytes(bytes(bad))
    with pytest.raises(ModelRefusedError, match=r"cannot fetch basic_pitch-0\.4\.0.*offline\?"):
        model_fetch.fetch_wheel(cache)
    with pytest.raises(ModelRefusedError, match=r"cannot read .*nmp\.tflite|sha256 is"):
        model_fetch.extract_model(cache / spec.wheel, tmp_path / "x.tflite")
    # a wheel whose model member differs: refused by the model's own sha256
    other = model_fetch.WheelModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelRefusedError, match=f"sha256 is {spec.sha256}; expected 0000"):
        model_fetch.extract_model(model_fetch.default_cache() / spec.wheel,
                                  tmp_path / "y.tflite", other)


def _install_bp(store: ModelStore, model: Path, version: str, tmp: Path, activate=True):
    m = model_fetch.basic_pitch_manifest()
    m.version = version
    return store.install(model, m, activate=activate)


def test_activate_rollback_and_refusals_keep_the_active_model(tmp_path, bp_model):
    st = ModelStore(tmp_path / "store")
    _install_bp(st, bp_model, "0.4.0", tmp_path)
    _install_bp(st, bp_model, "0.4.0-b", tmp_path, activate=False)
    assert st.active_version("basic-pitch") == "0.4.0"
    assert os.path.islink(st.root / "basic-pitch" / "active")
    st.activate("basic-pitch", "0.4.0-b")
    assert (st.active_version("basic-pitch"), st.previous_version("basic-pitch")) == \
        ("0.4.0-b", "0.4.0")
    st.rollback("basic-pitch")
    assert (st.active_version("basic-pitch"), st.previous_version("basic-pitch")) == \
        ("0.4.0", "0.4.0-b")

    good = bp_model.read_bytes()
    cases = {
        "corrupted": (good[:5000] + bytes(b ^ 0x5A for b in good[5000:6000]) + good[6000:],
                      "sha256 is"),
        "truncated": (good[: len(good) // 2], "size is 102224 bytes"),
    }
    for label, (data, msg) in cases.items():
        f = tmp_path / f"{label}.tflite"
        f.write_bytes(data)
        with pytest.raises(ModelRefusedError, match=msg) as ei:
            _install_bp(st, f, f"9-{label}", tmp_path)
        assert str(f.name) in str(ei.value) or ".staging" in str(ei.value)
        assert "basic-pitch 9-" in str(ei.value)  # names the manifest it was checked against
        assert st.active_version("basic-pitch") == "0.4.0"
        assert f"9-{label}" not in st.versions("basic-pitch")
    # missing file
    with pytest.raises(ModelRefusedError, match="missing"):
        _install_bp(st, tmp_path / "nope.tflite", "9-missing", tmp_path)
    # same version, different bytes: refused
    other = tmp_path / "other.tflite"
    other.write_bytes(tiny_tflite())
    m = manifest_for(other, "basic-pitch", "0.4.0",
                     inputs=[TensorSpec("input_2", (1, 16), "float32")])
    with pytest.raises(ModelRefusedError, match="give the new model another version"):
        st.install(other, m)
    # after all of that the active model still loads and runs
    act = st.active("basic-pitch")
    assert act.version == "0.4.0"
    LiteRTRunner(act.model_path, act.manifest)
    assert not list((st.root / ".staging").iterdir())


def test_wrong_tensor_shapes_are_refused(tmp_path, bp_model):
    """A real .tflite whose hash matches its manifest but whose tensors are not what the
    manifest says."""
    st = ModelStore(tmp_path / "store")
    _install_bp(st, bp_model, "0.4.0", tmp_path)
    f = tmp_path / "wrong.tflite"
    f.write_bytes(tiny_tflite(in_shape=(1, 43844), units=88))
    bp = model_fetch.basic_pitch_manifest()
    m = manifest_for(f, "basic-pitch", "5.0", inputs=[TensorSpec("input_2", (1, 43844),
                                                                 "float32")],
                     outputs=bp.outputs)
    with pytest.raises(ModelRefusedError, match=r"outputs are \['note'\]; the manifest of "
                                           r"basic-pitch 5.0 expects \['contour', 'note'"):
        st.install(f, m, activate=True)
    m2 = manifest_for(f, "basic-pitch", "5.1", inputs=bp.inputs,
                      outputs=[TensorSpec("note", (1, 88), "float32")])
    with pytest.raises(ModelRefusedError, match=r"input 'input_2' is \[1, 43844\] float32; the "
                                           r"manifest of basic-pitch 5.1 expects "
                                           r"\[-1, 43844, 1\] float32"):
        st.install(f, m2, activate=True)
    assert st.active_version("basic-pitch") == "0.4.0"
    # and a garbage file with a matching hash is refused by the loader, not a crash
    g = tmp_path / "garbage.tflite"
    g.write_bytes(b"TFL3" * 1000)
    with pytest.raises(ModelRefusedError, match="not a loadable TFLite model"):
        st.install(g, manifest_for(g, "basic-pitch", "5.2"))
    with pytest.raises(ModelLoadError, match="model file missing"):
        LiteRTRunner(tmp_path / "none.tflite")


def test_manifest_validation_names_field_and_value(tmp_path):
    good = model_fetch.basic_pitch_manifest().to_dict()
    assert model_manifest.from_dict(good).to_dict() == good
    bad = [("sha256", "xyz", "64 lower-case hex"), ("size", -3, "positive"),
           ("version", "active", "not 'active'"), ("sample_rate", 7, "1000..384000"),
           ("inputs", [{"name": "a", "shape": [0], "dtype": "float32"}], "positive integers"),
           ("outputs", [{"name": "a", "shape": [1], "dtype": "float99"}], "one of float32")]
    for key, value, expected in bad:
        d = json.loads(json.dumps(good))
        d[key] = value
        with pytest.raises(ManifestError, match=expected) as ei:
            model_manifest.from_dict(d, "m.json")
        assert str(ei.value).startswith(f"m.json: field '{key}")
        assert ei.value.field.startswith(key)
    # canonical bytes leave out signatures, so adding one does not change what is signed
    with_sig = dict(good, signatures=[{"key_id": "k1", "algorithm": "ed25519", "value": "AA"}])
    assert model_manifest.canonical_bytes(with_sig) == model_manifest.canonical_bytes(good)
    p = tmp_path / "broken.json"
    p.write_text("{ not json")
    with pytest.raises(ManifestError, match=r"broken.json: field '\(json\)'"):
        model_manifest.load(p)


def test_install_from_urls_and_sibling_manifest(tmp_path, bp_model):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(bp_model, served / "nmp.tflite")
    model_manifest.dump(model_fetch.basic_pitch_manifest(), served / "nmp.tflite.manifest.json")
    st = ModelStore(tmp_path / "store")
    # file:// URL with the manifest found beside it
    m = st.install(f"file://{served / 'nmp.tflite'}", activate=True)
    assert m.active and m.version == "0.4.0"
    # http:// from a local server, another version
    man = model_fetch.basic_pitch_manifest()
    man.version = "0.4.0-http"
    model_manifest.dump(man, served / "http.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        m2 = st.install(f"{base}/nmp.tflite", f"{base}/http.json")
        assert m2.version == "0.4.0-http" and not m2.active
        with pytest.raises(ModelRefusedError, match="cannot download"):
            st.install(f"{base}/absent.tflite", f"{base}/http.json")
    finally:
        srv.shutdown()
    with pytest.raises(ModelRefusedError, match="scheme 'ftp' not allowed"):
        st.install("ftp://example.invalid/x.tflite", man)
    lone = tmp_path / "lone" / "x.tflite"
    lone.parent.mkdir()
    shutil.copy(bp_model, lone)
    with pytest.raises(ModelRefusedError, match="no manifest given"):
        st.install(lone)


def _cli(*argv: str) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    models_cli.add_models_parser(sub)
    args = ap.parse_args(list(argv))
    return args.func(args)


def test_models_cli(tmp_path, bp_model, capsys):
    store = str(tmp_path / "store")
    man = tmp_path / "m.json"
    model_manifest.dump(model_fetch.basic_pitch_manifest(), man)
    assert _cli("models", "--store", store, "install", str(bp_model), "--manifest", str(man),
                "--activate") == 0
    m2 = model_fetch.basic_pitch_manifest()
    m2.version = "0.4.1"
    model_manifest.dump(m2, man)
    assert _cli("models", "--store", store, "install", str(bp_model), "--manifest",
                str(man)) == 0
    assert _cli("models", "--store", store, "activate", "basic-pitch", "0.4.1") == 0
    capsys.readouterr()
    assert _cli("models", "--store", store, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["version"], r["active"], r["previous"]) for r in rows} == {
        ("0.4.0", False, True), ("0.4.1", True, False)}
    assert _cli("models", "--store", store, "rollback", "basic-pitch") == 0
    assert ModelStore(store).active_version("basic-pitch") == "0.4.0"
    assert _cli("models", "--store", store, "verify") == 0
    # tamper with an installed file: verify reports it and fails; activation is refused
    f = Path(store) / "basic-pitch" / "0.4.1" / "model.tflite"
    data = bytearray(f.read_bytes())
    data[1000] ^= 1
    f.write_bytes(bytes(data))
    capsys.readouterr()
    assert _cli("models", "--store", store, "verify") == 1
    out = capsys.readouterr().out
    assert "0.4.1" in out and "FAILED" in out and "sha256 is" in out
    assert _cli("models", "--store", store, "activate", "basic-pitch", "0.4.1") == 1
    assert "sha256 is" in capsys.readouterr().err
    assert ModelStore(store).active_version("basic-pitch") == "0.4.0"
    assert _cli("models", "--store", store, "activate", "basic-pitch", "7") == 1
    assert "not installed" in capsys.readouterr().err
