"""`echoel streams`: serve, list (SAP browser), sdp NAME (from the running service), send,
receive.

`send` and `receive` run standalone, for technicians: send a generated test tone (or a WAV
file) as an AES67 stream, announced by SAP; receive a stream by SDP file or announced name
into a WAV file (24-bit). Also runnable as `python -m echoel.daemon.streams_cli ...`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from echoel.daemon.media_clock import MediaClock, shorten_gil_switch

SAP_LIST_S = 3.0


def add_streams_parser(sub) -> None:
    """Add `streams` and its subcommands to the `echoel` parser."""
    p = sub.add_parser("streams", help="AES67 audio over IP: list, sdp, send, receive")
    p.add_argument("--run-dir", default="", help="the daemon's runtime folder (for `sdp`)")
    s = p.add_subparsers(dest="streams_cmd", required=True)
    q = s.add_parser("list", help="streams announced on the network (SAP), for a few seconds")
    q.add_argument("--seconds", type=float, default=SAP_LIST_S)
    q.add_argument("--iface", help="interface IPv4 address to listen on")
    q.add_argument("--json", action="store_true")
    q = s.add_parser("serve", help="run the streams service ([[streams]] of the config)")
    q.add_argument("--config", required=True, help="TOML config file with [[streams]]")
    q.add_argument("--duration", type=float, help="stop after this many seconds")
    q = s.add_parser("sdp", help="the SDP of one of the running service's streams")
    q.add_argument("name")
    q.add_argument("--timeout", type=float, default=3.0)
    q = s.add_parser("send", help="send a test tone (or a WAV file) as an AES67 stream")
    q.add_argument("--name", default="echoel-test")
    q.add_argument("--address", default="239.69.1.1")
    q.add_argument("--port", type=int, default=5004)
    q.add_argument("--channels", type=int, default=2)
    q.add_argument("--encoding", choices=("L24", "L16"), default="L24")
    q.add_argument("--rate", type=int, choices=(48000, 96000), default=48000)
    q.add_argument("--ptime-us", type=int, choices=(125, 250, 1000), default=1000)
    q.add_argument("--ttl", type=int, default=32)
    q.add_argument("--dscp", default="AF41", help="DSCP name (AF41, EF, CS6...) or 0-63")
    q.add_argument("--iface", help="interface IPv4 address for multicast (also the SDP origin)")
    q.add_argument("--tone", default="1000,440",
                   help="tone frequencies in Hz, one per channel, repeated (default 1000,440)")
    q.add_argument("--level", type=float, default=0.5, help="tone peak level (0-1)")
    q.add_argument("--wav", help="send this WAV file (looped) instead of the tone")
    q.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    q.add_argument("--sdp-out", help="also write the SDP to this file")
    q.add_argument("--no-sap", action="store_true", help="do not announce by SAP")
    q.add_argument("--sap-interval", type=float, default=30.0,
                   help="seconds between SAP announcements (AES67: 30)")
    q.add_argument("--priority", type=int, default=60, help="SCHED_FIFO priority (0: none)")
    q = s.add_parser("receive", help="receive a stream into a WAV file (24-bit)")
    q.add_argument("--sdp", help="SDP file of the stream")
    q.add_argument("--name", help="a stream announced by SAP (waits up to --wait seconds)")
    q.add_argument("--wait", type=float, default=35.0)
    q.add_argument("--iface", help="interface IPv4 address to join on")
    q.add_argument("--latency-ms", type=float, default=5.0)
    q.add_argument("--duration", type=float, default=5.0)
    q.add_argument("--out", required=True, help="WAV file to write")
    q.add_argument("--json", action="store_true", help="print the final counters as JSON")
    p.set_defaults(func=cmd_streams)


def cmd_streams(args: argparse.Namespace) -> int:
    """Dispatch `echoel streams ...`."""
    try:
        return {"list": _list, "sdp": _sdp, "send": _send, "receive": _receive,
                "serve": _serve}[args.streams_cmd](args)
    except (ValueError, OSError, TimeoutError) as exc:
        print(f"echoel streams {args.streams_cmd}: {exc}", file=sys.stderr)
        return 2


def _list(args: argparse.Namespace) -> int:
    from echoel.drivers.sap import SapBrowser
    b = SapBrowser(iface=args.iface).open()
    try:
        streams = b.listen(args.seconds)
    finally:
        b.close()
    rows = [{"name": v.stream.name, "address": f"{v.stream.address}:{v.stream.port}",
             "format": f"{v.stream.encoding}/{v.stream.rate}/{v.stream.channels}",
             "ptime_us": v.stream.ptime_us, "origin": v.origin,
             "gm_identity": v.stream.gm_identity, "domain": v.stream.domain}
            for v in streams.values()]
    if args.json:
        print(json.dumps({"streams": rows, "refused": b.refused, "deletions": b.deletions,
                          "last_error": b.last_error}))
        return 0
    if not rows:
        print(f"no stream announced in {args.seconds:g} s")
    for r in rows:
        print(f"{r['name']:<24} {r['address']:<22} {r['format']:<16} "
              f"{r['ptime_us']:>5} us  from {r['origin']}  PTP {r['gm_identity'] or '-'}:"
              f"{r['domain']}")
    if b.refused:
        print(f"{b.refused} announcement(s) refused; last: {b.last_error}")
    return 0


def service_sdp(run_dir: str, name: str, timeout: float = 3.0) -> str:
    """A running service's SDP for stream `name` (from its status.streams)."""
    import zmq
    from echoel.daemon import bus
    rdir = bus.run_dir(run_dir)
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"status.streams")
    sock.connect(f"ipc://{rdir}/bus-streams.sock")
    try:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000)):
                break
            _topic, body = sock.recv_multipart()
            st = json.loads(body)
            for s in st.get("streams", []):
                if s.get("name") == name and s.get("sdp"):
                    return s["sdp"]
            names = [s.get("name") for s in st.get("streams", [])]
            raise ValueError(f"no stream named {name!r} in the streams service; it runs: "
                             f"{', '.join(map(str, names)) or 'none'}")
    finally:
        sock.close()
    raise TimeoutError(f"no status from the streams service at ipc://{rdir}/bus-streams.sock "
                       f"within {timeout:g} s: is it running?")


def _serve(args: argparse.Namespace) -> int:
    from echoel.daemon import logs
    from echoel.daemon.streams_service import StreamsService, load
    cfg, streams = load(args.config)
    logs.setup(cfg["daemon"]["log_level"])
    return StreamsService(cfg, streams).run(args.duration)


def _sdp(args: argparse.Namespace) -> int:
    sys.stdout.write(service_sdp(args.run_dir, args.name, args.timeout))
    return 0


def _stop_event(duration: float | None) -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    if duration is not None:
        t = threading.Timer(duration, stop.set)
        t.daemon = True
        t.start()
    return stop


def _clock(run_dir: str, rate: int) -> MediaClock:
    """The media clock, following the clock service when its bus socket is there."""
    from echoel.daemon import bus
    from echoel.daemon.media_clock import ClockBusSource
    rdir = bus.run_dir(run_dir)
    if (rdir / "bus-clock.sock").exists():
        src = ClockBusSource(str(rdir))
        clock = MediaClock(rate, src)
        end = time.monotonic() + 1.0
        while clock.reading is None and time.monotonic() < end:
            time.sleep(0.05)  # the first status (published four times a second)
            clock.refresh()
        return clock
    return MediaClock(rate)


class WavSource:
    """A WAV file's frames, looped (float32, channels as the file)."""

    def __init__(self, path: str, channels: int, rate: int) -> None:
        import soundfile as sf
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        if sr != rate:
            raise ValueError(f"{path}: sample rate {sr} Hz; the stream runs at {rate}")
        if x.shape[1] != channels:
            raise ValueError(f"{path}: {x.shape[1]} channels; the stream has {channels}")
        if len(x) == 0:
            raise ValueError(f"{path}: no audio frames")
        self.x, self.pos = x, 0

    def read(self, out: np.ndarray) -> None:
        """The next frames (looping)."""
        n = out.shape[0]
        idx = (self.pos + np.arange(n)) % len(self.x)
        out[:] = self.x[idx]
        self.pos = (self.pos + n) % len(self.x)

    def skip(self, frames: int) -> None:
        """Drop frames."""
        self.pos = (self.pos + frames) % len(self.x)

    def status(self) -> dict:
        """The kind."""
        return {"kind": "wav"}


def _send(args: argparse.Namespace) -> int:
    from echoel.daemon.aes67_sender import Aes67Sender, SenderConfig
    from echoel.daemon.aes67_sources import ToneSource
    from echoel.drivers.sap import SapAnnouncer
    try:
        freqs = tuple(float(f) for f in args.tone.split(","))
    except ValueError:
        raise ValueError(f"--tone {args.tone!r}: give frequencies in Hz, e.g. 1000,440") \
            from None
    cfg = SenderConfig(name=args.name, address=args.address, port=args.port,
                       channels=args.channels, encoding=args.encoding, rate=args.rate,
                       ptime_us=args.ptime_us, ttl=args.ttl, dscp=args.dscp, iface=args.iface,
                       fifo_priority=args.priority)
    source = (WavSource(args.wav, args.channels, args.rate) if args.wav else
              ToneSource(args.channels, args.rate, freqs, args.level))
    clock = _clock(args.run_dir, args.rate)
    sender = Aes67Sender(cfg, source, clock)
    sdp = sender.sdp()
    if args.sdp_out:
        Path(args.sdp_out).write_text(sdp)
    sap = None if args.no_sap else SapAnnouncer(cfg.stream().origin, args.ttl, args.iface,
                                                 interval_s=args.sap_interval)
    if sap:
        sap.announce(args.name, sdp)
    print(f"sending {args.name!r} to {args.address}:{args.port} "
          f"({args.encoding}/{args.rate}/{args.channels}, {args.ptime_us} us packets, media "
          f"clock {clock.mode})", file=sys.stderr, flush=True)
    stop = _stop_event(args.duration)
    shorten_gil_switch()
    sender.start()
    try:
        while not stop.wait(0.25):
            clock.refresh()
            if sap:
                sap.announce(args.name, sender.sdp())  # a new grandmaster: a new SDP
                sap.tick()
    finally:
        sender.close()
        if sap:
            sap.close()
    print(json.dumps({**sender.status(), "clock": clock.status()}), file=sys.stderr)
    return 0


def _receive(args: argparse.Namespace) -> int:
    import soundfile as sf
    from echoel.daemon.aes67_receiver import Aes67Receiver, ReceiverConfig
    from echoel.drivers.sap import SapBrowser
    from echoel.drivers.sdp_aes67 import parse_sdp
    if bool(args.sdp) == bool(args.name):
        raise ValueError("give either --sdp FILE or --name NAME (an announced stream)")
    if args.sdp:
        stream = parse_sdp(Path(args.sdp).read_text())
    else:
        b = SapBrowser(iface=args.iface).open()
        try:
            end = time.monotonic() + args.wait
            found = None
            while found is None and time.monotonic() < end:
                b.listen(0.2)
                found = b.find(args.name)
        finally:
            b.close()
        if found is None:
            raise TimeoutError(f"no stream named {args.name!r} announced within {args.wait:g} "
                               "s (see `echoel streams list`)")
        stream = found.stream
    clock = _clock(args.run_dir, stream.rate)
    out = sf.SoundFile(args.out, "w", stream.rate, stream.channels, "PCM_24")
    started = [False]

    def sink(block: np.ndarray, _index: int) -> None:
        if not started[0] and not block.any():
            return  # nothing received yet: no leading silence in the file
        started[0] = True
        out.write(block)

    rx = Aes67Receiver(stream, clock, sink, ReceiverConfig(latency_ms=args.latency_ms,
                                                          iface=args.iface))
    stop = _stop_event(args.duration)
    print(f"receiving {stream.name!r} from {stream.address}:{stream.port} into {args.out}",
          file=sys.stderr, flush=True)
    shorten_gil_switch()
    rx.start()
    try:
        while not stop.wait(0.25):
            clock.refresh()
    finally:
        rx.close()
        out.close()
    st = rx.status()
    print(json.dumps(st) if args.json else
          f"received {st['received']} packets, lost {st['lost']}, late {st['late']}, "
          f"duplicate {st['duplicate']}, malformed {st['malformed']}, mismatched "
          f"{st['wrong_payload_type'] + st['wrong_size'] + st['wrong_ssrc']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m echoel.daemon.streams_cli ...` (the same as `echoel streams ...`)."""
    ap = argparse.ArgumentParser(prog="echoel")
    add_streams_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["streams", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
