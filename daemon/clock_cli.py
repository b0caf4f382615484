"""`echoel clock`: status (one read of a running ptp4l), config (the generated ptp4l.cfg),
run (the clock service in the foreground). Also runnable as `python -m echoel.daemon.clock_cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from echoel.daemon import bus, logs
from echoel.daemon import config as config_mod
from echoel.daemon.config import ConfigError
from echoel.drivers import ptp4l_config
from echoel.drivers.ptp4l_process import Ptp4lError
from echoel.drivers.ptp_management import ManagementClient, ManagementError


def load(path: str | None) -> tuple[config_mod.Config, dict[str, Any], str]:
    """(the box's config, its validated [clock] table, source name) of a TOML file."""
    cfg = config_mod.load(path) if path else config_mod.defaults()
    return cfg, cfg["clock"], cfg.source


def add_clock_parser(sub) -> None:
    """Add `clock` and its subcommands to the `echoel` parser."""
    p = sub.add_parser("clock", help="PTP clock (ptp4l): status, generated config, service")
    s = p.add_subparsers(dest="clock_cmd", required=True)

    def parser(name: str, text: str) -> argparse.ArgumentParser:
        q = s.add_parser(name, help=text)
        q.add_argument("--config", help="TOML config file ([clock] section)")
        return q

    q = parser("status", "read a running ptp4l's state once over its management socket")
    q.add_argument("--run-dir", help="the run folder (default: from the config)")
    q.add_argument("--socket", help="ptp4l's uds_address (default: RUN_DIR/ptp4l.sock)")
    q.add_argument("--timeout", type=float, default=2.0, help="seconds per data set")
    q.add_argument("--json", action="store_true")
    q = parser("config", "print the ptp4l.cfg generated from the config")
    q.add_argument("--time-stamping", choices=("hardware", "software"),
                   help="instead of asking the interface (a config for another machine)")
    q = parser("run", "the clock service in the foreground (runs ptp4l)")
    q.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_clock)


def cmd_clock(args) -> int:
    """Dispatch `echoel clock ...`."""
    cfg, clock, source = load(args.config)
    rdir = Path(getattr(args, "run_dir", None) or bus.run_dir(cfg["daemon"]["run_dir"]))
    if args.clock_cmd == "config":
        try:
            ts = args.time_stamping or ptp4l_config.resolve_time_stamping(clock)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (for another machine, pass --time-stamping hardware "
                              "or software)") from None
        print(ptp4l_config.generate(clock, rdir / "ptp4l.sock", ts, source), end="")
        return 0
    if args.clock_cmd == "status":
        return _status(args, clock, rdir)
    from echoel.daemon.clock_service import ClockService

    logs.setup(cfg["daemon"]["log_level"])
    if not clock["enabled"]:
        print(f"echoel clock run: [clock] enabled = false in {source}; set it to true",
              file=sys.stderr)
        return 2
    try:
        return ClockService(clock, rdir, source).run(args.duration)
    except Ptp4lError as exc:
        print(f"echoel clock run: {exc}", file=sys.stderr)
        return 2


def _status(args, clock: dict[str, Any], rdir: Path) -> int:
    from echoel.daemon.clock_service import ClockTracker, LockPolicy

    sock = Path(args.socket or rdir / "ptp4l.sock")
    domain, free_running = clock["domain"], clock["free_running"]
    generated = sock.with_name("ptp4l.cfg")
    if generated.exists():  # what the service started ptp4l with wins over the config file
        g = ptp4l_config.read_global(generated)
        if g.get("uds_address") == str(sock):
            domain = int(g.get("domainNumber", domain))
            free_running = g.get("free_running", "0") == "1"
    try:
        with ManagementClient(sock, None, domain, args.timeout) as client:
            snap = client.snapshot()
    except ManagementError as exc:
        print(f"echoel clock status: {exc}", file=sys.stderr)
        return 1
    tracker = ClockTracker(LockPolicy.from_clock(clock), free_running)
    tracker.update(snap)
    st = tracker.status()
    del st["locked"], st["samples"]  # a single read knows nothing of the lock's history
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for line in render(st):
        print(line)
    return 0


def render(st: dict[str, Any]) -> list[str]:
    """A status for a person."""
    def ns(v: float | None, sign: str = "+") -> str:
        return "-" if v is None else f"{v:{sign}.0f} ns"

    lines = [f"state        {st['state']} (port {st['port_state']})",
             f"grandmaster  {st['gm_identity'] or 'none'}"
             + (f" (priority1 {st.get('gm_priority1')}, class {st.get('gm_clock_class')}, "
                f"{st.get('steps_removed')} step(s) away)" if st["gm_present"] else ""),
             f"this clock   {st.get('clock_identity', '-')}",
             f"offset       {ns(st['offset_ns'])}   path delay {ns(st['path_delay_ns'], '')}"]
    if "locked" in st:
        lines.append(f"locked       {'yes' if st['locked'] else 'no'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m echoel.daemon.clock_cli ...` (same as `echoel clock ...`)."""
    ap = argparse.ArgumentParser(prog="echoel")
    add_clock_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["clock", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"echoel: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
