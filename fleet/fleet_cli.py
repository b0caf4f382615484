"""`echoel fleet`: serve, devices, show, config get|set, command, group."""

from __future__ import annotations

import argparse
import json
import signal
import time

from echoel.daemon.config import ConfigError, parse_value
from echoel.daemon.fleet_overlay import check_remote
from echoel.fleet import fleet_config
from echoel.fleet.operator_link import OperatorError, OperatorLink
from echoel.fleet.rollout_cli import add_release_parsers
from echoel.fleet.store import FleetStore, StoreError


def add_fleet_parser(sub) -> None:
    """Add `fleet` and its subcommands to the `echoel` parser."""
    p = sub.add_parser("fleet", help="the fleet service and the operator's view of the boxes")
    p.add_argument("--fleet-config", help="fleet TOML file ([fleet] table)")
    s = p.add_subparsers(dest="fleet_cmd", required=True)
    q = s.add_parser("serve", help="run the fleet service (ingest into the store)")
    q.add_argument("--duration", type=float)
    q = s.add_parser("devices", help="every box: online/lost, last seen, versions, health")
    q.add_argument("--group")
    q.add_argument("--json", action="store_true")
    q = s.add_parser("show", help="one box: state, recent telemetry and events")
    q.add_argument("device")
    q.add_argument("--json", action="store_true")
    c = s.add_parser("config", help="desired configuration of a box or a group")
    cs = c.add_subparsers(dest="config_cmd", required=True)
    g = cs.add_parser("get")
    g.add_argument("device")
    st = cs.add_parser("set", help="DEVICE key=value... or --group GROUP key=value...")
    st.add_argument("target", nargs="?", help="device id (or use --group)")
    st.add_argument("--group")
    st.add_argument("--unset", action="append", default=[], help="drop a key from desired")
    st.add_argument("pairs", nargs="*", metavar="key=value")
    q = s.add_parser("command", help="send a command and print the box's reply")
    q.add_argument("device")
    q.add_argument("name")
    q.add_argument("pairs", nargs="*", metavar="key=value")
    q.add_argument("--timeout", type=float, default=10.0)
    q = s.add_parser("group", help="put a box in a group")
    q.add_argument("device")
    q.add_argument("group")
    p.set_defaults(func=cmd_fleet)
    add_release_parsers(s)  # release add|list, rollout start|status|pause|resume|abort


def _pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{pair!r}: write key=value, e.g. chain.gain_db=-3")
        k, v = pair.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = time.time() - ts
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else \
        f"{s / 3600:.0f}h ago"


def health_line(d: dict, lost_after_s: float) -> tuple[str, str]:
    """(state as shown, one-line health) of a device row."""
    state = d["state"]
    if state == "online" and d["last_seen"] and time.time() - d["last_seen"] > lost_after_s:
        state = "silent"
    t = d["telemetry"] or {}
    e, b = t.get("engine", {}), t.get("box", {})
    parts = []
    if e:
        x = e.get("xruns") or {}
        parts.append(f"engine {e.get('state')}" + (f", xruns {x.get('capture', 0)}/"
                                                    f"{x.get('playback', 0)}" if x else ""))
    if b:
        parts.append(f"cpu {b.get('cpu_pct')}%")
        if b.get("temp_c") is not None:
            parts.append(f"{b['temp_c']}°C")
    a = t.get("agent", {})
    if a.get("spool_dropped"):
        parts.append(f"spool dropped {a['spool_dropped']}")
    return state, ", ".join(parts)


def cmd_fleet(args: argparse.Namespace) -> int:
    """Run one `echoel fleet` subcommand."""
    try:
        cfg = fleet_config.load(args.fleet_config)
        if args.fleet_cmd == "serve":
            return _serve(cfg, args.duration)
        store = FleetStore(cfg["db"])
        if args.fleet_cmd == "devices":
            return _devices(store, cfg, args)
        if args.fleet_cmd == "show":
            return _show(store, args)
        if args.fleet_cmd == "group":
            store.set_group(args.device, args.group)
            print(f"{args.device} is in group {args.group!r}")
            return 0
        if args.fleet_cmd == "config":
            return _config(store, cfg, args)
        if args.fleet_cmd == "command":
            cmd_args = _pairs(args.pairs)
            with OperatorLink(fleet_config.link(cfg), args.timeout) as op:
                corr = f"{args.device}-{time.time_ns()}"
                store.log_command(corr, args.device, args.name, cmd_args)
                reply = op.command(args.device, args.name, cmd_args, corr=corr)
            print(json.dumps(reply, indent=1))
            return 0 if reply.get("ok") else 1
    except (ConfigError, StoreError, OperatorError) as exc:
        print(f"echoel fleet: {exc}")
        return 2
    return 2


def _serve(cfg: dict, duration: float | None) -> int:
    import logging

    from echoel.daemon import logs
    from echoel.fleet.ingest_service import FleetService
    from echoel.fleet.rollout_worker import CommandSender, RolloutWorker

    logs.setup("info")
    log = logging.getLogger("echoel.fleet")
    link = fleet_config.link(cfg)
    store = FleetStore(cfg["db"])
    worker_store = FleetStore(cfg["db"])  # its own connection: never waits on ingest's lock
    worker = RolloutWorker(worker_store, CommandSender(link), cfg["rollout"])
    # a stored update event or command reply may let a rollout move on: step at once
    svc = FleetService(store, link, cfg["workers"], on_update=worker.wake)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    svc.start()
    worker.start()
    log.info("fleet service: %d workers, store %s, rollouts on", cfg["workers"], cfg["db"])
    end = None if duration is None else time.monotonic() + duration
    while not stop and (end is None or time.monotonic() < end):
        time.sleep(0.2)
    worker.stop()
    svc.stop()
    worker_store.close()
    store.close()
    return 0


def _devices(store: FleetStore, cfg: dict, args) -> int:
    rows = store.devices(args.group)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no boxes yet: a box appears when its agent first connects")
        return 0
    print(f"{'DEVICE':<20} {'GROUP':<10} {'STATE':<8} {'SEEN':<9} {'SOFTWARE':<9} "
          f"{'CONFIG':<12} HEALTH")
    for d in rows:
        state, health = health_line(d, cfg["lost_after_s"])
        conf = f"v{d['config_version']} {d['config_status'] or ''}".strip()
        print(f"{d['id']:<20} {d['group'] or '-':<10} {state:<8} {_ago(d['last_seen']):<9} "
              f"{d['software'] or '-':<9} {conf:<12} {health}")
    return 0


def _show(store: FleetStore, args) -> int:
    d = store.device(args.device)
    if d is None:
        print(f"echoel fleet: no box {args.device!r}; `echoel fleet devices` lists them")
        return 2
    doc = {"device": d, "desired": dict(zip(("version", "values"),
                                            store.desired(args.device), strict=True)),
           "recent_telemetry": store.recent(args.device, "telemetry", 5),
           "recent_events": store.recent(args.device, "events", 10)}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{d['id']}: {d['state']} (connection {d['state_seq']}), seen {_ago(d['last_seen'])}, "
          f"software {d['software']}, group {d['group'] or '-'}")
    err = f": {d['config_error']}" if d["config_error"] else ""
    print(f"config: desired v{doc['desired']['version']} {doc['desired']['values']}; box on "
          f"v{d['config_version']} ({d['config_status']}{err})")
    t = d["telemetry"] or {}
    for k in ("engine", "box", "agent", "versions"):
        if k in t:
            print(f"{k}: {json.dumps(t[k])}")
    for ev in doc["recent_events"]:
        print(f"event {_ago(ev.get('ts'))}: {ev.get('kind')} "
              f"{ {k: v for k, v in ev.items() if k not in ('kind', 'ts', 'seq', 'schema')} }")
    return 0


def _config(store: FleetStore, cfg: dict, args) -> int:
    if args.config_cmd == "get":
        version, values = store.desired(args.device)
        d = store.device(args.device) or {}
        print(json.dumps({"desired": {"version": version, "values": values},
                          "reported": {"version": d.get("config_version"),
                                       "status": d.get("config_status"),
                                       "error": d.get("config_error")}}, indent=1))
        return 0
    changes = check_remote(_pairs(args.pairs))
    if args.group:
        targets = [d["id"] for d in store.devices(args.group)]
        if not targets:
            print(f"echoel fleet: group {args.group!r} has no boxes")
            return 2
    elif args.target:
        targets = [args.target]
    else:
        print("echoel fleet: name a device or --group GROUP")
        return 2
    with OperatorLink(fleet_config.link(cfg)) as op:
        for dev in targets:
            version, values = store.add_desired(dev, changes, args.unset)
            op.publish_desired(dev, version, values)
            print(f"{dev}: desired config v{version} {values}")
    return 0
