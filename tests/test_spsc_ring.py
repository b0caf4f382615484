"""The lock-free single-producer/single-consumer ring (daemon/spsc_ring.py) in shared memory.

In-process tests cover order, meta, overflow and skip_to_latest; the cross-process tests run
the consumer as a separate Python process that maps the segment through ECHOEL_SHM_DIR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from echoel.daemon import shm_segment
from echoel.daemon.spsc_ring import Ring

WIDTH = 32
STRIDE = 1_000_003


def payload(k: int, width: int = WIDTH) -> np.ndarray:
    """Record k's contents: every value depends on k and on its position."""
    return k * STRIDE + np.arange(width, dtype=np.int64)


@pytest.fixture
def shm_dir():
    """A private folder in /dev/shm (tmpfs, as on the box), removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="echoel-test-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- in process

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_fifo_order_and_meta(dtype):
    ring = Ring.private(8, 5, dtype)
    assert (ring.slots, ring.width, ring.dtype) == (8, 5, np.dtype(dtype))
    dst = np.zeros(5, dtype)
    assert ring.pop(dst) is None and ring.fill == 0
    for k in range(6):
        assert ring.push(np.arange(5, dtype=dtype) + 10 * k, 1_000_000_000 * k + 7)
    assert ring.fill == 6 and ring.pushed == 6 and ring.overflows == 0
    for k in range(6):
        meta = ring.pop(dst)
        assert meta == (k, 1_000_000_000 * k + 7)
        np.testing.assert_array_equal(dst, np.arange(5) + 10 * k)
    assert ring.pop(dst) is None and ring.fill == 0


def test_wraps_around_many_times():
    ring = Ring.private(4, WIDTH, np.int64)
    dst = np.zeros(WIDTH, np.int64)
    k_push = k_pop = 0
    rng = np.random.default_rng(2)
    for _ in range(500):
        for _ in range(int(rng.integers(0, 5))):
            if ring.fill < ring.slots:
                assert ring.push(payload(k_push), k_push)
                k_push += 1
        for _ in range(int(rng.integers(0, 5))):
            meta = ring.pop(dst)
            if meta is None:
                assert k_pop == k_push
                break
            assert meta == (k_pop, k_pop)
            np.testing.assert_array_equal(dst, payload(k_pop))
            k_pop += 1
    assert k_push > 100 * ring.slots
    assert ring.overflows == 0 and ring.pushed == k_push


def test_full_ring_drops_and_counts_without_blocking():
    ring = Ring.private(16, WIDTH, np.int64)
    results = [ring.push(payload(k), k) for k in range(16)]
    assert all(results) and ring.fill == 16
    t0 = time.monotonic()
    dropped = [ring.push(payload(100 + k), 100 + k) for k in range(50_000)]
    elapsed = time.monotonic() - t0
    assert not any(dropped)
    assert elapsed < 10.0  # never waits for the consumer (a few tens of ms in practice)
    assert ring.overflows == 50_000 and ring.pushed == 16 and ring.fill == 16
    dst = np.zeros(WIDTH, np.int64)
    # the accepted records are intact: dropped pushes wrote nothing
    assert ring.pop(dst) == (0, 0)
    np.testing.assert_array_equal(dst, payload(0))
    # room for one again: the next record is accepted and numbered after the accepted ones
    assert ring.push(payload(999), 999)
    assert not ring.push(payload(1000), 1000)
    assert ring.overflows == 50_001
    for k in range(1, 16):
        assert ring.pop(dst) == (k, k)
        np.testing.assert_array_equal(dst, payload(k))
    assert ring.pop(dst) == (16, 999)
    np.testing.assert_array_equal(dst, payload(999))
    assert ring.pop(dst) is None


def test_skip_to_latest():
    ring = Ring.private(8, WIDTH, np.int64)
    dst = np.zeros(WIDTH, np.int64)
    assert ring.skip_to_latest() == 0
    for k in range(5):
        ring.push(payload(k), k)
    ring.pop(dst)
    assert ring.skip_to_latest() == 4
    assert ring.fill == 0 and ring.pop(dst) is None
    ring.push(payload(5), 55)
    assert ring.pop(dst) == (5, 55)
    np.testing.assert_array_equal(dst, payload(5))
    # skipping frees the room: a full ring accepts again after a skip
    for k in range(6, 14):
        assert ring.push(payload(k), k)
    assert not ring.push(payload(14), 14)
    assert ring.skip_to_latest() == 8
    assert ring.push(payload(15), 15)
    assert ring.pop(dst) == (14, 15)
    np.testing.assert_array_equal(dst, payload(15))
    assert ring.overflows == 1 and ring.pushed == 15


def test_records_of_any_shape_are_flattened():
    ring = Ring.private(4, 8, np.float64)  # e.g. meters: float64[4, 2]
    m = np.arange(8.0).reshape(4, 2)
    ring.push(m, 3)
    out = np.zeros((4, 2))
    assert ring.pop(out) == (0, 3)
    np.testing.assert_array_equal(out, m)


def test_create_attach_share_one_ring(shm_dir):
    path = shm_dir / "echoel.t.ring"
    prod = Ring.create(path, 8, WIDTH, np.int64)
    cons = Ring.attach(path)
    try:
        assert (cons.slots, cons.width, cons.dtype) == (8, WIDTH, np.dtype(np.int64))
        assert path.stat().st_size == 512 + 8 * 16 + 8 * WIDTH * 8
        dst = np.zeros(WIDTH, np.int64)
        for k in range(3):
            assert prod.push(payload(k), 10 + k)
        assert cons.fill == 3
        for k in range(3):
            assert cons.pop(dst) == (k, 10 + k)
            np.testing.assert_array_equal(dst, payload(k))
        assert prod.fill == 0  # the producer sees the consumer's progress
    finally:
        cons.close()
        prod.close()
        shm_segment.remove(path)
    assert not path.exists()


def test_attach_rejects_missing_and_foreign_files(shm_dir):
    with pytest.raises(FileNotFoundError):
        Ring.attach(shm_dir / "echoel.t.nothing")
    junk = shm_dir / "echoel.t.junk"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="bad magic"):
        Ring.attach(junk)


def test_segment_names():
    with pytest.raises(ValueError):
        shm_segment.segment_path("a/b", "ring")
    assert shm_segment.segment_path("box1", "meters").name == "echoel.box1.meters"


# --------------------------------------------------------------------------- across processes

CONSUMER = r"""
import os, random, sys, time
import numpy as np
from echoel.daemon import shm_segment
from echoel.daemon.spsc_ring import Ring

instance, name, out, ready, done, seed, mode = sys.argv[1:8]
path = shm_segment.segment_path(instance, name)   # resolved through ECHOEL_SHM_DIR
ring = Ring.attach(path)
rng = random.Random(int(seed))
width, stride = ring.width, int(os.environ["STRIDE"])
dst = np.zeros(width, ring.dtype)
cols = np.arange(width, dtype=np.int64)
seqs, nums, bad = [], [], 0
assert ring.pop(dst) is None  # compile (or load) the kernel before saying ready
open(ready, "w").write(str(path))
first = True
while True:
    finished = os.path.exists(done)  # looked at before the pop that finds the ring empty
    meta = ring.pop(dst)
    if meta is None:
        if finished:
            break
        continue  # spin: catch the producer mid-write if it ever publishes too early
    seq, t = meta
    k = int(dst[0]) // stride
    if not (dst == k * stride + cols).all() or t != k:
        bad += 1
    seqs.append(seq)
    nums.append(k)
    if mode == "slow":
        time.sleep(0.001)
    elif first:
        time.sleep(0.05)  # fall behind once for sure
    elif rng.random() < 0.02:
        time.sleep(rng.uniform(0.0, 0.003))
    first = False
np.savez(out, seqs=np.array(seqs, np.int64), nums=np.array(nums, np.int64), bad=bad)
"""


def start_consumer(shm_dir: Path, instance: str, name: str, mode: str = "random"):
    out, ready, done = shm_dir / "out.npz", shm_dir / "ready", shm_dir / "done"
    env = {**os.environ, "ECHOEL_SHM_DIR": str(shm_dir), "STRIDE": str(STRIDE)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, instance, name, str(out), str(ready), str(done),
         "1234", mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    end = time.monotonic() + 120.0  # importing numba on a loaded machine can be slow
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"consumer exited: {proc.stdout.read().decode()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("consumer did not attach within 120 s")
        time.sleep(0.01)
    return proc, out, ready, done


def test_consumer_in_another_process_gets_every_accepted_record_intact(shm_dir):
    instance, name = f"t{uuid.uuid4().hex[:8]}", "records"
    path = shm_dir / f"echoel.{instance}.{name}"
    width = 2048  # long records: a wide window for a torn read, if the ordering were wrong
    ring = Ring.create(path, 64, width, np.int64)
    proc, out, ready, done = start_consumer(shm_dir, instance, name)
    try:
        assert ready.read_text() == str(path)  # ECHOEL_SHM_DIR redirected the segment
        n = 20_000
        accepted = np.zeros(n, bool)
        for k in range(n):
            accepted[k] = ring.push(payload(k, width), k)
            if k >= 2000 and k % 100 == 0:
                time.sleep(0.0005)  # sometimes the consumer catches up and finds it empty
        done.touch()
        assert proc.wait(timeout=120) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = np.load(out)
    seqs, nums, bad = res["seqs"], res["nums"], int(res["bad"])
    received = len(seqs)
    assert bad == 0, f"{bad} torn or mismatched records"
    assert (np.diff(seqs) > 0).all() and (np.diff(nums) > 0).all()
    np.testing.assert_array_equal(seqs, np.arange(received))  # no accepted record lost
    np.testing.assert_array_equal(nums, np.nonzero(accepted)[0])
    assert received + ring.overflows == n
    assert ring.pushed == received and ring.fill == 0
    assert ring.overflows > 0 and received > 4 * ring.slots  # both paths were exercised
    ring.close()
    shm_segment.remove(path)


def test_dead_consumer_does_not_stop_the_producer(shm_dir):
    instance, name = f"t{uuid.uuid4().hex[:8]}", "records"
    path = shm_dir / f"echoel.{instance}.{name}"
    ring = Ring.create(path, 64, WIDTH, np.int64)
    proc, _, _, _ = start_consumer(shm_dir, instance, name, mode="slow")
    try:
        k = 0
        while ring.overflows == 0:  # the slow consumer falls behind; the ring fills
            ring.push(payload(k), k)
            k += 1
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = ring.overflows
    t0 = time.monotonic()
    m = 100_000
    results = [ring.push(payload(k + i), k + i) for i in range(m)]
    elapsed = time.monotonic() - t0
    assert elapsed < 20.0  # no waiting on the dead reader (well under a second in practice)
    assert not any(results)
    assert ring.overflows == before + m and ring.fill == ring.slots
    assert ring.pushed + ring.overflows == k + m
    # a new consumer (after the engine's restart of its reader) picks up where it stopped
    cons = Ring.attach(path)
    dst = np.zeros(WIDTH, np.int64)
    first = cons.pop(dst)
    assert first is not None
    seq, t = first
    assert seq == ring.pushed - ring.slots  # the oldest record still waiting
    np.testing.assert_array_equal(dst, payload(t))
    assert cons.skip_to_latest() == ring.slots - 1
    assert ring.push(payload(10**6), 10**6)
    assert cons.pop(dst) == (ring.pushed - 1, 10**6)
    np.testing.assert_array_equal(dst, payload(10**6))
    cons.close()
    ring.close()
    shm_segment.remove(path)
