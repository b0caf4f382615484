"""The `echoel` command and its subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from echoel.daemon import bus, logs
from echoel.daemon import config as config_mod


def _load(path: str | None) -> config_mod.Config:
    return config_mod.load(path) if path else config_mod.defaults()


def _rdir(args) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    return bus.run_dir(_load(args.config)["daemon"]["run_dir"])


def cmd_run(args) -> int:
    """Run the daemon on the configured sound card."""
    from echoel.daemon.status_view import LiveView
    from echoel.daemon.supervisor import Supervisor, write_summary

    cfg = _load(args.config)
    logs.setup(cfg["daemon"]["log_level"])
    sup = Supervisor(cfg, args.config)
    sup.start()
    view = LiveView() if args.show else None
    summary = sup.run(args.duration, on_status=view.update if view else None)
    if args.summary_json:
        write_summary(args.summary_json, summary)
    if args.duration is not None:
        print_summary(summary)
    return 0


def cmd_demo(args) -> int:
    """The stack on a JACK dummy device with generated music (what `make run` does)."""
    from echoel.daemon.demo import run_demo

    cfg = _load(args.config)
    logs.setup(cfg["daemon"]["log_level"])
    summary = run_demo(cfg, args.duration, not args.no_show, args.summary_json, args.config)
    print_summary(summary)
    return 0


def cmd_agent(args) -> int:
    """The box's fleet agent (MQTT 5 with mutual TLS to the fleet's broker)."""
    from echoel.daemon.fleet_agent import FleetAgent
    from echoel.drivers.mqtt_tls import LinkConfigError

    cfg = _load(args.config)
    logs.setup(cfg["daemon"]["log_level"])
    if not cfg["agent"]["enabled"]:
        prov = cfg["provisioning"]
        why = (f"the box is unprovisioned ({prov['reason'] or 'no identity yet'}): provision "
               "it with `echoel provision` or `echoel flash`") \
            if prov["state"] != "provisioned" else "[agent] enabled = false in the config"
        print(f"echoel agent: not connecting to the fleet: {why}", file=sys.stderr)
        return 0
    try:
        agent = FleetAgent(cfg, sys.argv[1:] if args.config else ["agent"])
    except LinkConfigError as exc:
        print(f"echoel agent: {exc}", file=sys.stderr)
        return 2
    return agent.run(args.duration)


def cmd_analyzer(args) -> int:
    """The live analysis service on the engine's analysis tap."""
    from echoel.daemon.analysis_service import AnalysisService

    cfg = _load(args.config)
    logs.setup(cfg["daemon"]["log_level"])
    return AnalysisService(cfg, args.tap).run(args.duration)


def cmd_transcriber(args) -> int:
    """Live audio-to-MIDI on the engine's notes tap."""
    from echoel.daemon.model_store import ModelRefusedError
    from echoel.daemon.transcriber_process import TranscriberProcess

    cfg = _load(args.config)
    logs.setup(cfg["daemon"]["log_level"])
    try:
        proc = TranscriberProcess(cfg, args.store, args.tap, args.midi, args.smf,
                                  args.threads, args.workers)
    except ModelRefusedError as exc:
        print(f"echoel transcriber: {exc}; install one with `echoel models install` or "
              "`make models`", file=sys.stderr)
        return 2
    except ValueError as exc:  # --threads/--workers out of range
        print(f"echoel transcriber: {exc}", file=sys.stderr)
        return 2
    return proc.run(args.duration)


def print_summary(s: dict) -> None:
    """The end-of-run summary, for a person."""
    print(f"\nsummary: {s['blocks']} blocks at {s['rate']} Hz, period {s['period']}, "
          f"latency {s['latency_ms']:.2f} ms, xruns capture {s['xruns']['capture']} / "
          f"playback {s['xruns']['playback']}, interface losses {s['interface_losses']}")
    for key in ("dsp", "read_to_write", "wake_jitter"):
        v = s.get(key) or {}
        print(f"  {key:<14} p50 {v.get('p50_us')} us  p99 {v.get('p99_us')} us  "
              f"max {v.get('max_us')} us  ({v.get('count')} blocks)")
    for name, why in (s.get("missing_guarantees") or {}).items():
        print(f"  missing guarantee {name}: {why}")


def cmd_status(args) -> int:
    """Ask a running daemon for its status."""
    from echoel.daemon.status_view import render

    reply = bus.request(_rdir(args), {"cmd": "status"})
    if args.json:
        print(json.dumps(reply["status"], indent=2))
    else:
        print("\n".join(render(reply["status"])))
    return 0


def cmd_set(args) -> int:
    """Change a setting in a running daemon."""
    reply = bus.request(_rdir(args), {"cmd": "set", "key": args.key,
                                      "value": config_mod.parse_value(args.value)})
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def cmd_reload(args) -> int:
    """Make a running daemon re-read its config file."""
    reply = bus.request(_rdir(args), {"cmd": "reload"})
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def cmd_diag(args) -> int:
    """Diagnostics on a running daemon."""
    if args.action == "latency":
        reply = bus.request(_rdir(args), {"cmd": "probe"})
    else:
        reply = bus.request(_rdir(args), {"cmd": "stall", "ms": args.ms})
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


def cmd_config(args) -> int:
    """Check a config file, or list every key."""
    if args.action == "keys":
        print(config_mod.describe_keys())
        return 0
    if not args.file:
        print("echoel config check: name the file to check", file=sys.stderr)
        return 2
    cfg = config_mod.load(args.file)
    print(f"{args.file}: valid" + (f" ({len(cfg['chain']['eq'])} EQ bands, "
                                   f"{len(cfg['taps'])} taps)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `echoel`."""
    ap = argparse.ArgumentParser(prog="echoel", description="Echoel Box: studio audio appliance")
    sub = ap.add_subparsers(dest="command", required=True)

    def client(p):
        p.add_argument("--config", help="config file of the daemon (to find its run folder)")
        p.add_argument("--run-dir", help="the daemon's run folder")

    p = sub.add_parser("run", help="run the daemon on the configured sound card")
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--show", action="store_true", help="live status on the terminal")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--summary-json", help="write the end-of-run summary here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the stack on a JACK dummy device with generated music")
    p.add_argument("--config", help="TOML config file (devices are replaced by JACK PCMs)")
    p.add_argument("--no-show", action="store_true", help="no live status")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--summary-json", help="write the end-of-run summary here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="status of a running daemon")
    client(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("set", help="change a setting of a running daemon")
    client(p)
    p.add_argument("key", help="dotted key, e.g. chain.gain_db or chain.eq.0.freq")
    p.add_argument("value")
    p.set_defaults(func=cmd_set)

    p = sub.add_parser("reload", help="make a running daemon re-read its config file")
    client(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("diag", help="diagnostics: `diag latency` measures the round trip "
                       "through a loopback (output 1 wired to input 1; mutes briefly); "
                       "`diag stall MS` stalls the audio thread once (checks xrun recovery)")
    client(p)
    p.add_argument("action", choices=("latency", "stall"))
    p.add_argument("ms", type=int, nargs="?", default=100)
    p.set_defaults(func=cmd_diag)

    p = sub.add_parser("agent", help="the fleet agent: telemetry, events, commands, config")
    p.add_argument("--config", help="TOML config file ([agent] section)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("analyzer", help="live analysis of the engine's audio (loudness, tuner, "
                       "key, chords) published on the local bus")
    p.add_argument("--config", help="TOML config file (needs a [[taps]] named like --tap)")
    p.add_argument("--tap", default="analysis")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_analyzer)

    from echoel.daemon.bio_cli import add_bio_parser
    from echoel.daemon.clock_cli import add_clock_parser
    from echoel.daemon.models_cli import add_models_parser
    from echoel.daemon.streams_cli import add_streams_parser
    from echoel.daemon.update_cli import add_update_parser
    from echoel.fleet.fleet_cli import add_fleet_parser
    from echoel.provisioning.flash_cli import add_flash_parser
    from echoel.provisioning.pki_cli import add_pki_parser
    from echoel.provisioning.provision_cli import add_provision_parser

    add_fleet_parser(sub)
    add_pki_parser(sub)
    add_models_parser(sub)
    add_clock_parser(sub)
    add_bio_parser(sub)
    add_update_parser(sub)
    add_streams_parser(sub)
    add_provision_parser(sub)
    add_flash_parser(sub)
    p = sub.add_parser("transcriber", help="live audio-to-MIDI (basic-pitch on LiteRT) on the "
                       "engine's notes tap: MIDI port, MIDI file, notes on the local bus")
    p.add_argument("--config", help="TOML config file (needs a [[taps]] named like --tap)")
    p.add_argument("--tap", default="notes")
    p.add_argument("--store", default="build/models", help="model store folder")
    p.add_argument("--midi", choices=("alsa", "jack", "none"), default="alsa",
                   help="MIDI port API (alsa on the box; jack where JACK is the sound card)")
    p.add_argument("--smf", help="also write the notes to this Standard MIDI File at the end")
    p.add_argument("--threads", type=int, default=1, help="LiteRT threads per interpreter")
    p.add_argument("--workers", type=int, default=1, help="interpreters working in parallel")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_transcriber)

    from echoel.daemon.analyze_cli import add_analyze_parser

    add_analyze_parser(sub)

    p = sub.add_parser("config", help="check a config file or list the keys")
    p.add_argument("action", choices=("check", "keys"))
    p.add_argument("file", nargs="?")
    p.set_defaults(func=cmd_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `echoel`."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_mod.ConfigError as exc:
        print(f"echoel: config error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, FileNotFoundError, RuntimeError) as exc:
        print(f"echoel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
