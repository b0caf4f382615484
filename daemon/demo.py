"""`echoel demo` (`make run`): the box's stack on this machine, on a JACK dummy device.

Starts a JACK server on the dummy backend (paced in real time, no hardware), writes ALSA
`jack` PCMs for the engine, starts a player of generated music patched into the engine's
input, patches the engine's output to the server's (dummy) playback, starts a fleet on
loopback (CA, mosquitto with TLS, the fleet service, this box's agent), runs the daemon with a
live status, and stops everything it started on Ctrl-C or after --duration.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from echoel.daemon import bus, demo_network
from echoel.daemon import config as config_mod
from echoel.daemon.demo_fleet import DemoFleet
from echoel.daemon.demo_network import DemoNetwork
from echoel.daemon.demo_services import DemoServices, with_service_taps
from echoel.daemon.status_view import LiveView
from echoel.daemon.supervisor import Supervisor, write_summary
from echoel.drivers.jack_server import (
    JackServer,
    Patchbay,
    alsa_env,
    clear_stale_shm,
    jack_pcm_conf,
)

log = logging.getLogger("echoel.demo")
CAP, PLAY, DEMO = "echoel_cap", "echoel_play", "echoel_demo"


def demo_config(base: config_mod.Config) -> config_mod.Config:
    """The base config pointed at the JACK PCMs (float samples, as JACK gives)."""
    cfg = base.with_value("engine.capture_device", CAP)
    cfg = cfg.with_value("engine.playback_device", PLAY)
    return cfg.with_value("engine.format", "FLOAT_LE")


def run_demo(base: config_mod.Config, duration: float | None, show: bool,
             summary_path: str | None, config_path: str | None = None) -> dict:
    """Run the whole demo stack; returns the daemon's summary."""
    cfg = with_service_taps(demo_config(base))
    if demo_network.unavailable() is None:
        cfg = with_service_taps(cfg, [demo_network.TAP])  # the AES67 sender's
    e = cfg["engine"]
    rdir = bus.run_dir(cfg["daemon"]["run_dir"])
    conf = rdir / "asound-demo.conf"
    conf.write_text(jack_pcm_conf({CAP: ("capture", e["channels_in"]),
                                   PLAY: ("playback", e["channels_out"]),
                                   DEMO: ("playback", e["channels_in"])}))
    server_name = f"echoel-{cfg['daemon']['instance']}"
    os.environ.update(alsa_env(conf, server_name))
    clear_stale_shm()
    jack = JackServer(server_name, e["rate"], e["period"], log_path=rdir / "jackd.log")
    jack.start()
    player = None
    patch = None
    fleet = None
    services = None
    network = None
    try:
        player = subprocess.Popen([sys.executable, "-m", "echoel.daemon.demo_player",
                                   "--pcm", DEMO, "--rate", str(e["rate"]),
                                   "--period", str(e["period"]),
                                   "--channels", str(e["channels_in"])])
        pairs = [(f"{DEMO}:out_{i:03d}", f"{CAP}:in_{i:03d}") for i in range(e["channels_in"])]
        pairs += [(f"{PLAY}:out_{i:03d}", f"system:playback_{i + 1}")
                  for i in range(min(e["channels_out"], 2))]
        patch = Patchbay(jack, pairs)
        patch.start()
        fleet = DemoFleet(rdir / "fleet", cfg)
        fleet.start()
        services = DemoServices(rdir / "services", cfg)
        services.start()
        network = DemoNetwork(rdir / "network", rdir / "services" / "services.toml")
        network.start()
        sup = Supervisor(cfg, config_path)
        sup.start()
        view = LiveView() if show else None

        def on_status(status: dict) -> None:
            status["extra_lines"] = services.lines() + network.lines(services.latest) + \
                fleet.lines()
            view.update(status)

        summary = sup.run(duration, on_status=on_status if view else None)
        if summary_path:
            write_summary(summary_path, summary)
        return summary
    finally:
        if network:
            network.stop()
        if services:
            services.stop()
        if fleet:
            fleet.stop()
        if patch:
            patch.stop()
        if player:
            player.terminate()
            player.wait()
        jack.stop()
