"""`echoel update`: install an update by hand, show the update state, the post-boot check.

    echoel update install URL|FILE [--release R] [--artifact system|models|config]
                                   [--sha256 H --size N] [--reboot never|now|window]
                                   [--allow-downgrade]
    echoel update status [--json]
    echoel update health-check          (run by echoel-update-health.service after boot)
    echoel update busy on|off [--reason TEXT]

daemon/cli.py adds these with `add_update_parser(sub)`. A local FILE needs no --sha256/--size
(they are computed); its signature is checked all the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from echoel.daemon import config as config_mod
from echoel.daemon.model_store import sha256_file
from echoel.daemon.update_agent import (
    ARTIFACTS,
    REBOOT,
    TERMINAL,
    StateFile,
    UpdateAgent,
    UpdateRefusedError,
    UpdateSettings,
    parse_request,
)
from echoel.drivers.rauc_client import RaucClient, RaucError


def add_update_parser(sub) -> None:
    """Add `update` and its subcommands to the `echoel` parser."""
    p = sub.add_parser("update", help="system, model and config updates: install, status, "
                       "health-check, busy")
    p.add_argument("--config", help="the box's config file (default: built-in defaults)")
    s = p.add_subparsers(dest="update_cmd", required=True)
    q = s.add_parser("install", help="download (resuming), verify and install an artifact")
    q.add_argument("source", help="https:// URL or a local file")
    q.add_argument("--release", help="release name (system: must equal the bundle's version; "
                   "default: the file name's stem)")
    q.add_argument("--artifact", choices=ARTIFACTS, default="system")
    q.add_argument("--sha256", help="expected sha256 (required for a URL)")
    q.add_argument("--size", type=int, help="expected size in bytes (required for a URL)")
    q.add_argument("--reboot", choices=REBOOT, default="never")
    q.add_argument("--allow-downgrade", action="store_true")
    q = s.add_parser("status", help="the running release, the last update and RAUC's slots")
    q.add_argument("--json", action="store_true")
    s.add_parser("health-check", help="after boot: mark the new slot good or roll back")
    q = s.add_parser("busy", help="mark the box busy (no update, no reboot) or free")
    q.add_argument("state", choices=("on", "off"))
    q.add_argument("--reason", default="")
    p.set_defaults(func=cmd_update)


def _settings(path: str | None) -> UpdateSettings:
    cfg = config_mod.load(path) if path else config_mod.defaults()
    return UpdateSettings.from_config(cfg)


def _print_event(ev: dict) -> None:
    pct = f" {ev['progress']}%" if ev.get("progress") is not None else ""
    err = f": {ev['error']}" if ev.get("error") else ""
    print(f"{ev['release']} {ev['artifact']}: {ev['state']}{pct}{err}", flush=True)


def cmd_install(args: argparse.Namespace, s: UpdateSettings) -> int:
    """Run one update in the foreground, printing its events."""
    src = args.source
    local = not src.startswith(("https://", "http://"))
    if local:
        path = Path(src[len("file://"):] if src.startswith("file://") else src).resolve()
        if not path.is_file():
            print(f"echoel update: {path}: no such file", file=sys.stderr)
            return 2
        size, sha = args.size or path.stat().st_size, args.sha256 or sha256_file(path)
        src = str(path)
    else:
        if not (args.sha256 and args.size):
            print("echoel update: a URL needs --sha256 and --size (from the artifact "
                  "server's index.json)", file=sys.stderr)
            return 2
        size, sha = args.size, args.sha256
    release = args.release or Path(src).stem.removeprefix("echoel-")
    try:
        req = parse_request({"release": release, "artifact": args.artifact, "url": src,
                             "size": size, "sha256": sha, "reboot": args.reboot,
                             "allow_downgrade": args.allow_downgrade}, local=True)
    except UpdateRefusedError as exc:
        print(f"echoel update: {exc}", file=sys.stderr)
        return 2
    agent = UpdateAgent(s, _print_event)
    if agent.busy():
        print(f"echoel update: the box is marked busy ({agent.busy()}); "
              "`echoel update busy off` first", file=sys.stderr)
        return 1
    ev = agent.install(req)
    return 0 if ev["state"] in ("installed", "rebooting", "healthy") else 1


def cmd_status(args: argparse.Namespace, s: UpdateSettings) -> int:
    """Print the running release, the update state and RAUC's view."""
    agent = UpdateAgent(s, lambda ev: None)
    st = StateFile(s.dir).load()
    doc: dict = {"release": agent.release(), "busy": agent.busy(),
                 "update": {k: st.get(k) for k in ("release", "artifact", "state", "phase",
                                                    "error", "from_slot", "to_slot",
                                                    "reboot")},
                 "last_event": st.get("last_event")}
    try:
        rs = RaucClient(s.rauc_conf or None).status()
        doc["rauc"] = {"compatible": rs.compatible, "booted": rs.booted,
                       "primary": rs.primary_bootname,
                       "slots": [{"bootname": x.bootname, "device": x.device,
                                  "state": x.state, "boot_status": x.boot_status,
                                  "version": x.bundle_version} for x in rs.slots]}
    except RaucError as exc:
        doc["rauc"] = {"error": exc.message}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    u = doc["update"]
    print(f"running release: {doc['release']}" + (f"  (busy: {doc['busy']})"
                                                  if doc["busy"] else ""))
    if u["state"]:
        done = " (done)" if u["state"] in TERMINAL else ""
        print(f"last update: {u['release']} {u['artifact']}: {u['state']}{done}"
              + (f": {u['error']}" if u["error"] else ""))
    r = doc["rauc"]
    if "error" in r:
        print(f"rauc: {r['error']}")
    else:
        print(f"rauc: {r['compatible']}, booted {r['booted']}, next boot {r['primary']}")
        for x in r["slots"]:
            print(f"  {x['bootname']}  {x['boot_status']:<4} {x['state']:<8} "
                  f"{x['version'] or '-':<14} {x['device']}")
    return 0


def cmd_health(args: argparse.Namespace, s: UpdateSettings) -> int:
    """The post-boot decision (exit 0: healthy or nothing to do; 1: rolled back/failed)."""
    from echoel.daemon.update_health import HealthCheck

    ev = HealthCheck(s).run()
    if ev is None:
        print("not on trial after an update: nothing to check")
        return 0
    _print_event(ev)
    return 0 if ev["state"] == "healthy" else 1


def cmd_update(args: argparse.Namespace) -> int:
    """Run one `echoel update` subcommand."""
    s = _settings(args.config)
    if args.update_cmd == "install":
        return cmd_install(args, s)
    if args.update_cmd == "status":
        return cmd_status(args, s)
    if args.update_cmd == "health-check":
        return cmd_health(args, s)
    agent = UpdateAgent(s, lambda ev: None)
    agent.set_busy(args.state == "on", args.reason)
    print(f"box marked {'busy' if args.state == 'on' else 'free'} for updates")
    return 0
