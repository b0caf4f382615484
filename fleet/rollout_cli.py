"""`echoel fleet release add|list` and `echoel fleet rollout start|status|list|pause|resume|
abort`: the operator's side of remote updates. Everything goes through the store; the rollout
worker in the fleet service acts on it within a second."""

from __future__ import annotations

import argparse
import json
import time

from echoel.daemon.config import ConfigError
from echoel.fleet import fleet_config, releases
from echoel.fleet.releases import ARTIFACTS, ReleaseError
from echoel.fleet.rollout import ACTIVE, REBOOT, RolloutBook, RolloutError
from echoel.fleet.store import FleetStore, StoreError


def add_release_parsers(fleet_sub) -> None:
    """Add `release` and `rollout` (and their subcommands) under `echoel fleet`."""
    r = fleet_sub.add_parser("release", help="releases the fleet can roll out")
    rs = r.add_subparsers(dest="release_cmd", required=True)
    a = rs.add_parser("add", help="record a release: a file (size and SHA-256 measured) or a "
                      "URL with --sha256 and --size")
    a.add_argument("artifact", help="a bundle, a signed model or config file, or https://...")
    a.add_argument("--name", help="release name (default: the file name without suffix)")
    a.add_argument("--kind", choices=ARTIFACTS, help="artifact kind (default: from the suffix)")
    a.add_argument("--url", help="where the boxes download it (https://; default: ARTIFACT "
                   "when it is a URL)")
    a.add_argument("--sha256", help="SHA-256 hex (required with a URL; checked with a file)")
    a.add_argument("--size", type=int, help="bytes (required with a URL; checked with a file)")
    a.add_argument("--compatible", action="append", default=[], metavar="PATTERN",
                   help="running software it installs over (glob, repeatable; default: any)")
    a.add_argument("--notes", default="")
    q = rs.add_parser("list", help="recorded releases, newest first")
    q.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_release)

    o = fleet_sub.add_parser("rollout", help="staged rollouts of a release to a group")
    os_ = o.add_subparsers(dest="rollout_cmd", required=True)
    s = os_.add_parser("start", help="start rolling a release out to a group, stage by stage")
    s.add_argument("release")
    s.add_argument("--group", required=True)
    s.add_argument("--stages", default="1,10,50,100%",
                   help="cumulative shares of the group (default 1,10,50,100%%)")
    s.add_argument("--max-failures", type=int, default=0,
                   help="failures tolerated before the rollout pauses by itself (default 0)")
    s.add_argument("--reboot", choices=REBOOT, default="now")
    s.add_argument("--stage-timeout", type=float, default=1800.0,
                   help="s a stage waits for offline boxes before marking them offline")
    s.add_argument("--update-timeout", type=float, default=3600.0,
                   help="s after the command a box must report healthy (else a failure)")
    q = os_.add_parser("status", help="stages, counts per state, failures with evidence")
    q.add_argument("id", nargs="?", type=int, help="rollout id (default: the newest)")
    q.add_argument("--json", action="store_true")
    q.add_argument("--device", help="one box's history in the rollout")
    q = os_.add_parser("list", help="every rollout, newest first")
    q.add_argument("--json", action="store_true")
    for name, text in (("pause", "send to no more boxes (boxes updating go on)"),
                       ("resume", "go on (failures so far are acknowledged)"),
                       ("abort", "end the rollout; boxes not sent to are cancelled")):
        q = os_.add_parser(name, help=text)
        q.add_argument("id", nargs="?", type=int, help="rollout id (default: the active one)")
        if name == "resume":
            q.add_argument("--max-failures", type=int, help="a new threshold")
    o.set_defaults(func=cmd_rollout)


def _store(args: argparse.Namespace) -> FleetStore:
    cfg = fleet_config.load(getattr(args, "fleet_config", None))
    return FleetStore(cfg["db"])


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_release(args: argparse.Namespace) -> int:
    """Run `echoel fleet release ...`."""
    try:
        store = _store(args)
        try:
            if args.release_cmd == "add":
                rel = releases.from_artifact(args.artifact, name=args.name, kind=args.kind,
                                             url=args.url, sha256=args.sha256, size=args.size,
                                             compatible=tuple(args.compatible),
                                             notes=args.notes)
                rel = releases.add(store, rel)
                print(f"release {rel.name}: {rel.artifact}, {rel.size} bytes, sha256 "
                      f"{rel.sha256}, {rel.url}" + (f", installs over "
                                                    f"{', '.join(rel.compatible)}"
                                                    if rel.compatible else ""))
                return 0
            rows = releases.list_all(store)
            if args.json:
                print(json.dumps([r.__dict__ for r in rows], indent=1))
            elif not rows:
                print("no releases yet: `echoel fleet release add ARTIFACT` records one")
            else:
                print(f"{'RELEASE':<20} {'KIND':<7} {'SIZE':>12} {'SHA256':<14} {'ADDED':<19} "
                      "URL")
                for r in rows:
                    print(f"{r.name:<20} {r.artifact:<7} {r.size:>12} {r.sha256[:12]}.. "
                          f"{_when(r.created):<19} {r.url}")
            return 0
        finally:
            store.close()
    except (ConfigError, StoreError, ReleaseError) as exc:
        print(f"echoel fleet release: {exc}")
        return 2


def _pick(book: RolloutBook, rid: int | None, active_only: bool) -> int:
    if rid is not None:
        return rid
    ids = book.ids(ACTIVE if active_only else None)
    if active_only and len(ids) != 1:
        raise RolloutError("name the rollout: " + (f"{len(ids)} are active ("
                           f"{', '.join(map(str, ids))})" if ids else "none is active"))
    if not ids:
        raise RolloutError("no rollouts yet: `echoel fleet rollout start RELEASE --group G`")
    return ids[-1]


def cmd_rollout(args: argparse.Namespace) -> int:
    """Run `echoel fleet rollout ...`."""
    try:
        store = _store(args)
        try:
            book = RolloutBook(store)
            return _rollout(book, args)
        finally:
            store.close()
    except (ConfigError, StoreError, ReleaseError, RolloutError) as exc:
        print(f"echoel fleet rollout: {exc}")
        return 2


def _rollout(book: RolloutBook, args: argparse.Namespace) -> int:
    cmd = args.rollout_cmd
    if cmd == "start":
        rid = book.create(args.release, args.group, args.stages, args.max_failures,
                          args.reboot, args.stage_timeout, args.update_timeout)
        st = book.status(rid)
        sizes = ", ".join(f"{s['percent']:g}%: {s['boxes']}" for s in st["stages"])
        total = sum(s["boxes"] for s in st["stages"])
        print(f"rollout {rid}: {args.release} to group {args.group} ({total} boxes; stages "
              f"{sizes}); max failures {args.max_failures}. `echoel fleet rollout status "
              f"{rid}` follows it")
        return 0
    if cmd == "list":
        rows = [book.status(i) for i in reversed(book.ids())]
        if args.json:
            print(json.dumps([{k: v for k, v in r.items() if k != "log"} for r in rows],
                             indent=1))
            return 0
        if not rows:
            print("no rollouts yet")
            return 0
        print(f"{'ID':>4} {'RELEASE':<16} {'GROUP':<10} {'STATE':<10} {'STAGE':<6} "
              f"{'FAIL':<5} COUNTS")
        for r in rows:
            print(f"{r['id']:>4} {r['release']:<16} {r['group']:<10} {r['state']:<10} "
                  f"{r['current_stage']}/{len(r['stages']):<4} {r['failures']:<5} "
                  f"{_counts(r['counts'])}")
        return 0
    if cmd == "status":
        rid = _pick(book, args.id, False)
        if args.device:
            rows = book.log(rid, args.device, 200)
            if not rows:
                raise RolloutError(f"rollout {rid} has no box {args.device!r}")
            for e in reversed(rows):
                print(f"{_when(e['ts'])} {e['old'] or '-'} -> {e['new']} "
                      f"{json.dumps(e['detail']) if e['detail'] else ''}")
            return 0
        st = book.status(rid)
        if args.json:
            print(json.dumps(st, indent=1))
            return 0
        _print_status(st)
        return 0
    rid = _pick(book, args.id, True)
    if cmd == "pause":
        ro = book.pause(rid)
    elif cmd == "resume":
        ro = book.resume(rid, args.max_failures)
    else:
        ro = book.abort(rid)
    print(f"rollout {rid} ({ro.release} on {ro.group}): {ro.state} ({ro.reason})")
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "-"


def _print_status(st: dict) -> None:
    print(f"rollout {st['id']}: {st['release']} to group {st['group']}: {st['state']}"
          + (f" ({st['reason']})" if st["reason"] else ""))
    print(f"started {_when(st['created'])}, updated {_when(st['updated'])}; reboot "
          f"{st['reboot']}; stage timeout {st['stage_timeout_s']:g} s, update timeout "
          f"{st['update_timeout_s']:g} s")
    print(f"{'STAGE':<6} {'SHARE':>6} {'BOXES':>6} {'STATE':<8} {'STARTED':<19} COUNTS")
    for s in st["stages"]:
        print(f"{s['stage']:<6} {s['percent']:>5g}% {s['boxes']:>6} {s['state']:<8} "
              f"{_when(s['started']):<19} {_counts(s['counts'])}")
    print(f"failures: {st['failures']} ({st['failures_acknowledged']} acknowledged; pauses "
          f"beyond {st['max_failures']} more)")
    for f in st["failed"]:
        print(f"  {f['device']} (stage {f['stage']}) {f['state']}: {f['error']}")
        if f["evidence"]:
            print(f"    evidence: {json.dumps(f['evidence'])}")
    if st["not_counted"]:
        print("not counted: " + "; ".join(f"{n['device']} {n['state']}"
                                          + (f" ({n['error']})" if n["error"] else "")
                                          for n in st["not_counted"][:20]))
    print("recent changes:")
    for e in st["log"][:10]:
        what = f"{e['device']}: " if e["device"] else ""
        detail = e["detail"].get("reason") or e["detail"].get("error") or ""
        print(f"  {_when(e['ts'])} {what}{e['old'] or '-'} -> {e['new']}"
              + (f" ({detail})" if detail else ""))
