"""Remote updates on the host: real RAUC 1.8 (private D-Bus, `rauc service`, file-backed ext4
slots, the file bootloader backend of image/rauc/), real signatures, a real HTTPS artifact
server with Range requests, the update agent and the post-boot health check.

The supervisor's answer to `status` is played by a REP socket on the real control endpoint
(the engine needs a sound card); everything else is the code the box runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import zmq
from echoel.daemon.update_agent import (
    RebootError,
    StateFile,
    UpdateAgent,
    UpdateRefusedError,
    UpdateRequest,
    UpdateSettings,
    Window,
    compare_versions,
    pack_model_artifact,
    parse_request,
    post_to_outbox,
    run_reboot,
)
from echoel.daemon.update_download import DownloadError, TlsFiles, download
from echoel.daemon.update_health import (
    HealthCheck,
    HealthPolicy,
    agent_check,
    engine_check,
    services_check,
)
from echoel.drivers.rauc_client import HostRauc, host_missing
from echoel.fleet.artifact_server import ArtifactServer, CutPolicy
from echoel.provisioning.pki import FleetPki
from echoel.provisioning.update_signing import (
    SignatureError,
    UpdateCa,
    load_ca,
    sign_document,
    verify_document,
)

REPO = Path(__file__).resolve().parents[1]
COMPATIBLE = "echoel-box-test"
IMAGE_MB = 4
_spec = importlib.util.spec_from_file_location("echoel_image_bundle", REPO / "image" / "bundle.py")
bundle_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bundle_mod
_spec.loader.exec_module(bundle_mod)  # type: ignore[union-attr]

needs_rauc = pytest.mark.skipif(host_missing() is not None,
                                reason=f"RAUC cannot run here: {host_missing()}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The update CA and its signing certificate; a rogue CA; the fleet PKI for TLS."""
    root = tmp_path_factory.mktemp("keys")
    ca = UpdateCa(root / "update")
    ca.init()
    rogue = UpdateCa(root / "rogue")
    rogue.init("Someone else")
    fleet = FleetPki(root / "fleet")
    fleet.init()
    server = fleet.issue("broker", "artifacts", dns=("localhost",), ips=("127.0.0.1",))
    return {"ca": ca.ca_cert_path, "sign": ca.issue_signing("release"),
            "rogue": rogue.issue_signing("release"), "fleet_ca": fleet.ca_cert_path,
            "server": server, "fleet": fleet}


def make_rootfs(path: Path, release: str, noise_kib: int = 0) -> Path:
    """A small ext4 image whose /etc/echoel/release names the release (with `noise_kib` of
    incompressible data)."""
    tree = path.with_suffix(".tree")
    (tree / "etc" / "echoel").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "echoel" / "release").write_text(release + "\n")
    (tree / "payload.bin").write_bytes(hashlib.sha256(release.encode()).digest() * 4096)
    (tree / "noise.bin").write_bytes(b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest()
                                              for i in range(noise_kib * 32)))
    with open(path, "wb") as f:
        f.truncate(IMAGE_MB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def bundles(keys, tmp_path_factory):
    """Signed bundles: 2, 3, 1 (older), 2 by another CA, 2 tampered, 2 for another board."""
    if host_missing():
        pytest.skip(f"RAUC cannot run here: {host_missing()}")
    d = tmp_path_factory.mktemp("bundles")
    out = {}
    s, r = keys["sign"], keys["rogue"]
    for name, rel, ident, compat in (("v2", "2026.11.2", s, COMPATIBLE),
                                     ("v3", "2026.11.3", s, COMPATIBLE),
                                     ("v1", "2026.10.1", s, COMPATIBLE),
                                     ("rogue", "2026.11.2", r, COMPATIBLE),
                                     ("other_board", "2026.11.2", s, "echoel-box-elsewhere")):
        rootfs = make_rootfs(d / f"rootfs-{name}.ext4", rel)
        info = bundle_mod.build_bundle(rootfs, rel, compat, ident.cert, ident.key,
                                       d / f"echoel-{name}.raucb")
        assert info.image_sha256 == sha256(rootfs) and info.image_size == rootfs.stat().st_size
        assert info.sha256 == sha256(Path(info.path)) and info.version == rel
        out[name] = Path(info.path)
        out[name + "_rootfs"] = rootfs
    tampered = d / "echoel-tampered.raucb"
    data = bytearray(out["v2"].read_bytes())
    mid = len(data) // 3
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    tampered.write_bytes(bytes(data))
    out["tampered"] = tampered
    return out


@pytest.fixture
def host(keys, tmp_path):
    """RAUC on the host, booted from slot A."""
    if host_missing():
        pytest.skip(f"RAUC cannot run here: {host_missing()}")
    with HostRauc(tmp_path / "rauc", COMPATIBLE, keys["ca"], slot_mb=IMAGE_MB) as h:
        yield h


@pytest.fixture
def server(keys, tmp_path):
    """The HTTPS artifact server on a folder of this test."""
    folder = tmp_path / "served"
    folder.mkdir()
    srv = ArtifactServer(folder, cert=keys["server"].cert, key=keys["server"].key).start()
    yield srv
    srv.stop()


class Supervisor:
    """The supervisor's control socket answering `status` with a chosen engine state."""

    def __init__(self, run_dir: Path, state: str = "running", xruns: int = 0) -> None:
        self.status = {"state": state, "xruns": {"capture": xruns, "playback": 0},
                       "dsp_load_pct": 3.0, "problem": None, "engine_restarts": 0}
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sock.bind(f"ipc://{run_dir}/control.sock")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(100):
                req = json.loads(self.sock.recv())
                self.sock.send(json.dumps({"ok": req.get("cmd") == "status",
                                           "status": self.status}).encode())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def settings(tmp_path: Path, keys, host: HostRauc | None = None, release: str = "2026.11.1",
             **kw) -> UpdateSettings:
    rel = tmp_path / "release"
    rel.write_text(release + "\n")
    return UpdateSettings(dir=tmp_path / "update", ca_file=keys["ca"],
                          tls=TlsFiles(str(keys["fleet_ca"])),
                          rauc_conf=str(host.conf) if host else "", release_file=rel,
                          window=Window.parse("02:00-03:00"), reserve_bytes=1 << 20,
                          model_store=tmp_path / "models", run_dir=tmp_path / "run",
                          **kw)


def offer(server: ArtifactServer, path: Path, release: str, artifact: str = "system",
          reboot: str = "now") -> dict:
    """Put an artifact on the server; the `update` args the fleet would send."""
    dest = server.root / path.name
    dest.write_bytes(path.read_bytes())
    return {"release": release, "artifact": artifact, "url": server.url(path.name),
            "size": dest.stat().st_size, "sha256": sha256(dest), "reboot": reboot}


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.reboots = 0

    def emit(self, ev: dict) -> None:
        self.events.append(ev)

    def reboot(self) -> None:
        self.reboots += 1

    def states(self) -> list[str]:
        return [e["state"] for e in self.events]


# ---------------------------------------------------------------------------- signing
def test_signed_documents_accept_only_the_update_ca(keys):
    ca = load_ca(keys["ca"])
    doc = sign_document({"version": 3, "values": {"chain.gain_db": -3.0}}, keys["sign"])
    assert "release update signing" in verify_document(doc, ca)
    tampered = {**doc, "values": {"chain.gain_db": 6.0}}
    with pytest.raises(SignatureError, match="does not match the content"):
        verify_document(tampered, ca)
    with pytest.raises(SignatureError, match="not issued by the update CA"):
        verify_document(sign_document({"version": 3, "values": {}}, keys["rogue"]), ca)
    with pytest.raises(SignatureError, match="not signed"):
        verify_document({"version": 3, "values": {}}, ca)
    # a box's own certificate (fleet CA, clientAuth) can never sign an update
    dev = keys["fleet"].issue("device", "studio-9")
    from echoel.provisioning.update_signing import SigningIdentity
    with pytest.raises(SignatureError, match="not issued by the update CA"):
        verify_document(sign_document({"v": 1}, SigningIdentity(dev.cert, dev.key)), ca)


def test_request_checks_versions_and_window():
    good = {"release": "2026.11.2", "artifact": "system", "url": "https://h/x.raucb",
            "size": 10, "sha256": "a" * 64, "reboot": "window"}
    assert parse_request(good).release == "2026.11.2"
    for field, bad, says in (("artifact", "kernel", "artifact = 'kernel'"),
                             ("url", "http://h/x", "url = 'http://h/x'"),
                             ("size", 0, "size = 0"), ("sha256", "xyz", "sha256 = 'xyz'"),
                             ("reboot", "later", "reboot = 'later'"),
                             ("release", "../x", "release = '../x'")):
        with pytest.raises(UpdateRefusedError, match=says.replace(".", r"\.")):
            parse_request({**good, field: bad})
    with pytest.raises(UpdateRefusedError, match="missing argument 'sha256'"):
        parse_request({k: v for k, v in good.items() if k != "sha256"})
    assert sorted(["2026.11.10", "2026.9.1", "2026.11.2"],
                  key=lambda v: [int(p) for p in v.split(".")]) == \
        sorted(["2026.11.10", "2026.9.1", "2026.11.2"],
               key=__import__("functools").cmp_to_key(compare_versions))
    w = Window.parse("23:30-01:00")
    assert w.contains(dt.datetime(2026, 1, 1, 23, 45)) and w.contains(dt.datetime(2026, 1, 2,
                                                                                   0, 30))
    assert not w.contains(dt.datetime(2026, 1, 1, 12, 0))


# ---------------------------------------------------------------------------- download
def test_download_resumes_after_a_cut(server, keys, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    args = offer(server, blob, "1")
    tls = TlsFiles(str(keys["fleet_ca"]))
    server.cut = CutPolicy(after_bytes=700_000, times=1)
    dest = tmp_path / "dl" / "blob.bin"
    with pytest.raises(DownloadError, match=r"700000 of 2097152 bytes .*partial file is kept"):
        download(args["url"], dest, args["size"], args["sha256"], tls=tls, attempts=1)
    assert (dest.parent / "blob.bin.part").stat().st_size == 700_000
    got = download(args["url"], dest, args["size"], args["sha256"], tls=tls)
    assert got.resumed_from == 700_000 and sha256(dest) == sha256(blob)
    assert server.requests[-1][2] == "bytes=700000-"
    # cut again, retried within one call
    server.cut = CutPolicy(after_bytes=300_000, times=2)
    dest2 = tmp_path / "dl" / "again.bin"
    got = download(args["url"], dest2, args["size"], args["sha256"], tls=tls, backoff_s=0.05)
    assert got.attempts == 3 and sha256(dest2) == sha256(blob)
    with pytest.raises(DownloadError, match="sha256 is"):
        download(args["url"], tmp_path / "dl" / "bad.bin", args["size"], "0" * 64, tls=tls)
    assert not (tmp_path / "dl" / "bad.bin.part").exists()


def test_agent_restart_resumes_the_download(server, keys, tmp_path):
    from test_model_store import manifest_for, tiny_tflite

    model = tmp_path / "tiny.tflite"
    model.write_bytes(tiny_tflite() + bytes(300_000))  # padded: a download worth cutting
    m = sign_document(manifest_for(model, version="5").to_dict(), keys["sign"])
    art = pack_model_artifact(model, m, tmp_path / "tiny-5.tar")
    args = offer(server, art, "m5", "models")
    s = settings(tmp_path, keys)
    s.download_attempts = 1
    server.cut = CutPolicy(after_bytes=100_000, times=1)
    rec = Recorder()
    first = UpdateAgent(s, rec.emit, reboot=rec.reboot)
    assert first.handle_command(args)["ok"]
    first.wait(60)
    assert rec.events[-1]["state"] == "failed"
    # as if the agent had died mid-download: the state says downloading, the part is there
    first.state.update(state="downloading")
    rec2 = Recorder()
    second = UpdateAgent(s, rec2.emit, reboot=rec2.reboot)
    second.resume()
    second.wait(60)
    assert server.requests[-1][2] == "bytes=100000-"
    assert rec2.events[-1]["state"] == "healthy", rec2.events[-1]
    from echoel.daemon.model_store import ModelStore
    assert ModelStore(s.model_store).active_version("tiny") == "5"
    assert second.telemetry()["update"]["state"] == "healthy"


def test_full_disk_is_refused_before_downloading(server, keys, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
    try:
        blob = tmp_path / "big.bin"
        blob.write_bytes(b"\x5a" * (3 << 20))
        args = offer(server, blob, "2026.11.2", "models")
        rec = Recorder()
        s = settings(tmp_path, keys)
        s.dir = small / "update"
        agent = UpdateAgent(s, rec.emit, reboot=rec.reboot)
        assert agent.handle_command(args) == {"ok": True, "accepted": "2026.11.2"}
        agent.wait(60)
        last = rec.events[-1]
        assert last["state"] == "refused" and "MB free" in last["error"]
        assert not list((small / "update" / "artifacts").glob("*"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ---------------------------------------------------------------------------- system
def _wait_events(agent: UpdateAgent) -> None:
    agent.wait(120)
    assert not agent.running()


@needs_rauc
def test_system_update_installs_reboots_in_window_and_marks_good(host, bundles, server, keys,
                                                                tmp_path):
    now = {"t": dt.datetime(2026, 11, 24, 14, 0)}
    rec = Recorder()
    s = settings(tmp_path, keys, host, release="2026.11.1",
                 health={"deadline_s": 60.0, "settle_s": 1.0, "max_xruns": 10,
                         "services": "", "need_agent": True})
    agent = UpdateAgent(s, rec.emit, rauc=host.client, reboot=rec.reboot,
                        clock=lambda: now["t"])
    args = offer(server, bundles["v2"], "2026.11.2", reboot="window")
    assert agent.handle_command(args)["ok"]
    _wait_events(agent)
    st = rec.states()
    assert st[0] == "downloading" and st[-1] == "installed", rec.events
    assert st.index("verifying") < st.index("installing") < st.index("installed")
    assert rec.reboots == 0  # 14:00 is outside the 02:00-03:00 window
    img = bundles["v2_rootfs"]
    assert hashlib.sha256(host.slot_b.read_bytes()[:img.stat().st_size]).hexdigest() == \
        sha256(img)
    assert host.primary() == "B"
    res = agent.handle_command(offer(server, bundles["v3"], "2026.11.3"))
    assert not res["ok"] and "waits for its reboot" in res["error"]
    agent.set_busy(True, "recording session")
    now["t"] = dt.datetime(2026, 11, 25, 2, 30)
    agent.tick()
    assert rec.reboots == 0  # in the window, but busy
    agent.set_busy(False)
    agent.tick()
    assert rec.reboots == 1 and rec.states()[-1] == "rebooting"

    # the box comes up on slot B with release 2026.11.2: healthy
    host.boot("B")
    s.release_file.write_text("2026.11.2\n")
    sup = Supervisor(s.run_dir, "running", xruns=2)
    try:
        agent.link_heartbeat(True)
        ev = HealthCheck(s, host.client, rec.emit, rec.reboot,
                         policy=HealthPolicy(60.0, 1.0, 10, (), True, 0.2)).run()
    finally:
        sup.close()
    assert ev is not None and ev["state"] == "healthy", ev
    engine = next(c for c in ev["evidence"]["checks"] if c["name"] == "engine")
    assert engine["figures"]["xruns"] == 2 and engine["ok"]
    status = host.client.status()
    assert status.slot("B").boot_status == "good" and status.slot("B").bundle_version == \
        "2026.11.2"
    assert agent.release() == "2026.11.2"
    assert HealthCheck(s, host.client, rec.emit, rec.reboot).run() is None  # decided once


@needs_rauc
def test_failed_health_check_rolls_back_with_evidence(host, bundles, server, keys, tmp_path):
    rec = Recorder()
    s = settings(tmp_path, keys, host, release="2026.11.2")
    agent = UpdateAgent(s, rec.emit, rauc=host.client, reboot=rec.reboot)
    assert agent.handle_command(offer(server, bundles["v3"], "2026.11.3"))["ok"]
    _wait_events(agent)
    assert rec.states()[-2:] == ["installed", "rebooting"] and rec.reboots == 1
    host.boot("B")
    sup = Supervisor(s.run_dir, "running", xruns=57)
    try:
        agent.link_heartbeat(True)
        ev = HealthCheck(s, host.client, rec.emit, rec.reboot,
                         policy=HealthPolicy(3.0, 0.5, 10, (), True, 0.3)).run()
    finally:
        sup.close()
    assert ev["state"] == "rebooting" and "57 xruns; at most 10" in ev["error"]
    assert rec.reboots == 2
    status = host.client.status()
    assert status.slot("B").boot_status == "bad" and host.primary() == "A"
    # back on slot A: the fleet hears rolled_back with the evidence
    host.boot("A")
    ev = HealthCheck(s, host.client, rec.emit, rec.reboot).run()
    assert ev["state"] == "rolled_back" and ev["evidence"]["booted"] == "A"
    engine = next(c for c in ev["evidence"]["checks"] if c["name"] == "engine")
    assert engine["figures"]["xruns"] == 57 and not engine["ok"]


@needs_rauc
def test_bad_bundles_are_refused_and_the_system_is_untouched(host, bundles, server, keys,
                                                            tmp_path):
    rec = Recorder()
    s = settings(tmp_path, keys, host, release="2026.11.2")
    agent = UpdateAgent(s, rec.emit, rauc=host.client, reboot=rec.reboot)
    slot_b = sha256(host.slot_b)
    before = host.client.status()
    for name, release, says in (
            ("rogue", "2026.11.2", "unable to get local issuer certificate"),
            ("tampered", "2026.11.2", "verif"),
            ("other_board", "2026.11.2", "compatible is 'echoel-box-elsewhere'"),
            ("v1", "2026.10.1", "older than the running 2026.11.2"),
            ("v2", "2026.11.2", "is the one running")):
        rec.events.clear()
        assert agent.handle_command(offer(server, bundles[name], release))["ok"]
        _wait_events(agent)
        last = rec.events[-1]
        assert last["state"] == "refused" and says in last["error"], (name, last)
        assert "installing" not in rec.states()
        assert sha256(host.slot_b) == slot_b and host.client.status() == before
        assert host.primary() == "A"
    assert rec.reboots == 0
    # a downgrade asked for on the box itself installs
    rec.events.clear()
    local = UpdateRequest("2026.10.1", "system", str(bundles["v1"]),
                          bundles["v1"].stat().st_size, sha256(bundles["v1"]), "never", True)
    assert agent.install(local)["state"] == "installed"
    assert host.primary() == "B"


# ---------------------------------------------------------------------------- models, config
def test_signed_model_artifact_installed_tampered_refused(keys, tmp_path):
    from echoel.daemon import model_manifest
    from echoel.daemon.model_store import ModelStore
    from test_model_store import manifest_for, tiny_tflite

    model = tmp_path / "tiny.tflite"
    model.write_bytes(tiny_tflite())
    rec = Recorder()
    s = settings(tmp_path, keys)
    agent = UpdateAgent(s, rec.emit, reboot=rec.reboot)

    def artifact(version: str, ident, tamper: bool = False) -> UpdateRequest:
        m = manifest_for(model, version=version).to_dict()
        signed = sign_document(m, ident)
        if tamper:
            signed["notes"] = "changed after signing"
        assert model_manifest.from_dict(signed).to_dict() == signed  # survives the store
        out = pack_model_artifact(model, signed, tmp_path / f"tiny-{version}.tar")
        return UpdateRequest(version, "models", str(out), out.stat().st_size, sha256(out),
                             "never")

    ev = agent.install(artifact("1", keys["sign"]))
    assert ev["state"] == "healthy" and ev["evidence"]["version"] == "1"
    store = ModelStore(s.model_store)
    assert store.active_version("tiny") == "1"
    for req, says in ((artifact("2", keys["sign"], tamper=True), "does not match the content"),
                      (artifact("3", keys["rogue"]), "not issued by the update CA")):
        ev = agent.install(req)
        assert ev["state"] == "refused" and says in ev["error"]
        assert store.active_version("tiny") == "1" and store.versions("tiny") == ["1"]
    assert agent.install(artifact("4", keys["sign"]))["state"] == "healthy"
    assert store.active_version("tiny") == "4"
    assert agent.install(artifact("3", keys["sign"]))["state"] == "refused"  # downgrade


def test_signed_config_artifact_goes_through_apply(keys, tmp_path):
    applied: list[tuple[dict, int]] = []

    def apply(values: dict, version: int) -> dict:
        applied.append((values, version))
        return {"ok": True, "applied": "live", "version": version}

    rec = Recorder()
    agent = UpdateAgent(settings(tmp_path, keys), rec.emit, apply_config=apply,
                        reboot=rec.reboot)

    def artifact(name: str, doc: dict) -> UpdateRequest:
        p = tmp_path / name
        p.write_text(json.dumps(doc))
        return UpdateRequest("c7", "config", str(p), p.stat().st_size, sha256(p), "never")

    good = sign_document({"version": 7, "values": {"chain.gain_db": -3.0}}, keys["sign"])
    assert agent.install(artifact("good.json", good))["state"] == "healthy"
    assert applied == [({"chain.gain_db": -3.0}, 7)]
    bad = {**good, "values": {"chain.gain_db": 12.0}}
    ev = agent.install(artifact("bad.json", bad))
    assert ev["state"] == "refused" and "does not match" in ev["error"] and len(applied) == 1
    assert rec.reboots == 0


def test_a_failing_reboot_command_is_reported_and_the_update_kept(keys, tmp_path):
    """The agent has no privileges: a reboot command that cannot work (here: a request file
    in a folder that does not exist) is reported with the command and its error, not waited
    on; the update stays installed and is not rebooted into again and again."""
    request = tmp_path / "update" / "reboot-request"
    request.parent.mkdir()
    run_reboot(f"touch {request}")
    assert request.exists()  # the image's way: root's echoel-update-reboot.path acts on it
    with pytest.raises(RebootError, match="not found"):
        run_reboot("/no/such/reboot-tool now")
    bad = f"touch {tmp_path / 'gone' / 'reboot-request'}"
    with pytest.raises(RebootError, match=r"exited 1: .*reboot_command"):
        run_reboot(bad)

    rec = Recorder()
    s = settings(tmp_path, keys)
    agent = UpdateAgent(s, rec.emit, reboot=lambda: run_reboot(bad))
    StateFile(s.dir).save({"state": "installed", "artifact": "system",
                           "release": "2026.11.2", "reboot": "now", "to_slot": "B"})
    agent.tick()
    assert rec.states() == ["rebooting", "installed"], rec.events
    err = rec.events[-1]["error"]
    assert "the reboot failed" in err and "gone/reboot-request" in err and "exited 1" in err
    st = StateFile(s.dir).load()
    assert st["state"] == "installed" and st["reboot"] == "never" and st["reboot_error"]
    agent.tick()  # no loop of failing reboots
    assert rec.states() == ["rebooting", "installed"]
    # the fleet's reboot=now for the next update, or a technician's reboot, boots it then


TAKE_AS_AGENT = ("import json, logging, sys; logging.basicConfig(); "
                 "from pathlib import Path; from echoel.daemon.update_agent import take_outbox;"
                 " print(json.dumps([take_outbox(Path(sys.argv[1])) for _ in range(2)]))")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of another user)")
def test_root_written_update_files_stay_the_agents(tmp_path):
    """The health check or a technician's `echoel update` run as root: what they write in
    the update folder gets the folder's owner, so the agent (another user) can take it; an
    event it cannot remove is reported once, not sent on every turn, and does not stop it."""
    import shutil

    root = Path(tempfile.mkdtemp(prefix="echupd", dir="/tmp"))
    try:
        root.chmod(0o755)
        folder = root / "update"
        folder.mkdir()
        os.chown(folder, 65534, 65534)  # the agent's user: nobody here
        post_to_outbox(folder, {"kind": "update", "state": "healthy"})
        StateFile(folder).update(state="healthy")
        for p in [folder / "outbox", *folder.rglob("*")]:
            assert (p.stat().st_uid, p.stat().st_gid) == (65534, 65534), p

        def take() -> tuple[list, str]:
            cache = root / "numba"  # the agent's imports compile numba kernels
            cache.mkdir(exist_ok=True)
            os.chown(cache, 65534, 65534)
            r = subprocess.run([sys.executable, "-c", TAKE_AS_AGENT, str(folder)], user=65534,
                               group=65534, capture_output=True, text=True, timeout=120,
                               cwd="/", env={**os.environ, "NUMBA_CACHE_DIR": str(cache)})
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout), r.stderr

        got, _ = take()
        assert got == [[{"kind": "update", "state": "healthy"}], []]
        # an outbox made by root before this fix: reported, kept, not re-sent, no crash
        shutil.rmtree(folder / "outbox")
        (folder / "outbox").mkdir()
        (folder / "outbox" / "00000000000000000001.json").write_text('{"state": "healthy"}')
        got, err = take()
        assert got == [[], []]
        assert err.count("cannot be taken (Permission denied)") == 1, err
        assert "chown -R echoel" in err
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_command_refusals_and_health_probes(keys, tmp_path):
    rec = Recorder()
    s = settings(tmp_path, keys)
    agent = UpdateAgent(s, rec.emit, reboot=rec.reboot)
    res = agent.handle_command({"release": "x", "artifact": "system"})
    assert not res["ok"] and "missing argument 'url'" in res["error"]
    agent.set_busy(True, "live show tonight")
    args = {"release": "2026.11.2", "artifact": "system", "url": "https://127.0.0.1:9/x",
            "size": 5, "sha256": "b" * 64, "reboot": "now"}
    res = agent.handle_command(args)
    assert not res["ok"] and "live show tonight" in res["error"] and not rec.events
    agent.set_busy(False)
    # a server that accepts the connection and never answers: the first update hangs in its
    # download, a second one is refused; closing the socket ends the first as failed
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    s.download_attempts = 1
    args["url"] = f"https://127.0.0.1:{silent.getsockname()[1]}/x.raucb"
    assert agent.handle_command(args) == {"ok": True, "accepted": "2026.11.2"}
    res = agent.handle_command({**args, "release": "2026.11.3"})
    assert not res["ok"] and "'2026.11.2' (system) is being installed" in res["error"]
    # the same update again (the fleet resends when an answer is lost): accepted, not twice
    assert agent.handle_command(args)["already"] == "installing"
    conn, _ = silent.accept()
    conn.close()
    silent.close()
    agent.wait(60)
    assert rec.states()[0] == "downloading" and rec.events[-1]["state"] == "failed"
    assert "1 attempt" in rec.events[-1]["error"]
    # the probes on their own: no supervisor, no heartbeat
    c = engine_check(s.run_dir, 10, timeout_s=0.5)
    assert not c.ok and "unreachable" in c.error
    assert not agent_check(s.dir).ok
    agent.link_heartbeat(False)
    assert "not connected" in agent_check(s.dir).error
    # services: one publishes its status on its bus socket, the other is silent
    s.run_dir.mkdir(parents=True, exist_ok=True)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{s.run_dir}/bus-analyzer.sock")
    stop = threading.Event()

    def publish() -> None:
        while not stop.wait(0.05):
            pub.send_multipart([b"status.analyzer", b'{"ok": true}'])

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    try:
        assert services_check(s.run_dir, ("analyzer",), 5.0).ok
        c = services_check(s.run_dir, ("analyzer", "transcriber"), 1.0)
        assert not c.ok and c.figures["silent"] == ["transcriber"]
    finally:
        stop.set()
        t.join(5)
        pub.close()


def test_update_cli_installs_a_model_and_reports(keys, tmp_path, monkeypatch, capsys):
    import argparse

    from echoel.daemon import config as config_mod
    from echoel.daemon.update_cli import add_update_parser
    from test_model_store import manifest_for, tiny_tflite

    monkeypatch.setitem(config_mod.SERVICE_SECTIONS, "update", "echoel.daemon.update_agent")
    monkeypatch.setenv("ECHOEL_MODEL_STORE", str(tmp_path / "models"))
    (tmp_path / "release").write_text("2026.11.1\n")
    conf = tmp_path / "box.toml"
    conf.write_text(f'[update]\ndir = "{tmp_path / "upd"}"\nca_file = "{keys["ca"]}"\n'
                    f'release_file = "{tmp_path / "release"}"\n'
                    f'rauc_conf = "{tmp_path / "no-rauc.conf"}"\n')
    model = tmp_path / "tiny.tflite"
    model.write_bytes(tiny_tflite())
    art = pack_model_artifact(model, sign_document(manifest_for(model, version="9").to_dict(),
                                                   keys["sign"]), tmp_path / "tiny-9.tar")
    ap = argparse.ArgumentParser()
    add_update_parser(ap.add_subparsers(dest="command"))

    def cli(*argv: str) -> int:
        args = ap.parse_args(["update", "--config", str(conf), *argv])
        return args.func(args)

    assert cli("install", str(art), "--artifact", "models", "--release", "m9") == 0
    out = capsys.readouterr().out
    assert "m9 models: downloading 0%" in out and "m9 models: healthy" in out
    assert cli("status", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["release"] == "2026.11.1" and doc["update"]["state"] == "healthy"
    assert "error" in doc["rauc"]  # no RAUC config here: said, not crashed
    assert cli("busy", "on", "--reason", "session") == 0
    assert cli("install", str(art), "--artifact", "models", "--release", "m9") == 1
    assert "busy (session)" in capsys.readouterr().err
    assert cli("health-check") == 0  # not on trial
    # the health check starts before the engine's unit makes its runtime folder (and may
    # not make it itself): it must not need it to exist
    (tmp_path / "not-a-folder").write_text("")
    text = conf.read_text()
    conf.write_text(f'[daemon]\nrun_dir = "{tmp_path / "not-a-folder" / "run"}"\n' + text)
    assert cli("health-check") == 0
    conf.write_text(text)
    with pytest.raises(config_mod.ConfigError, match="maintenance_window = '25:00-01:00'"):
        conf.write_text(conf.read_text() + 'maintenance_window = "25:00-01:00"\n')
        cli("status")


def test_bundle_builder_checks_inputs_and_builds_verity(keys, tmp_path):
    if host_missing():
        pytest.skip(f"RAUC cannot run here: {host_missing()}")
    s = keys["sign"]
    # incompressible content: a verity bundle's squashfs must be larger than 4 KiB
    rootfs = make_rootfs(tmp_path / "r.ext4", "2026.11.2", noise_kib=512)
    info = bundle_mod.build_bundle(rootfs, "2026.11.2", COMPATIBLE, s.cert, s.key,
                                   tmp_path / "v.raucb", fmt="verity", keyring=keys["ca"])
    assert info.format == "verity" and info.image_sha256 == sha256(rootfs)
    with pytest.raises(bundle_mod.BundleError, match="does not verify against --keyring"):
        bundle_mod.build_bundle(rootfs, "2026.11.2", COMPATIBLE, keys["rogue"].cert,
                                keys["rogue"].key, tmp_path / "x.raucb", keyring=keys["ca"])
    assert not (tmp_path / "x.raucb").exists()
    text = tmp_path / "not-ext4.img"
    text.write_bytes(b"\0" * 4096)
    with pytest.raises(bundle_mod.BundleError, match="not an ext4 image"):
        bundle_mod.build_bundle(text, "1", COMPATIBLE, s.cert, s.key, tmp_path / "y.raucb")
    with pytest.raises(bundle_mod.BundleError, match="--version 'a b'"):
        bundle_mod.build_bundle(rootfs, "a b", COMPATIBLE, s.cert, s.key, tmp_path / "y.raucb")
