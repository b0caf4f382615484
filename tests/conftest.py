"""Shared fixtures: a JACK dummy server with the rig's PCMs, per module."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from echoel.drivers.jack_server import clear_stale_shm
from rig import Rig

# Modules whose tests open JACK clients in this process (the harness) run first: threads that
# other libraries leave in the test process (zmq's I/O threads were seen to) make the JACK
# plugin's clients in this process never start capturing.
IN_PROCESS_JACK_FIRST = ("test_engine_jack.py", "test_bio_engine.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the in-process JACK modules before the rest (stable order otherwise)."""
    items.sort(key=lambda it: 0 if Path(str(it.fspath)).name in IN_PROCESS_JACK_FIRST else 1)


def pytest_sessionstart(session) -> None:
    """JACK servers killed in earlier runs leave their registry slots taken (8 in all): free
    them while no jackd runs and before this process has any JACK client."""
    clear_stale_shm()


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile the engine's kernels once (numba caches them), before any daemon starts:
    a cold compile takes tens of seconds on a busy machine."""
    from echoel.daemon import config
    from echoel.daemon.rt_loop import precompile

    for fmt in ("FLOAT_LE", "S16_LE", "S32_LE"):
        precompile(config.defaults().with_value("engine.format", fmt))


@pytest.fixture(scope="module")
def rig():
    """A JACK dummy server with box_cap/box_play/h_play/h_cap, patched."""
    if not shutil.which("jackd"):
        pytest.fail("jackd is missing: run `make setup` (installs jackd2)")
    r = Rig.start()
    yield r
    r.stop()
