"""pYIN's hidden Markov model over pitch bins x voicing, decoded by fixed-lag Viterbi.

States: (voiced, bin) and (unvoiced, bin) for `n_bins` pitch bins spaced 1/bins_per_semitone of
a semitone from fmin. The transition is the Kronecker product of a voicing switch
([[1-p, p], [p, 1-p]]) and a pitch transition: a triangular band over bins (librosa's
`transition_local(..., window="triangle", wrap=False)`, rows normalised) with weight
1 - leap_prob, and a leap to any bin outside the band, uniform, with weight leap_prob
(leap_prob = 0 is pYIN's and librosa's model). Without leaps a jump larger than the band (an
octave between legato notes) can only go through unvoiced states, and when a frame's voiced
probability is 1 those have zero emission: the track stays on the old note's subharmonic.
Emissions follow pYIN: a voiced state gets the summed probability of the frame's f0 candidates
in its bin, every unvoiced state gets (1 - voiced probability) / n_bins.

Streaming: one forward (max-product) step per frame; back-pointers are kept for the last `lag`
frames only. The state of frame t - lag is read by backtracking `lag` steps from the best state
at t (fixed-lag Viterbi: bounded lookahead, no growing memory). `lag = 0` is pure online
decoding. Reference: M. Mauch and S. Dixon, "pYIN: a fundamental frequency estimator using
probabilistic threshold distributions", ICASSP 2014.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

TINY = float(np.finfo(np.float64).tiny)  # added before log, as librosa's viterbi does
# int parameter slots (HmmArrays.ip)
H_BINS, H_HALF, H_LAG, H_RING, H_BPS, H_MAXC, H_LEAPS = 0, 1, 2, 3, 4, 5, 6
# float parameter slots (HmmArrays.fp)
H_FMIN = 0
# counters (HmmArrays.cnt)
H_STEPS, H_RESETS = 0, 1


class HmmArrays(NamedTuple):
    """Preallocated HMM state; every array is made by `build_hmm`."""

    delta: np.ndarray  # float64[2, bins]: log score of the best path into each state
    shifted: np.ndarray  # float64[bins]: delta minus the source row's log normaliser
    leap_from: np.ndarray  # float64[bins]: delta plus the source row's log leap weight
    pre_max: np.ndarray  # float64[bins]: running max of leap_from from bin 0 up
    pre_arg: np.ndarray  # int32[bins]: its bin
    suf_max: np.ndarray  # float64[bins]: running max of leap_from from the top bin down
    suf_arg: np.ndarray  # int32[bins]: its bin
    best: np.ndarray  # float64[2, bins]: best in-voicing predecessor score per target bin
    best_arg: np.ndarray  # int32[2, bins]: its source bin
    back: np.ndarray  # int32[ring, 2, bins]: back-pointers (source state) per frame slot
    log_w: np.ndarray  # float64[half + 1]: log triangle weight by bin distance
    log_norm: np.ndarray  # float64[bins]: log of each source row's band weight sum / (1 - leap)
    log_leap: np.ndarray  # float64[bins]: log leap weight to each out-of-band bin, per row
    log_switch: np.ndarray  # float64[2, 2]: log voicing transition [from, to]
    log_init: np.ndarray  # float64[2, bins]: log initial probabilities
    obs: np.ndarray  # float64[bins]: voiced emission of the current frame
    cand_f: np.ndarray  # float64[ring, maxc]: candidate f0 (Hz) per frame slot
    cand_p: np.ndarray  # float64[ring, maxc]: candidate probability
    cand_d: np.ndarray  # float64[ring, maxc]: candidate's normalised difference (aperiodicity)
    cand_n: np.ndarray  # int64[ring]: candidates in the slot
    voiced_p: np.ndarray  # float64[ring]: the frame's voiced probability
    path: np.ndarray  # int64[ring]: scratch for backtracking
    ip: np.ndarray  # int64[7]: bins, half width, lag, ring, bins per semitone, max candidates,
    #                 leaps on (1) or off (0)
    fp: np.ndarray  # float64[1]: fmin
    cnt: np.ndarray  # int64[2]: frames stepped, resets after a non-finite score


def transition_width(max_rate_oct_s: float, hop_s: float, bins_per_semitone: int) -> int:
    """Band width (odd, in bins) of the pitch transition: librosa pyin's rule (the largest
    pitch change per frame rounded to whole semitones, x bins per semitone, + 1), made odd."""
    semis = round(max_rate_oct_s * 12.0 * hop_s)
    width = int(semis * bins_per_semitone + 1)
    return width + 1 - width % 2


def triangle_weights(width: int) -> np.ndarray:
    """Triangle weights by bin distance 0..width//2 (scipy's symmetric 'triangle' window)."""
    half = width // 2
    k = np.arange(half + 1, dtype=np.float64)
    return 1.0 - k / ((width + 1) / 2.0)


def row_weights(n_bins: int, width: int, leap_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Per source bin: the band's weight sum divided by its share (1 - leap, or 1 when the band
    covers every bin), and the weight of each out-of-band target (0 when there is none)."""
    w = triangle_weights(width)
    half = width // 2
    norm = np.empty(n_bins)
    leap = np.zeros(n_bins)
    for i in range(n_bins):
        lo, hi = max(0, i - half), min(n_bins - 1, i + half)
        norm[i] = w[np.abs(np.arange(lo, hi + 1) - i)].sum()
        outside = n_bins - (hi - lo + 1)
        if outside > 0 and leap_prob > 0.0:
            norm[i] /= 1.0 - leap_prob
            leap[i] = leap_prob / outside
    return norm, leap


def transition_matrix(n_bins: int, width: int, switch_prob: float,
                      leap_prob: float = 0.0) -> np.ndarray:
    """Dense [2*n_bins, 2*n_bins] transition matrix (row = from), for tests and tools."""
    w = triangle_weights(width)
    half = width // 2
    norm, leap = row_weights(n_bins, width, leap_prob)
    pitch = np.zeros((n_bins, n_bins))
    for i in range(n_bins):
        pitch[i, :] = leap[i]
        lo, hi = max(0, i - half), min(n_bins, i + half + 1)
        pitch[i, lo:hi] = w[np.abs(np.arange(lo, hi) - i)] / norm[i]
    switch = np.array([[1.0 - switch_prob, switch_prob], [switch_prob, 1.0 - switch_prob]])
    return np.kron(switch, pitch)


def build_hmm(n_bins: int, width: int, switch_prob: float, lag: int, max_cand: int,
              bins_per_semitone: int, fmin: float, leap_prob: float = 0.0) -> HmmArrays:
    """Allocate and initialise the HMM for `n_bins` pitch bins (errors name the bad value)."""
    if n_bins < 2:
        raise ValueError(f"pitch HMM: {n_bins} pitch bins; need at least 2 (widen fmin..fmax)")
    if width < 1 or width % 2 == 0:
        raise ValueError(f"pitch HMM: transition width {width} bins; must be odd and >= 1")
    if not 0.0 < switch_prob < 1.0:
        raise ValueError(f"pitch HMM: switch probability {switch_prob}; allowed 0 < p < 1")
    if not 0.0 <= leap_prob < 1.0:
        raise ValueError(f"pitch HMM: leap probability {leap_prob}; allowed 0 <= p < 1")
    if lag < 0 or lag > 1000:
        raise ValueError(f"pitch HMM: lookahead {lag} frames; allowed 0..1000")
    if 2 * n_bins > np.iinfo(np.int32).max:
        raise ValueError(f"pitch HMM: {n_bins} bins is too many for int32 back-pointers")
    half = width // 2
    log_w = np.log(triangle_weights(width))
    norm, leap = row_weights(n_bins, width, leap_prob)
    with np.errstate(divide="ignore"):
        log_leap = np.log(leap)
    ring = lag + 1
    hm = HmmArrays(
        delta=np.zeros((2, n_bins)),
        shifted=np.zeros(n_bins),
        leap_from=np.zeros(n_bins),
        pre_max=np.zeros(n_bins),
        pre_arg=np.zeros(n_bins, dtype=np.int32),
        suf_max=np.zeros(n_bins),
        suf_arg=np.zeros(n_bins, dtype=np.int32),
        best=np.zeros((2, n_bins)),
        best_arg=np.zeros((2, n_bins), dtype=np.int32),
        back=np.zeros((ring, 2, n_bins), dtype=np.int32),
        log_w=log_w,
        log_norm=np.log(norm),
        log_leap=log_leap,
        log_switch=np.log(np.array([[1.0 - switch_prob, switch_prob],
                                    [switch_prob, 1.0 - switch_prob]])),
        log_init=np.full((2, n_bins), math.log(1.0 / (2 * n_bins))),  # uniform, as librosa
        obs=np.zeros(n_bins),
        cand_f=np.zeros((ring, max_cand)),
        cand_p=np.zeros((ring, max_cand)),
        cand_d=np.zeros((ring, max_cand)),
        cand_n=np.zeros(ring, dtype=np.int64),
        voiced_p=np.zeros(ring),
        path=np.zeros(ring, dtype=np.int64),
        ip=np.array([n_bins, half, lag, ring, bins_per_semitone, max_cand,
                     1 if np.any(leap > 0.0) else 0], dtype=np.int64),
        fp=np.array([float(fmin)]),
        cnt=np.zeros(2, dtype=np.int64),
    )
    hmm_reset(hm)
    return hm


@numba.njit(nogil=True, cache=True)
def hmm_reset(hm: HmmArrays) -> None:
    """Forget the decoded past: the next frame starts from the initial distribution."""
    hm.delta[:, :] = 0.0
    hm.back[:, :, :] = 0
    hm.cand_n[:] = 0
    hm.voiced_p[:] = 0.0
    hm.cnt[H_STEPS] = 0


@numba.njit(nogil=True, cache=True)
def pitch_bin(hm: HmmArrays, f: float) -> int:
    """Nearest pitch bin of frequency f (clamped to the bins)."""
    nb = hm.ip[H_BINS]
    b = round(12.0 * hm.ip[H_BPS] * math.log2(f / hm.fp[H_FMIN]))
    if b < 0:
        return 0
    if b >= nb:
        return nb - 1
    return b


@numba.njit(nogil=True, cache=True)
def bin_freq(hm: HmmArrays, b: int) -> float:
    """Centre frequency of pitch bin b."""
    return hm.fp[H_FMIN] * 2.0 ** (b / (12.0 * hm.ip[H_BPS]))


@numba.njit(nogil=True, cache=True)
def _leaps(hm: HmmArrays, v: int, nb: int, half: int) -> None:
    """Let hm.best[v] also take the best leap from outside each target's band: running maxima
    of delta + leap weight from below and from above, O(bins)."""
    for b in range(nb):
        hm.leap_from[b] = hm.delta[v, b] + hm.log_leap[b]
    hm.pre_max[0] = hm.leap_from[0]
    hm.pre_arg[0] = 0
    for b in range(1, nb):
        if hm.leap_from[b] > hm.pre_max[b - 1]:
            hm.pre_max[b] = hm.leap_from[b]
            hm.pre_arg[b] = b
        else:
            hm.pre_max[b] = hm.pre_max[b - 1]
            hm.pre_arg[b] = hm.pre_arg[b - 1]
    hm.suf_max[nb - 1] = hm.leap_from[nb - 1]
    hm.suf_arg[nb - 1] = nb - 1
    for b in range(nb - 2, -1, -1):
        if hm.leap_from[b] > hm.suf_max[b + 1]:
            hm.suf_max[b] = hm.leap_from[b]
            hm.suf_arg[b] = b
        else:
            hm.suf_max[b] = hm.suf_max[b + 1]
            hm.suf_arg[b] = hm.suf_arg[b + 1]
    for b in range(nb):
        lo = b - half - 1
        hi = b + half + 1
        if lo >= 0 and hm.pre_max[lo] > hm.best[v, b]:
            hm.best[v, b] = hm.pre_max[lo]
            hm.best_arg[v, b] = hm.pre_arg[lo]
        if hi < nb and hm.suf_max[hi] > hm.best[v, b]:
            hm.best[v, b] = hm.suf_max[hi]
            hm.best_arg[v, b] = hm.suf_arg[hi]


@numba.njit(nogil=True, cache=True)
def hmm_step(hm: HmmArrays, slot: int) -> None:
    """One Viterbi step with the candidates stored in `slot` (cand_*, voiced_p)."""
    nb = hm.ip[H_BINS]
    half = hm.ip[H_HALF]
    # --- emissions
    for b in range(nb):
        hm.obs[b] = 0.0
    for c in range(hm.cand_n[slot]):
        hm.obs[pitch_bin(hm, hm.cand_f[slot, c])] += hm.cand_p[slot, c]
    pv = hm.voiced_p[slot]
    log_unv = math.log((1.0 - pv) / nb + TINY)
    if hm.cnt[H_STEPS] == 0:
        for b in range(nb):
            hm.delta[0, b] = hm.log_init[0, b] + math.log(hm.obs[b] + TINY)
            hm.delta[1, b] = hm.log_init[1, b] + log_unv
            hm.back[slot, 0, b] = b
            hm.back[slot, 1, b] = nb + b
    else:
        # --- best predecessor within each voicing, banded triangle transition
        for v in range(2):
            for b in range(nb):
                hm.shifted[b] = hm.delta[v, b] - hm.log_norm[b]
            for b in range(nb):
                hm.best[v, b] = hm.shifted[b] + hm.log_w[0]
                hm.best_arg[v, b] = b
            for k in range(1, half + 1):
                lw = hm.log_w[k]
                for b in range(nb - k):  # source b + k -> target b
                    s = hm.shifted[b + k] + lw
                    if s > hm.best[v, b]:
                        hm.best[v, b] = s
                        hm.best_arg[v, b] = b + k
                for b in range(k, nb):  # source b - k -> target b
                    s = hm.shifted[b - k] + lw
                    if s > hm.best[v, b]:
                        hm.best[v, b] = s
                        hm.best_arg[v, b] = b - k
            if hm.ip[H_LEAPS]:
                _leaps(hm, v, nb, half)
        # --- voicing switch, emission
        for to in range(2):
            for b in range(nb):
                s0 = hm.best[0, b] + hm.log_switch[0, to]
                s1 = hm.best[1, b] + hm.log_switch[1, to]
                if s0 >= s1:
                    s = s0
                    src = hm.best_arg[0, b]
                else:
                    s = s1
                    src = nb + hm.best_arg[1, b]
                e = math.log(hm.obs[b] + TINY) if to == 0 else log_unv
                hm.delta[to, b] = s + e
                hm.back[slot, to, b] = src
    # --- keep scores near 0; a non-finite score restarts decoding from the prior
    top = -math.inf
    for v in range(2):
        for b in range(nb):
            if hm.delta[v, b] > top:
                top = hm.delta[v, b]
    if not math.isfinite(top):
        hm.cnt[H_RESETS] += 1
        for v in range(2):
            for b in range(nb):
                hm.delta[v, b] = hm.log_init[v, b]
    else:
        for v in range(2):
            for b in range(nb):
                hm.delta[v, b] -= top
    hm.cnt[H_STEPS] += 1


@numba.njit(nogil=True, cache=True)
def best_state(hm: HmmArrays) -> int:
    """Index (voiced 0..bins-1, unvoiced bins..2*bins-1) of the best current state."""
    nb = hm.ip[H_BINS]
    top = -math.inf
    arg = nb
    for v in range(2):
        for b in range(nb):
            if hm.delta[v, b] > top:
                top = hm.delta[v, b]
                arg = v * nb + b
    return arg


@numba.njit(nogil=True, cache=True)
def backtrack(hm: HmmArrays, newest: int, steps: int) -> None:
    """Fill hm.path[0..steps] with the states of frames newest-steps..newest on the best path
    ending at frame `newest` (path[steps] is the newest frame's state); steps <= lag."""
    nb = hm.ip[H_BINS]
    ring = hm.ip[H_RING]
    s = best_state(hm)
    hm.path[steps] = s
    for k in range(steps):
        slot = (newest - k) % ring
        s = hm.back[slot, s // nb, s % nb]
        hm.path[steps - k - 1] = s
