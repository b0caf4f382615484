"""The box's side of remote updates: the fleet's `update` command, from download to reboot.

    args {"release", "artifact": system|models|config, "url", "size", "sha256",
          "reboot": now|window|never}  ->  {"ok": true, "accepted": release} at once

then progress as events {"kind": "update", "release", "artifact", "state", "progress",
"error", "evidence"} with state downloading, verifying, installing, installed, rebooting,
healthy, failed, rolled_back or refused (the last four end an update).

- system: a RAUC bundle; `rauc info` checks signature, compatible and version before RAUC
  writes the other slot; then reboot per policy; after the reboot update_health decides.
- models: a tar of manifest.json (signed, provisioning/update_signing) + model.tflite,
  installed into the model store and activated; no reboot.
- config: a signed JSON {"version": int, "values": {...}} applied through the supervisor's
  `apply` (the fleet overlay path); no reboot.

Refused without touching the running system: bad arguments, a busy box, another update
running, not enough space, size/sha256 mismatch, a signature from another key, a tampered
artifact, another compatible, a downgrade not allowed. The state is kept in the update folder
(on the data partition, which both slots share) so a restart resumes a download and a reboot
knows the box is on trial.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import re
import shlex
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echoel.daemon import config as config_mod
from echoel.daemon import fleet_overlay, update_download
from echoel.daemon.config import Key
from echoel.daemon.update_download import Downloaded, DownloadError, TlsFiles
from echoel.drivers.rauc_client import RaucClient, RaucError

log = logging.getLogger("echoel.update")

SECTION = "update"
ARTIFACTS = ("system", "models", "config")
REBOOT = ("now", "window", "never")
STATES = ("downloading", "verifying", "installing", "installed", "rebooting", "healthy",
          "failed", "rolled_back", "refused")
TERMINAL = ("healthy", "failed", "rolled_back", "refused")
RELEASE_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
MAX_ARTIFACT = 8 << 30
DATA_DIR = Path("/data/echoel/update")
STATE_FILE = "state.json"
BUSY_FILE = "busy"
LINK_FILE = "agent-link.json"
OUTBOX = "outbox"
MODEL_MEMBERS = ("manifest.json", "model.tflite")

KEYS: dict[str, Key] = {
    "enabled": Key(bool, True, "accept the fleet's `update` command"),
    "dir": Key(str, "", "update folder (downloads, state); must be on the data partition both "
               "slots share; empty: /data/echoel/update when /data exists, else STATE/update"),
    "ca_file": Key(str, "/etc/rauc/update-ca.pem", "the update CA certificate: RAUC's keyring "
                   "and what model/config artifacts must be signed under"),
    "server_ca_file": Key(str, "", "CA of the artifact server's TLS certificate; empty: "
                          "agent.ca_file (the fleet CA)"),
    "rauc_conf": Key(str, "", "RAUC system.conf; empty: RAUC's default /etc/rauc/system.conf"),
    "release_file": Key(str, "/etc/echoel/release", "the running release's name (written into "
                        "each rootfs by the image recipe)"),
    "maintenance_window": Key(str, "02:00-05:00", "local time HH:MM-HH:MM when reboot=window "
                              "may reboot (may span midnight)"),
    "allow_downgrade": Key(bool, False, "install a release older than the running one"),
    "reboot_command": Key(str, "systemctl reboot", "what a reboot runs"),
    "reserve_mb": Key(int, 64, "free space left on the update folder's disk beyond the "
                      "download", 0, 65536),
    "download_attempts": Key(int, 5, "tries (resuming) before a download fails", 1, 100),
    "health_deadline_s": Key(float, 300.0, "after booting a new slot: healthy within this "
                             "long or roll back", 10.0, 86400.0),
    "health_settle_s": Key(float, 20.0, "every check must pass continuously this long", 0.0,
                           3600.0),
    "health_max_xruns": Key(int, 10, "xruns (capture + playback) allowed during the health "
                            "check", 0, 1000000),
    "health_services": Key(str, "", "services that must publish status (comma-separated, "
                           "e.g. analyzer,transcriber)"),
    "health_need_agent": Key(bool, True, "the fleet agent must be connected to pass"),
}


class UpdateRefusedError(RuntimeError):
    """An update that must not be installed (the running system is untouched)."""


class UpdateFailedError(RuntimeError):
    """An update that could not be completed (network, RAUC, supervisor)."""


def check(raw: dict, where: str = "<config>") -> dict[str, Any]:
    """The [update] table validated, defaults filled in (config.SERVICE_SECTIONS hook)."""
    t = config_mod.check_table(where, SECTION, raw, {SECTION: KEYS})
    Window.parse(t["maintenance_window"], f"{where} [update] maintenance_window")
    return t


def section(cfg: config_mod.Config) -> dict[str, Any]:
    """The validated [update] table of a config (defaults while the main schema lacks it)."""
    raw = cfg.data.get(SECTION)
    if isinstance(raw, dict) and set(raw) == set(KEYS):
        return raw
    return check(raw or {}, cfg.source)


@dataclass(frozen=True)
class Window:
    """A daily maintenance window in local time, possibly spanning midnight."""

    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str, where: str = "update.maintenance_window") -> Window:
        """'HH:MM-HH:MM' -> Window."""
        m = WINDOW_RE.match(text.strip()) if isinstance(text, str) else None
        if not m:
            raise config_mod.ConfigError(f"{where} = {text!r}: write HH:MM-HH:MM in local time, "
                                         "e.g. 02:00-05:00 (it may span midnight)")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        return cls(h1 * 60 + m1, h2 * 60 + m2)

    def contains(self, now: dt.datetime) -> bool:
        """True when `now` (local time) is inside the window."""
        t = now.hour * 60 + now.minute
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end


def version_key(v: str) -> tuple:
    """Sort key of a release name: numeric parts as numbers ('2026.11.10' > '2026.11.2')."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                 for p in re.split(r"[._+-]", v) if p != "")


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as release a is older than, the same as, or newer than b."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


@dataclass(frozen=True)
class UpdateRequest:
    """A checked `update` command."""

    release: str
    artifact: str
    url: str
    size: int
    sha256: str
    reboot: str = "window"
    allow_downgrade: bool = False  # only from the box's own command line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"release": self.release, "artifact": self.artifact, "url": self.url,
                "size": self.size, "sha256": self.sha256, "reboot": self.reboot,
                "allow_downgrade": self.allow_downgrade}


def parse_request(args: Any, local: bool = False) -> UpdateRequest:
    """Check the `update` command's args; UpdateRefusedError names the field, value and what is
    allowed. `local` (the box's own CLI) also accepts file paths and http."""
    if not isinstance(args, dict):
        raise UpdateRefusedError(f"update: args = {args!r}: must be an object")
    known = {"release", "artifact", "url", "size", "sha256", "reboot"}
    extra = sorted(set(args) - known - ({"allow_downgrade"} if local else set()))
    if extra:
        raise UpdateRefusedError(f"update: unexpected argument {extra[0]!r}; allowed: "
                            + ", ".join(sorted(known)))
    for k in ("release", "artifact", "url", "size", "sha256", "reboot"):
        if k not in args:
            raise UpdateRefusedError(f"update: missing argument {k!r}")
    rel, art, url = args["release"], args["artifact"], args["url"]
    size, sha, reboot = args["size"], args["sha256"], args["reboot"]
    if not isinstance(rel, str) or not RELEASE_RE.match(rel):
        raise UpdateRefusedError(f"update: release = {rel!r}: 1-64 characters 0-9 A-Z a-z . _ + - "
                            "(e.g. 2026.11.2)")
    if art not in ARTIFACTS:
        raise UpdateRefusedError(f"update: artifact = {art!r}: allowed: "
                            + ", ".join(repr(a) for a in ARTIFACTS))
    schemes = ("https://", "http://", "file://", "/") if local else ("https://",)
    if not isinstance(url, str) or not url.startswith(schemes) or len(url) > 2048:
        raise UpdateRefusedError(f"update: url = {url!r}: must start with "
                            + " or ".join(schemes))
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_ARTIFACT:
        raise UpdateRefusedError(f"update: size = {size!r}: the artifact's size in bytes, an "
                            f"integer from 1 to {MAX_ARTIFACT}")
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise UpdateRefusedError(f"update: sha256 = {sha!r}: 64 lower-case hex digits")
    if reboot not in REBOOT:
        raise UpdateRefusedError(f"update: reboot = {reboot!r}: allowed: "
                            + ", ".join(repr(r) for r in REBOOT))
    allow = args.get("allow_downgrade", False)
    if not isinstance(allow, bool):
        raise UpdateRefusedError(f"update: allow_downgrade = {allow!r}: true or false")
    return UpdateRequest(rel, art, url, size, sha, reboot, allow)


@dataclass
class UpdateSettings:
    """What the update agent needs, resolved from the config."""

    dir: Path
    ca_file: Path
    tls: TlsFiles = field(default_factory=TlsFiles)
    rauc_conf: str = ""
    release_file: Path = Path("/etc/echoel/release")
    window: Window = field(default_factory=lambda: Window.parse("02:00-05:00"))
    allow_downgrade: bool = False
    reboot_command: str = "systemctl reboot"
    reserve_bytes: int = 64 << 20
    download_attempts: int = 5
    model_store: Path | None = None
    run_dir: Path | None = None
    health: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: config_mod.Config) -> UpdateSettings:
        """Settings from the [update] (and [agent], [daemon]) sections."""
        from echoel.daemon import bus

        u = section(cfg)
        a = cfg["agent"]
        if u["dir"]:
            folder = Path(u["dir"])
        elif data_dir_usable():
            folder = DATA_DIR
        else:
            folder = fleet_overlay.state_dir(cfg) / "update"
        from echoel.daemon.models_cli import store_path

        return cls(dir=folder, ca_file=Path(u["ca_file"]),
                   tls=TlsFiles(u["server_ca_file"] or a["ca_file"], a["cert_file"],
                                a["key_file"]),
                   rauc_conf=u["rauc_conf"], release_file=Path(u["release_file"]),
                   window=Window.parse(u["maintenance_window"]),
                   allow_downgrade=u["allow_downgrade"], reboot_command=u["reboot_command"],
                   reserve_bytes=u["reserve_mb"] << 20,
                   download_attempts=u["download_attempts"],
                   model_store=store_path(None),
                   # not made here: the health check (user echoel) may start before the
                   # engine's unit creates /run/echoel
                   run_dir=Path(cfg["daemon"]["run_dir"]) if cfg["daemon"]["run_dir"]
                   else bus.run_dir(""),
                   health={k[len("health_"):]: v for k, v in u.items()
                           if k.startswith("health_")})


class StateFile:
    """The update's state on disk (atomic JSON), shared with update_health."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STATE_FILE

    def load(self) -> dict[str, Any]:
        """The saved state ({} when there is none or it is unreadable)."""
        try:
            doc = json.loads(self.path.read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self, doc: dict[str, Any]) -> None:
        """Replace the state atomically and durably."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        own_like_folder(tmp, self.folder)
        os.replace(tmp, self.path)

    def update(self, **changes: Any) -> dict[str, Any]:
        """Change some fields and save (under a lock shared by threads and processes);
        returns the new state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".state.lock", "a+") as lk:
            own_like_folder(Path(lk.name), self.folder)
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                doc = self.load()
                doc.update(changes, updated=time.time())
                self.save(doc)
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)
        return doc


def make_event(release: str, artifact: str, state: str, progress: int | None = None,
               error: str | None = None, evidence: dict | None = None) -> dict[str, Any]:
    """An `update` event as the fleet expects it."""
    return {"kind": "update", "release": release, "artifact": artifact, "state": state,
            "progress": progress, "error": error, "evidence": evidence}


def running_release(release_file: Path) -> str:
    """The running release's name ('unknown' when the file is missing)."""
    try:
        return release_file.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class UpdateAgent:
    """Runs updates one at a time, in a worker thread when asked by the fleet.

    `emit(event)` is always called in the thread that created the agent: events of the worker
    are queued and delivered by `tick()` (the fleet agent's loop calls it every turn), so the
    caller's spool is never touched from another thread.
    """

    def __init__(self, settings: UpdateSettings, emit: Callable[[dict], None], *,
                 rauc: RaucClient | None = None,
                 apply_config: Callable[[dict, int], dict] | None = None,
                 reboot: Callable[[], None] | None = None,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.s = settings
        self.emit = emit
        self.rauc = rauc or RaucClient(settings.rauc_conf or None)
        self.apply_config = apply_config or self._apply_via_supervisor
        self.reboot = reboot or self._reboot_command
        self.clock = clock or dt.datetime.now
        self.state = StateFile(settings.dir)
        self._owner = threading.get_ident()
        self._events: queue.Queue[dict] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._current: UpdateRequest | None = None
        self._lock = threading.Lock()
        self._last_progress = (-1, 0.0)
        self._link_written = 0.0

    # ------------------------------------------------------------------ events
    def _emit(self, ev: dict) -> None:
        self.state.update(last_event=ev, state=ev["state"])
        if threading.get_ident() == self._owner:
            self._flush()
            self.emit(ev)
        else:
            self._events.put(ev)

    def _flush(self) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            self.emit(ev)

    def _progress(self, req: UpdateRequest, state: str, pct: int) -> None:
        last_pct, last_t = self._last_progress
        now = time.monotonic()
        if pct >= 100 or pct >= last_pct + 10 or (pct > last_pct and now - last_t >= 2.0):
            self._last_progress = (pct, now)
            self._emit(make_event(req.release, req.artifact, state, pct))

    # ------------------------------------------------------------------ state
    def busy(self) -> str | None:
        """The operator's busy note, or None when the box is free."""
        p = self.s.dir / BUSY_FILE
        try:
            return p.read_text().strip() or "busy"
        except OSError:
            return None

    def set_busy(self, on: bool, reason: str = "") -> None:
        """Mark the box busy (no update starts, no reboot happens) or free."""
        p = self.s.dir / BUSY_FILE
        if on:
            self.s.dir.mkdir(parents=True, exist_ok=True)
            p.write_text(reason or f"busy since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def running(self) -> bool:
        """True while an update is being downloaded or installed."""
        return self._worker is not None and self._worker.is_alive()

    def release(self) -> str:
        """The running release (telemetry's `software`)."""
        return running_release(self.s.release_file)

    def last_event(self) -> dict | None:
        """The last update event (telemetry's `update`)."""
        return self.state.load().get("last_event")

    def telemetry(self) -> dict[str, Any]:
        """The telemetry fields of the agreed protocol: `software` and `update`."""
        return {"software": self.release(), "update": self.last_event()}

    def link_heartbeat(self, connected: bool) -> None:
        """The fleet agent says whether it is connected (update_health reads it)."""
        now = time.time()
        if now - self._link_written < 2.0:
            return
        self._link_written = now
        self.s.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.s.dir / (LINK_FILE + ".tmp")
        tmp.write_text(json.dumps({"connected": connected, "ts": now}))
        os.replace(tmp, self.s.dir / LINK_FILE)

    # ------------------------------------------------------------------ the command
    def handle_command(self, args: Any) -> dict:
        """The fleet's `update` command: check, accept, run in the background."""
        try:
            req = parse_request(args)
        except UpdateRefusedError as exc:
            return {"ok": False, "error": str(exc)}
        with self._lock:
            cur = self._current
            if self.running() and cur is not None and cur.release == req.release and \
                    cur.artifact == req.artifact:
                # the fleet sends again when our first answer was lost: it is the same update
                return {"ok": True, "accepted": req.release, "already": "installing"}
            if self.running() and cur is not None:
                return {"ok": False, "error": f"update: release {cur.release!r} "
                        f"({cur.artifact}) is being installed; try again when it ends"}
            why = self.busy()
            if why:
                return {"ok": False, "error": f"update: the box is marked busy by its operator "
                        f"({why}); nothing started"}
            waiting = self.pending_system()
            if waiting:
                return {"ok": False, "error": waiting}
            self._start(req)
        return {"ok": True, "accepted": req.release}

    def _start(self, req: UpdateRequest) -> None:
        self._current = req
        self._worker = threading.Thread(target=self._run_safely, args=(req,),
                                        name="echoel-update", daemon=True)
        self._worker.start()

    def _run_safely(self, req: UpdateRequest) -> None:
        try:
            self.install(req)
        except Exception as exc:  # the worker must always end with a terminal event
            log.exception("update %s failed", req.release)
            self._emit(make_event(req.release, req.artifact, "failed", error=str(exc)))

    def pending_system(self) -> str | None:
        """Why no new update may start: a system update installed and waiting for its reboot
        or its health decision (None when there is none)."""
        st = self.state.load()
        if st.get("artifact") == "system" and "to_slot" in st and \
                st.get("state") in ("installed", "rebooting") and st.get("phase") != "done":
            return (f"update: release {st.get('release')!r} is installed in slot "
                    f"{st.get('to_slot')} and waits for its reboot (policy "
                    f"{st.get('reboot')!r}) and health check; nothing started")
        return None

    def resume(self) -> None:
        """After an agent restart: go on with an update that was interrupted (the download
        resumes from its partial file), or wait for its reboot."""
        st = self.state.load()
        if st.get("state") in ("downloading", "verifying", "installing") and "request" in st:
            try:
                req = parse_request(st["request"], local=True)
            except UpdateRefusedError:
                return
            log.info("resuming the update to %s (%s)", req.release, req.artifact)
            self._start(req)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background update to end (tests, CLI)."""
        if self._worker is not None:
            self._worker.join(timeout)
        self._flush()

    def install(self, req: UpdateRequest) -> dict:
        """Run one update to its end here; returns the last event."""
        waiting = self.pending_system()
        if waiting:
            ev = make_event(req.release, req.artifact, "refused", error=waiting)
            if threading.get_ident() == self._owner:
                self.emit(ev)
            else:
                self._events.put(ev)
            return ev
        self.state.save({"release": req.release, "artifact": req.artifact,
                         "request": req.to_dict(), "state": "downloading",
                         "started": time.time(), "updated": time.time(),
                         "last_event": self.state.load().get("last_event")})
        self._last_progress = (-1, 0.0)
        try:
            path = self._download(req).path
            self._emit(make_event(req.release, req.artifact, "verifying"))
            if req.artifact == "system":
                return self._system(req, path)
            if req.artifact == "models":
                return self._models(req, path)
            return self._config(req, path)
        except UpdateRefusedError as exc:
            ev = make_event(req.release, req.artifact, "refused", error=str(exc))
        except UpdateFailedError as exc:
            ev = make_event(req.release, req.artifact, "failed", error=str(exc))
        self._emit(ev)
        return ev

    def _download(self, req: UpdateRequest) -> Downloaded:
        ext = {"system": "raucb", "models": "tar", "config": "json"}[req.artifact]
        dest = self.s.dir / "artifacts" / f"{req.artifact}-{req.release}.{ext}"
        for old in (self.s.dir / "artifacts").glob("*") if dest.parent.is_dir() else ():
            if not old.name.startswith(dest.name):  # one artifact at a time on the disk
                old.unlink()
        self._emit(make_event(req.release, req.artifact, "downloading", 0))
        try:
            return update_download.download(
                req.url, dest, req.size, req.sha256,
                lambda done, total: self._progress(req, "downloading", done * 100 // total),
                self.s.tls, self.s.download_attempts, reserve_bytes=self.s.reserve_bytes)
        except DownloadError as exc:
            if exc.kind in ("space", "size", "sha256", "source"):
                raise UpdateRefusedError(f"download: {exc}") from None
            raise UpdateFailedError(f"download: {exc}") from None

    # ------------------------------------------------------------------ system
    def _system(self, req: UpdateRequest, bundle: Path) -> dict:
        try:
            info = self.rauc.info(bundle)
            status = self.rauc.status()
        except RaucError as exc:
            raise UpdateRefusedError(f"bundle refused by RAUC: {exc.message}") from None
        if info.compatible != status.compatible:
            raise UpdateRefusedError(f"bundle compatible is {info.compatible!r}; this box is "
                                f"{status.compatible!r} (a bundle for another board)")
        if info.version != req.release:
            raise UpdateRefusedError(f"bundle version is {info.version!r}; the update says release "
                                f"{req.release!r}")
        current = self.release()
        self._check_downgrade(req, info.version, current)
        self._emit(make_event(req.release, req.artifact, "installing", 0))
        self._last_progress = (-1, 0.0)
        before = status.booted
        try:
            self.rauc.install(bundle, lambda pct, _step: self._progress(req, "installing", pct))
        except RaucError as exc:
            refused = any(w in exc.message for w in ("ompatible", "signature", "verif",
                                                     "certificate", "Invalid"))
            kind = UpdateRefusedError if refused else UpdateFailedError
            raise kind(f"RAUC did not install the bundle: {exc.message}") from None
        target = "B" if before == "A" else "A"
        with contextlib.suppress(OSError):
            bundle.unlink()
        self.state.update(from_slot=before, to_slot=target, previous_release=current,
                          reboot=req.reboot, installed_at=time.time())
        ev = make_event(req.release, req.artifact, "installed", 100)
        self._emit(ev)
        return self.maybe_reboot() or ev

    def _check_downgrade(self, req: UpdateRequest, new: str, current: str) -> None:
        if current == "unknown" or req.allow_downgrade or self.s.allow_downgrade:
            return
        c = compare_versions(new, current)
        if c < 0:
            raise UpdateRefusedError(f"release {new} is older than the running {current}: a "
                                "downgrade is refused unless asked for (update.allow_downgrade "
                                "or `echoel update install --allow-downgrade`)")
        if c == 0:
            raise UpdateRefusedError(f"release {new} is the one running; nothing to do")

    def maybe_reboot(self, force: bool = False) -> dict | None:
        """Reboot into the new slot when the policy allows it now; returns the event."""
        st = self.state.load()
        if st.get("state") != "installed" or st.get("artifact") != "system":
            return None
        policy = st.get("reboot", "window")
        if policy == "never" and not force:
            return None
        if self.busy():
            return None
        if policy == "window" and not force and not self.s.window.contains(self.clock()):
            return None
        ev = make_event(st["release"], "system", "rebooting")
        self.state.update(rebooted_at=time.time())
        self._emit(ev)
        try:
            self.reboot()
        except RebootError as exc:
            # installed and primary: it runs after the next reboot, whoever makes it
            log.error("update %s is installed but the reboot failed: %s", st["release"], exc)
            ev = make_event(st["release"], "system", "installed", 100,
                            error=f"installed, but the reboot failed: {exc}; the new release "
                            "runs after the next reboot")
            self.state.update(state="installed", reboot="never", reboot_error=str(exc))
            self._emit(ev)
        return ev

    def tick(self) -> None:
        """Deliver queued events; reboot when a pending one is due (call every loop turn)."""
        self._flush()
        for ev in take_outbox(self.s.dir):  # left by `echoel update health-check`
            self.state.update(last_event=ev)
            self.emit(ev)
        if not self.running():
            self.maybe_reboot()

    # ------------------------------------------------------------------ models, config
    def _models(self, req: UpdateRequest, tar_path: Path) -> dict:
        from echoel.daemon import model_manifest
        from echoel.daemon.model_manifest import ManifestError
        from echoel.daemon.model_store import ModelRefusedError, ModelStore

        if self.s.model_store is None:
            raise UpdateRefusedError("models: this box has no model store configured")
        work = self.s.dir / "models-staging"
        _rmtree(work)
        work.mkdir(parents=True)
        try:
            _extract_model_tar(tar_path, work, req.size)
            try:
                m = model_manifest.load(work / "manifest.json")
            except ManifestError as exc:
                raise UpdateRefusedError(f"models: {exc}") from None
            self._verify_signed(m.to_dict(), f"model {m.name} {m.version}")
            store = ModelStore(self.s.model_store)
            cur = store.active_version(m.name)
            if cur is not None and cur != m.version:
                self._check_downgrade(req, m.version, cur)
            self._emit(make_event(req.release, req.artifact, "installing", 0))
            try:
                store.install(work / "model.tflite", m, activate=True)
            except ModelRefusedError as exc:
                raise UpdateRefusedError(f"models: {exc}") from None
        finally:
            _rmtree(work)
            with contextlib.suppress(OSError):
                tar_path.unlink()
        self._emit(make_event(req.release, req.artifact, "installed", 100))
        ev = make_event(req.release, req.artifact, "healthy",
                        evidence={"model": m.name, "version": m.version,
                                  "previous": cur})
        self._emit(ev)
        return ev

    def _config(self, req: UpdateRequest, path: Path) -> dict:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UpdateRefusedError(f"config: not a JSON document ({exc})") from None
        if not isinstance(doc, dict):
            raise UpdateRefusedError("config: the artifact must be a JSON object")
        self._verify_signed(doc, f"config release {req.release}")
        version, values = doc.get("version"), doc.get("values")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise UpdateRefusedError(f"config: version = {version!r}: a positive integer")
        if not isinstance(values, dict):
            raise UpdateRefusedError(f"config: values = {values!r}: an object of dotted keys")
        self._emit(make_event(req.release, req.artifact, "installing", 0))
        res = self.apply_config(values, version)
        with contextlib.suppress(OSError):
            path.unlink()
        if not res.get("ok"):
            err = str(res.get("error"))
            kind = UpdateFailedError if "no answer" in err else UpdateRefusedError
            raise kind(f"config v{version}: the supervisor refused it: {err}")
        self._emit(make_event(req.release, req.artifact, "installed", 100))
        ev = make_event(req.release, req.artifact, "healthy",
                        evidence={"config_version": version, "applied": res.get("applied")})
        self._emit(ev)
        return ev

    def _verify_signed(self, doc: dict, what: str) -> None:
        from echoel.provisioning.update_signing import SignatureError, load_ca, verify_document

        try:
            verify_document(doc, load_ca(self.s.ca_file), what)
        except SignatureError as exc:
            raise UpdateRefusedError(str(exc)) from None

    def _apply_via_supervisor(self, values: dict, version: int) -> dict:
        from echoel.daemon import bus

        if self.s.run_dir is None:
            return {"ok": False, "error": "no run folder: the supervisor cannot be reached"}
        try:
            return bus.request(self.s.run_dir, {"cmd": "apply", "values": values,
                                                "version": version}, 10.0)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc)}

    def _reboot_command(self) -> None:
        run_reboot(self.s.reboot_command)


class RebootError(RuntimeError):
    """The reboot command could not ask for a reboot; the message names it and why."""


REBOOT_TIMEOUT_S = 60.0


def run_reboot(command: str) -> None:
    """Run the configured reboot command (`systemctl reboot`, or the image's request file for
    root's echoel-update-reboot.path); it returns once the reboot is asked for. RebootError
    when it is missing, fails or hangs: the caller reports that instead of waiting forever."""
    log.warning("rebooting for the update (%s)", command)
    argv = shlex.split(command)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=REBOOT_TIMEOUT_S,
                           check=False)
    except FileNotFoundError:
        raise RebootError(f"reboot command {command!r}: {argv[0] if argv else '(empty)'} not "
                          "found; set [update] reboot_command in box.toml") from None
    except subprocess.TimeoutExpired:
        raise RebootError(f"reboot command {command!r} did not return within "
                          f"{REBOOT_TIMEOUT_S:g} s") from None
    if r.returncode != 0:
        raise RebootError(f"reboot command {command!r} exited {r.returncode}: "
                          f"{(r.stderr or r.stdout).strip()[-300:]}; check [update] "
                          "reboot_command in box.toml (the agent has no privileges: on the "
                          "image it touches a file that root's echoel-update-reboot.path acts "
                          "on)")


def data_dir_usable() -> bool:
    """/data/echoel/update can be the update folder: it exists writable, or /data/echoel
    (the data partition's folder of the stack's user) is writable to make it in."""
    if DATA_DIR.is_dir():
        return os.access(DATA_DIR, os.W_OK)
    return DATA_DIR.parent.is_dir() and os.access(DATA_DIR.parent, os.W_OK)


def post_to_outbox(update_dir: Path, ev: dict) -> Path:
    """Leave an event for the fleet agent (one file each, named in time order)."""
    box = update_dir / OUTBOX
    if not box.is_dir():
        box.mkdir(parents=True, exist_ok=True)
        own_like_folder(box, update_dir)
    path = box / f"{time.time_ns():020d}.json"
    tmp = box / f".{path.name}.tmp"
    tmp.write_text(json.dumps(ev))
    own_like_folder(tmp, update_dir)
    os.replace(tmp, path)
    return path


def own_like_folder(path: Path, folder: Path) -> None:
    """Run as root (a technician's `echoel update ...`): give `path` the owner of the update
    folder, so the agent (user echoel) can still replace and remove it."""
    if os.geteuid() != 0:
        return
    try:
        st = folder.stat()
        if (st.st_uid, st.st_gid) != (0, 0):
            os.chown(path, st.st_uid, st.st_gid)
    except OSError as exc:
        log.warning("could not give %s the owner of %s: %s", path, folder, exc)


def take_outbox(update_dir: Path) -> list[dict]:
    """The events waiting in the outbox, oldest first (removed from it)."""
    box = update_dir / OUTBOX
    out = []
    for p in sorted(box.glob("*.json")) if box.is_dir() else []:
        try:
            data = p.read_bytes()
            p.unlink()  # an event that cannot be removed is not sent on every turn
        except FileNotFoundError:
            continue
        except OSError as exc:
            if p not in _STUCK:
                _STUCK.add(p)
                log.error("update event %s cannot be taken (%s): not sent; give %s to the "
                          "agent's user (chown -R echoel %s)", p, exc.strerror, box, update_dir)
            continue
        try:
            out.append(json.loads(data))
        except ValueError:
            log.error("update event %s was not JSON; dropped", p)
    return out


_STUCK: set[Path] = set()


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _extract_model_tar(tar_path: Path, dest: Path, limit: int) -> None:
    """Extract manifest.json and model.tflite (regular files only, nothing else)."""
    try:
        with tarfile.open(tar_path, "r:") as tf:
            members = {m.name.lstrip("./"): m for m in tf.getmembers()}
            if set(members) != set(MODEL_MEMBERS):
                raise UpdateRefusedError(f"models: the tar holds {sorted(members)}; expected "
                                         f"exactly {list(MODEL_MEMBERS)}")
            for name, m in members.items():
                if not m.isfile() or m.size > limit:
                    raise UpdateRefusedError(f"models: {name} in the tar is not a regular file")
                src = tf.extractfile(m)
                assert src is not None
                with src, open(dest / name, "wb") as f:
                    f.write(src.read())
    except tarfile.TarError as exc:
        raise UpdateRefusedError(f"models: not a tar archive ({exc})") from None


def pack_model_artifact(model: Path, manifest: dict[str, Any], out: Path) -> Path:
    """Write a models artifact: a tar of manifest.json (already signed) and model.tflite."""
    import io

    out.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    with tarfile.open(out, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tf.addfile(info, io.BytesIO(data))
        tf.add(model, arcname="model.tflite")
    return out
