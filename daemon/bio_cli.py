"""`echoel bio`: scan for heart-rate sensors, run the bio service, watch the beats."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import zmq
from bleak.exc import BleakError
from echoel.daemon.bio_service import (
    BioFile,
    BioService,
    bio_modulation_table,
    check_bio,
    load_bio_file,
)
from echoel.daemon.config import ConfigError
from echoel.drivers.ble_scan import scan_heart_rate_sensors
from echoel.drivers.heart_rate_packet import Beat

NO_BLUETOOTH = (OSError, EOFError, BleakError)  # no system bus, no bluetoothd, no adapter


def add_bio_parser(sub) -> None:
    """Add `bio` and its subcommands to the `echoel` parser."""
    p = sub.add_parser("bio", help="the performers' BLE heart-rate sensors (scan, run, watch)")
    s = p.add_subparsers(dest="bio_cmd", required=True)
    q = s.add_parser("scan", help="list heart-rate sensors (Heart Rate Service) nearby")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds to scan (default 5)")
    q.add_argument("--json", action="store_true")
    for name, text in (("run", "run the bio service in the foreground (status and events on "
                                "the local bus)"),
                       ("watch", "print the beats: from the running bio service, or with "
                                 "--direct from the sensors themselves")):
        q = s.add_parser(name, help=text)
        q.add_argument("--config", help="box TOML config file ([bio] section)")
        q.add_argument("--sensor", action="append", default=[],
                       help="a sensor address or name (repeat for several); overrides [bio] "
                            "sensors")
        q.add_argument("--simulated", action="store_true",
                       help="simulated sensors (labelled SIMULATED) instead of Bluetooth")
        q.add_argument("--duration", type=float, help="stop after this many seconds")
        if name == "watch":
            q.add_argument("--direct", action="store_true",
                           help="connect to the sensors here instead of listening to the "
                                "running service")
            q.add_argument("--run-dir", help="the bio service's run folder")
    p.set_defaults(func=cmd_bio)


def _settings(args: argparse.Namespace) -> tuple[dict, BioFile]:
    f = load_bio_file(args.config)
    bio = f.bio
    if args.sensor or args.simulated:
        raw = dict(bio)
        if args.sensor:
            raw.update(sensors=",".join(args.sensor), labels="", simulated=False)
        if args.simulated:
            raw["simulated"] = True
        bio = check_bio(raw, "command line")
    return bio, f


def beat_line(b: dict) -> str:
    """One printed beat."""
    rr = " ".join(f"{v:.0f}" for v in b["rr_ms"]) or "-"
    contact = {True: "", False: "  NO CONTACT", None: ""}[b["contact"]]
    gap = "  [gap before]" if b["gap_before"] else ""
    return f"{b['t_ns'] / 1e9:12.3f}  {b['sensor']:<24} {b['bpm']:>3} bpm  RR {rr} ms" \
        f"{contact}{gap}"


def cmd_bio(args: argparse.Namespace) -> int:
    """Run one `echoel bio` subcommand."""
    try:
        if args.bio_cmd == "scan":
            return _scan(args.timeout, args.json)
        bio, f = _settings(args)
        if args.bio_cmd == "run":
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
            if not bio["simulated"] and not bio["sensors"].strip():
                print("echoel bio run: no sensors configured: set [bio] sensors (see `echoel "
                      "bio scan`), or use --sensor / --simulated")
                return 2
            return _service(bio, f).run(args.duration)
        if args.direct:
            return _watch_direct(bio, args.duration)
        return _watch_bus(Path(args.run_dir) if args.run_dir else f.rdir, args.duration)
    except ConfigError as exc:
        print(f"echoel bio: config error: {exc}")
        return 2


def _service(bio: dict, f: BioFile) -> BioService:
    """The service; with [[bio.mappings]] configured, the HRV modulation plugged in."""
    if not f.bio["mappings"]:
        return BioService(bio, f.rdir)
    from echoel.daemon.bio_modulation import from_config

    mod = from_config(f.cfg, bio_modulation_table(f.bio), f.source)
    return BioService(bio, f.rdir, on_beat=mod.on_beat, on_state=mod.on_sensor_state,
                      tick=mod.tick, extra_status=mod.status)


def _scan(timeout: float, as_json: bool) -> int:
    try:
        found = asyncio.run(scan_heart_rate_sensors(timeout))
    except NO_BLUETOOTH as exc:
        print(f"echoel bio scan: Bluetooth is not available here ({type(exc).__name__}: {exc}); "
              "is bluetoothd running and an adapter powered (`bluetoothctl show`)?")
        return 1
    if as_json:
        print(json.dumps([f.__dict__ for f in found], indent=1))
        return 0
    if not found:
        print(f"no heart-rate sensors seen in {timeout:g} s (is the strap worn and moist? "
              "a strap sleeps without skin contact)")
        return 0
    print(f"{'address':<19} {'rssi':>5}  name")
    for f in found:
        print(f"{f.address:<19} {f.rssi:>5}  {f.name or '(no name)'}")
    return 0


def _watch_direct(bio: dict, duration: float | None) -> int:
    def show(beat: Beat) -> None:
        print(beat_line(asdict(beat)), flush=True)

    def event(kind: str, doc: dict) -> None:
        print(f"-- {kind}: {doc}", flush=True)

    return BioService(bio, None, on_beat=show, on_event=event).run(duration)


def _watch_bus(rdir: Path, duration: float | None) -> int:
    sock_path = rdir / "bus-bio.sock"
    if not sock_path.exists():
        print(f"echoel bio watch: no bio service at {sock_path}: start `echoel bio run` (or "
              "`make run`), or watch the sensors here with --direct")
        return 1
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for t in (b"beat.bio", b"event.bio"):
        sub.setsockopt(zmq.SUBSCRIBE, t)
    sub.connect(f"ipc://{sock_path}")
    end = None if duration is None else time.monotonic() + duration
    try:
        while end is None or time.monotonic() < end:
            if not sub.poll(200):
                continue
            topic, payload = sub.recv_multipart()[:2]
            doc = json.loads(payload)
            if topic == b"beat.bio":
                print(beat_line(doc), flush=True)
            else:
                print(f"-- {doc.get('event')}: {doc}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return 0

