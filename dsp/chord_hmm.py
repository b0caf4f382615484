"""Viterbi decoding of an HMM with a self-transition prior: offline and fixed-lag streaming.

Transitions: stay with probability p, or move to any other state with (1 - p) / (K - 1).
With this structure one step costs O(K): the best predecessor of a state is itself or the
best state overall. Scores are log-probabilities; the running scores are shifted so that their
maximum is 0 after every frame (no drift over hours).

Fixed-lag decoding keeps the last `lag` frames of back-pointers in a ring; after frame t it
backtracks from the best current state and emits the state of frame t - lag. The streaming
decision can differ from the offline one only where the best path changed more than `lag`
frames back. numba kernels, no allocation.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# ints slots of the fixed-lag decoder
L_SEEN, L_EMITTED = 0, 1


def transition_logs(stay: float, n_states: int) -> tuple[float, float]:
    """(log p_stay, log p_switch) of the self-transition prior."""
    if not 0.0 < stay < 1.0:
        raise ValueError(f"hmm: self-transition probability {stay}; allowed (0, 1)")
    if n_states < 2:
        raise ValueError(f"hmm: {n_states} states; need at least 2")
    return math.log(stay), math.log((1.0 - stay) / (n_states - 1))


@numba.njit(nogil=True, cache=True)
def _step(logp, delta, bp_row, l_stay, l_switch):
    """One Viterbi step over frame scores logp[K]; delta updated in place; back-pointers in
    bp_row."""
    k_n = delta.shape[0]
    best = 0
    for k in range(1, k_n):
        if delta[k] > delta[best]:
            best = k
    sw = delta[best] + l_switch
    top = -math.inf
    for k in range(k_n):
        s = delta[k] + l_stay
        if s >= sw:
            bp_row[k] = k
        else:
            s = sw
            bp_row[k] = best
        v = s + logp[k]
        delta[k] = v
        if v > top:
            top = v
    for k in range(k_n):
        delta[k] -= top


@numba.njit(nogil=True, cache=True)
def viterbi_offline(logp, l_stay, l_switch, delta, bp, path):
    """Best state path for frame scores logp[F, K] into path[F] (int64); delta[K] and
    bp[F, K] (int32) are work arrays."""
    f_n, k_n = logp.shape
    if f_n == 0:
        return
    top = -math.inf
    for k in range(k_n):
        delta[k] = logp[0, k]
        if delta[k] > top:
            top = delta[k]
    for k in range(k_n):
        delta[k] -= top
    for f in range(1, f_n):
        _step(logp[f], delta, bp[f], l_stay, l_switch)
    s = 0
    for k in range(1, k_n):
        if delta[k] > delta[s]:
            s = k
    path[f_n - 1] = s
    for f in range(f_n - 1, 0, -1):
        s = bp[f, s]
        path[f - 1] = s


@numba.njit(nogil=True, cache=True)
def fixed_lag_step(logp, delta, bp, ints, l_stay, l_switch):
    """Add one frame's scores logp[K]. bp: int32[lag + 1, K] ring. Returns the decided state
    of frame (frames seen - 1 - lag), or -1 while fewer than lag + 1 frames were seen."""
    ring = bp.shape[0]
    lag = ring - 1
    t = ints[L_SEEN]
    k_n = delta.shape[0]
    if t == 0:
        top = -math.inf
        for k in range(k_n):
            delta[k] = logp[k]
            if delta[k] > top:
                top = delta[k]
        for k in range(k_n):
            delta[k] -= top
            bp[0, k] = k
    else:
        _step(logp, delta, bp[t % ring], l_stay, l_switch)
    ints[L_SEEN] = t + 1
    if t < lag:
        return -1
    s = 0
    for k in range(1, k_n):
        if delta[k] > delta[s]:
            s = k
    for j in range(t, t - lag, -1):
        s = bp[j % ring, s]
    ints[L_EMITTED] += 1
    return s


@numba.njit(nogil=True, cache=True)
def fixed_lag_flush(delta, bp, ints, out):
    """End of stream: the states of the frames not yet decided, oldest first, into out
    (int64, at least lag long). Returns how many."""
    ring = bp.shape[0]
    t = ints[L_SEEN] - 1
    first = ints[L_EMITTED]
    n = t - first + 1
    if n <= 0:
        return 0
    k_n = delta.shape[0]
    s = 0
    for k in range(1, k_n):
        if delta[k] > delta[s]:
            s = k
    out[n - 1] = s
    for j in range(t, first, -1):
        s = bp[j % ring, s]
        out[j - first - 1] = s
    ints[L_EMITTED] += n
    return n


class FixedLagViterbi:
    """Preallocated fixed-lag decoder for K states and a lag in frames."""

    def __init__(self, n_states: int, lag_frames: int, stay: float) -> None:
        if lag_frames < 1:
            raise ValueError(f"hmm: lag {lag_frames} frames; must be >= 1")
        self.l_stay, self.l_switch = transition_logs(stay, n_states)
        self.delta = np.zeros(n_states)
        self.bp = np.zeros((lag_frames + 1, n_states), dtype=np.int32)
        self.ints = np.zeros(2, dtype=np.int64)
        self.flushed = np.zeros(lag_frames + 1, dtype=np.int64)

    @property
    def lag(self) -> int:
        """Frames between a frame's arrival and its decision."""
        return self.bp.shape[0] - 1

    def reset(self) -> None:
        """Start a new stream."""
        self.ints[:] = 0
        self.delta[:] = 0.0


def viterbi(logp: np.ndarray, stay: float) -> np.ndarray:
    """Offline best path (int64[F]) for frame scores logp[F, K] (allocates its work arrays)."""
    f_n, k_n = logp.shape
    l_stay, l_switch = transition_logs(stay, k_n)
    path = np.zeros(f_n, dtype=np.int64)
    viterbi_offline(np.ascontiguousarray(logp, dtype=np.float64), l_stay, l_switch,
                    np.zeros(k_n), np.zeros((f_n, k_n), dtype=np.int32), path)
    return path
