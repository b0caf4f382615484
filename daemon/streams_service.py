"""The streams service (`echoel streams serve`): the configured AES67 senders and receivers.

Each [[streams]] table is one stream. A sender reads an engine tap (never the real-time thread:
the tap's shared-memory ring) and sends it paced by the PTP media clock, announced by SAP; the
senders of one rate and packet time share one paced thread (SCHED_FIFO where allowed). A
receiver subscribes by SDP file, by the name another device announces (SAP), or by the address
and format given in the table; it plays out into a ring `echoel.INSTANCE.ring.stream.NAME`:
the engine's own (made by its supervisor for every receive stream of its config; blocks of
period x channels_in, mixed into the engine's input by the audio thread), or, where no engine
runs (a standalone service), one it makes itself (period x the stream's channels).

Four times a second it publishes `status.streams` on ipc://{run_dir}/bus-streams.sock: the
media clock, and per stream its counters, interval figures and SDP; `event.streams` when a
stream starts, stops, is (re)subscribed or fails. SDPs are also written to
{run_dir}/streams/NAME.sdp (for ffmpeg, or a technician).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import zmq
from echoel.daemon import bus, shm_segment
from echoel.daemon import config as config_mod
from echoel.daemon.aes67_receiver import Aes67Receiver, ReceiverConfig, channel_sink, ring_sink
from echoel.daemon.aes67_sender import Aes67Sender, SenderConfig, SenderGroup
from echoel.daemon.aes67_sources import RingSource
from echoel.daemon.config import ConfigError, Key
from echoel.daemon.engine_shared import return_ring
from echoel.daemon.media_clock import ClockBusSource, MediaClock, shorten_gil_switch
from echoel.daemon.spsc_ring import Ring
from echoel.drivers.sap import SAP_GROUP, SapAnnouncer, SapBrowser
from echoel.drivers.sdp_aes67 import SdpError, StreamSdp, build_sdp, check_stream, parse_sdp
from echoel.drivers.udp_multicast import dscp_value, source_address

log = logging.getLogger("echoel.streams")
PUBLISH_S = 0.25
CLOCK_REFRESH_S = 0.25
MAX_STREAMS = 16
OUT_RING_SLOTS = 64

KEYS: dict[str, Key] = {
    "name": Key(str, "", "stream name (the SDP's s= line; unique; letters, digits, '_', '-', "
                "' ')"),
    "direction": Key(str, "send", "send a tap, or receive into a ring", choices=("send",
                                                                                 "receive")),
    "tap": Key(str, "", "send: the engine tap ([[taps]] name) whose audio is sent"),
    "address": Key(str, "", "destination (send) or source (receive) IPv4 address, usually "
                   "multicast 239.x.y.z; receive: empty when sdp_file or source is given"),
    "port": Key(int, 5004, "UDP port", 1, 65535),
    "channels": Key(int, 2, "channels in the stream (send: the first of the tap's)", 1, 8),
    "encoding": Key(str, "L24", "sample encoding", choices=("L24", "L16")),
    "rate": Key(int, 48000, "sample rate (Hz); a sender's must be the engine's", choices=(48000,
                                                                                        96000)),
    "ptime_us": Key(int, 1000, "packet time (us): 1000 (AES67 default) or 125", choices=(125,
                                                                                         250,
                                                                                         1000)),
    "ttl": Key(int, 32, "multicast TTL", 1, 255),
    "dscp": Key(str, "AF41", "DSCP of the media packets: a name (AF41, EF, CS6...) or 0-63"),
    "latency_ms": Key(float, 5.0, "receive: playout delay after the media clock (ms)", 0.25,
                      2000.0),
    "sdp_file": Key(str, "", "receive: an SDP file describing the stream"),
    "source": Key(str, "", "receive: the name (s=) of a stream announced by SAP"),
    "interface": Key(str, "", "IPv4 address of the interface to send/join on; empty: the "
                     "routing table's choice (a 224.0.0.0/4 route)"),
    "announce": Key(bool, True, "send: announce the stream by SAP every 30 s"),
}


def check_streams(where: str, raw: Any, taps: list[dict] | None = None,
                  engine_rate: int | None = None) -> list[dict[str, Any]]:
    """Validate a [[streams]] array; ConfigError naming the stream, the key and the value."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_STREAMS:
        raise ConfigError(f"{where}: [[streams]] must be a list of at most {MAX_STREAMS} "
                          f"tables, got {raw!r:.80}")
    out = [config_mod.check_table(f"{where} stream {i}", "streams", t, {"streams": KEYS})
           for i, t in enumerate(raw)]
    names = set()
    tap_names = {t["name"] for t in taps or []}
    for i, s in enumerate(out):
        w = f"{where} stream {i} [streams]"
        n = s["name"]
        if not n or not n.replace("_", "").replace("-", "").replace(" ", "").isalnum():
            raise ConfigError(f"{w}: name = {n!r}: use letters, digits, '_', '-' or spaces")
        if n in names:
            raise ConfigError(f"{w}: name = {n!r}: stream names must be unique")
        names.add(n)
        try:
            dscp_value(s["dscp"])
        except ValueError as exc:
            raise ConfigError(f"{w}: dscp = {s['dscp']!r}: {exc}") from None
        if s["direction"] == "send":
            if not s["tap"]:
                raise ConfigError(f"{w}: tap = '': a sender needs the engine tap it sends")
            if taps is not None and s["tap"] not in tap_names:
                raise ConfigError(f"{w}: tap = {s['tap']!r}: no such [[taps]]; add [[taps]] "
                                  f"name = \"{s['tap']}\" source = \"output\"")
            if engine_rate is not None and s["rate"] != engine_rate:
                raise ConfigError(f"{w}: rate = {s['rate']}: a sender runs at the engine's "
                                  f"rate ({engine_rate})")
        given = [k for k in ("address", "sdp_file", "source") if s[k]]
        if s["direction"] == "send" and not s["address"]:
            raise ConfigError(f"{w}: address = '': a sender needs a destination address")
        if s["direction"] == "receive" and len(given) != 1:
            raise ConfigError(f"{w}: give exactly one of address, sdp_file, source; got "
                              f"{', '.join(given) or 'none'}")
        try:
            check_stream(StreamSdp(name=n, address=s["address"] or "239.0.0.1",
                                   port=s["port"], channels=s["channels"],
                                   encoding=s["encoding"], rate=s["rate"],
                                   ptime_us=s["ptime_us"], ttl=s["ttl"]))
        except SdpError as exc:
            raise ConfigError(f"{w}: {exc}") from None
    return out


class StreamsService:
    """The senders and receivers of one box; see the module docstring."""

    def __init__(self, cfg: config_mod.Config, streams: list[dict[str, Any]],
                 clock: MediaClock | None = None) -> None:
        self.cfg = cfg
        e = cfg["engine"]
        self.rate, self.period = e["rate"], e["period"]
        self.instance = cfg["daemon"]["instance"]
        self.rdir = bus.run_dir(cfg["daemon"]["run_dir"])
        self.sdp_dir = self.rdir / "streams"
        self.sdp_dir.mkdir(parents=True, exist_ok=True)
        self._clock_src = None
        if clock is None:
            self._clock_src = ClockBusSource(str(self.rdir))
            clock = MediaClock(self.rate, self._clock_src)
        self.clock = clock
        self.specs = streams
        self.senders: dict[str, Aes67Sender] = {}
        self.groups: list[SenderGroup] = []
        self.receivers: dict[str, Aes67Receiver] = {}
        self.out_rings: dict[str, Ring] = {}
        self.engine_rings: set[str] = set()  # out rings that are the engine's (not ours)
        self.errors: dict[str, str] = {}
        self.pending: dict[str, dict] = {}  # receivers waiting for their SAP announcement
        self.announcer: SapAnnouncer | None = None
        self.browser: SapBrowser | None = None
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"ipc://{self.rdir}/bus-streams.sock")
        self.stopping = False

    # ------------------------------------------------------------------ set-up
    def _event(self, kind: str, **fields: Any) -> None:
        self.pub.send_multipart([b"event.streams",
                                 json.dumps({"event": kind, **fields}).encode()])

    def _start_sender(self, s: dict) -> None:
        tap_ch = config_mod.tap_channels(self.cfg, s["tap"], "streams", "output")
        if s["channels"] > tap_ch:
            raise ConfigError(f"stream {s['name']!r}: channels = {s['channels']}: the tap "
                              f"{s['tap']!r} carries {tap_ch}")
        path = shm_segment.segment_path(self.instance, "ring.tap." + s["tap"])
        source = RingSource(path, tap_ch, self.period, self.rate,
                            mono_to_ptp=self.clock.mono_to_ptp)
        iface = s["interface"] or None
        dscp = int(s["dscp"]) if s["dscp"].isdigit() else s["dscp"]
        sc = SenderConfig(name=s["name"], address=s["address"], port=s["port"],
                          channels=s["channels"], encoding=s["encoding"], rate=s["rate"],
                          ptime_us=s["ptime_us"], ttl=s["ttl"], dscp=dscp, iface=iface,
                          origin=iface)
        snd = Aes67Sender(sc, source, self.clock)
        self.senders[s["name"]] = snd  # started with its group (start())
        if s["announce"]:
            if self.announcer is None:
                self.announcer = SapAnnouncer(iface or source_address(SAP_GROUP), s["ttl"],
                                              iface)
            self.announcer.announce(s["name"], snd.sdp())
        self._event("started", name=s["name"], direction="send")

    def _stream_of(self, s: dict) -> StreamSdp | None:
        if s["sdp_file"]:
            try:
                text = Path(s["sdp_file"]).read_text()
            except OSError as exc:
                raise ConfigError(f"stream {s['name']!r}: sdp_file = {s['sdp_file']!r}: "
                                  f"{exc.strerror}") from None
            try:
                return parse_sdp(text)
            except SdpError as exc:
                raise ConfigError(f"stream {s['name']!r}: sdp_file {s['sdp_file']}: {exc}") \
                    from None
        if s["source"]:
            found = self.browser.find(s["source"]) if self.browser else None
            return found.stream if found else None
        return StreamSdp(name=s["name"], address=s["address"], port=s["port"],
                         channels=s["channels"], encoding=s["encoding"], rate=s["rate"],
                         ptime_us=s["ptime_us"])

    def _start_receiver(self, s: dict) -> bool:
        st = self._stream_of(s)
        if st is None:
            return False
        if st.rate != self.rate:
            raise ConfigError(f"stream {s['name']!r}: the stream runs at {st.rate} Hz, the "
                              f"engine at {self.rate}: no sample-rate conversion")
        ring = self.out_rings.get(s["name"])
        path = shm_segment.segment_path(self.instance, "ring." + return_ring(s["name"]))
        if ring is None and path.exists():
            # the engine's return (made by its supervisor): the stream plays into the
            # engine's input, channel c into input c
            ring = Ring.attach(path)
            self.engine_rings.add(s["name"])
            self.out_rings[s["name"]] = ring
        elif ring is None or ring.width != self.period * st.channels:
            ring = Ring.create(path, OUT_RING_SLOTS, self.period * st.channels)
            self.out_rings[s["name"]] = ring
        sink = ring_sink(ring) if s["name"] not in self.engine_rings else \
            channel_sink(ring, self.period, ring.width // self.period)
        rx = Aes67Receiver(st, self.clock, sink,
                           ReceiverConfig(latency_ms=s["latency_ms"], period=self.period,
                                          iface=s["interface"] or None))
        rx.start()
        self.receivers[s["name"]] = rx
        self._event("started", name=s["name"], direction="receive",
                    source=f"{st.address}:{st.port}", stream=st.name)
        return True

    def start(self) -> None:
        """Start every stream; one that fails is reported (status, event), the others run."""
        by_name = [s for s in self.specs if s["direction"] == "receive" and s["source"]]
        if by_name and self.browser is None:
            iface = next((s["interface"] for s in by_name if s["interface"]), None)
            try:
                self.browser = SapBrowser(iface=iface).open()
            except OSError as exc:
                for s in by_name:
                    self.errors[s["name"]] = f"cannot listen to SAP announcements: {exc}"
                self.specs = [s for s in self.specs if s not in by_name]
        for s in self.specs:
            try:
                if s["direction"] == "send":
                    self._start_sender(s)
                elif not self._start_receiver(s):
                    self.pending[s["name"]] = s
            except (ConfigError, ValueError, OSError) as exc:
                self.errors[s["name"]] = str(exc)
                log.error("stream %r: %s", s["name"], exc)
                self._event("failed", name=s["name"], error=str(exc))
        # one paced thread per rate and packet time drives all its senders
        by_timing: dict[tuple[int, int], list[Aes67Sender]] = {}
        for snd in self.senders.values():
            by_timing.setdefault((snd.cfg.rate, snd.frames), []).append(snd)
        for group in by_timing.values():
            g = SenderGroup(group)
            g.start()
            self.groups.append(g)

    # ------------------------------------------------------------------ running
    def _tick(self) -> None:
        self.clock.refresh()
        if self.browser is not None:
            self.browser.poll()
            for name, s in list(self.pending.items()):
                try:
                    if self._start_receiver(s):
                        del self.pending[name]
                except (ConfigError, ValueError, OSError) as exc:
                    self.errors[name] = str(exc)
                    del self.pending[name]
        if self.announcer is not None:
            for name, snd in self.senders.items():
                if name in self.announcer.sdps:
                    self.announcer.announce(name, snd.sdp())  # new grandmaster: new SDP
            self.announcer.tick()

    def status(self) -> dict:
        """The published status."""
        rows = []
        for snd in self.senders.values():
            rows.append({**snd.status(), "sdp": snd.sdp()})
        for name, rx in self.receivers.items():
            rows.append({**rx.status(), "sdp": build_sdp(rx.stream),
                         "ring": str(self.out_rings[name].path),
                         "ring_overflows": self.out_rings[name].overflows})
        for name in self.pending:
            rows.append({"name": name, "direction": "receive", "state": "waiting for SAP "
                         f"announcement of {self.pending[name]['source']!r}"})
        for name, err in self.errors.items():
            rows.append({"name": name, "state": "failed", "error": err})
        return {"clock": self.clock.status(), "streams": rows,
                "sap": None if self.browser is None else {
                    "streams": len(self.browser.streams), "refused": self.browser.refused,
                    "last_error": self.browser.last_error}}

    def _write_sdps(self) -> None:
        for name, snd in self.senders.items():
            p = self.sdp_dir / f"{name.replace(' ', '_')}.sdp"
            text = snd.sdp()
            if not p.exists() or p.read_text() != text:
                tmp = p.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(p)

    def run(self, duration: float | None = None) -> int:
        """Run until SIGTERM/SIGINT or `duration` seconds; stops every stream on the way out."""
        import threading
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *a: setattr(self, "stopping", True))
            signal.signal(signal.SIGINT, lambda *a: setattr(self, "stopping", True))
        shorten_gil_switch()
        self.start()
        end = None if duration is None else time.monotonic() + duration
        next_pub = 0.0
        try:
            while not self.stopping and (end is None or time.monotonic() < end):
                self._tick()
                now = time.monotonic()
                if now >= next_pub:
                    next_pub = now + PUBLISH_S
                    self._write_sdps()
                    self.pub.send_multipart([b"status.streams",
                                             json.dumps(self.status()).encode()])
                time.sleep(CLOCK_REFRESH_S / 2)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        """Stop every stream, delete the SAP announcements, release sockets and rings."""
        for g in self.groups:
            g.stop()
        self.groups.clear()
        for name, snd in self.senders.items():
            snd.close()
            self._event("stopped", name=name, direction="send")
            (self.sdp_dir / f"{name.replace(' ', '_')}.sdp").unlink(missing_ok=True)
        for name, rx in self.receivers.items():
            rx.close()
            self._event("stopped", name=name, direction="receive")
        self.senders.clear()
        self.receivers.clear()
        if self.announcer is not None:
            self.announcer.close()
            self.announcer = None
        if self.browser is not None:
            self.browser.close()
            self.browser = None
        for name, ring in self.out_rings.items():
            if name not in self.engine_rings:
                shm_segment.remove(ring.path)
        self.out_rings.clear()
        if self._clock_src is not None:
            self._clock_src.close()
            self._clock_src = None
        self.pub.close()


ARRAY = True  # [[streams]] is an array of tables


def check(raw: Any, where: str = "<config>") -> list[dict[str, Any]]:
    """[[streams]] on its own (the taps and the rate are checked by `cross_check`)."""
    return check_streams(where, raw)


def cross_check(cfg: config_mod.Config) -> None:
    """Each stream against the engine it belongs to: its tap exists, its rate is the engine's."""
    check_streams(cfg.source, cfg["streams"], cfg["taps"], cfg["engine"]["rate"])


def load(path: str | Path) -> tuple[config_mod.Config, list[dict[str, Any]]]:
    """The box config and its validated [[streams]] from one TOML file."""
    cfg = config_mod.load(path)
    return cfg, cfg["streams"]
