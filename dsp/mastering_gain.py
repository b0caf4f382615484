"""The gain that brings a measured programme to a loudness target, and whether a true-peak
limiter must follow it (EBU R128 / streaming-style normalisation).

Pure arithmetic on a measurement: gain = target - integrated; the true peak moves with the gain
(a gain is linear), so a limiter is needed when true peak + gain exceeds the ceiling. The
limiter itself lives elsewhere; this only says how much it must take off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from echoel.dsp.loudness import LoudnessResult

TARGET_RANGE_LUFS = (-70.0, 0.0)
CEILING_RANGE_DBTP = (-30.0, 3.0)


@dataclass(frozen=True)
class MasteringGain:
    """The plan for one programme. gain_db is 0 for silence (nothing to normalise)."""

    gain_db: float
    target_lufs: float
    ceiling_dbtp: float
    integrated_lufs: float  # -inf for silence
    true_peak_dbtp: float  # -inf for silence
    peak_after_gain_dbtp: float
    limiter_needed: bool
    limiter_reduction_db: float  # how far the limiter must pull the loudest peak down
    gain_limited: bool  # the gain was clamped to max_gain_db
    note: str


def _field(m: LoudnessResult | Mapping, name: str) -> float:
    v = getattr(m, name) if isinstance(m, LoudnessResult) else m.get(name)
    return -math.inf if v is None else float(v)


def mastering_gain(measurement: LoudnessResult | Mapping, target_lufs: float = -14.0,
                   ceiling_dbtp: float = -1.0, max_gain_db: float | None = None
                   ) -> MasteringGain:
    """Gain to reach `target_lufs` and whether a true-peak limiter is needed for `ceiling_dbtp`.

    measurement: a LoudnessResult with true peak, or its to_dict() (integrated,
    true_peak_max_dbtp; None or -inf for silence). max_gain_db: an upper bound on the gain
    (e.g. not to lift a near-silent recording by 60 dB); None for no bound.
    """
    lo, hi = TARGET_RANGE_LUFS
    if not lo <= target_lufs <= hi:
        raise ValueError(f"loudness target {target_lufs} LUFS: allowed {lo:g} to {hi:g} LUFS")
    lo, hi = CEILING_RANGE_DBTP
    if not lo <= ceiling_dbtp <= hi:
        raise ValueError(f"true-peak ceiling {ceiling_dbtp} dBTP: allowed {lo:g} to {hi:g} dBTP")
    if isinstance(measurement, LoudnessResult) and measurement.true_peak_max_dbtp is None:
        raise ValueError("measurement: no true peak (the meter ran with true_peak=False); "
                         "a limiter decision needs it")
    integrated = _field(measurement, "integrated")
    peak = _field(measurement, "true_peak_max_dbtp")
    if math.isnan(integrated) or math.isnan(peak):
        raise ValueError(f"measurement: integrated {integrated}, true peak {peak}; a number, "
                         "-inf or None (silence) needed (was the true peak measured?)")
    if integrated == -math.inf:
        return MasteringGain(0.0, target_lufs, ceiling_dbtp, integrated, peak, peak,
                             peak > ceiling_dbtp, max(0.0, peak - ceiling_dbtp), False,
                             "silent (below the -70 LUFS gate): no gain")
    gain = target_lufs - integrated
    limited = max_gain_db is not None and gain > max_gain_db
    if limited:
        gain = float(max_gain_db)
    after = peak + gain
    needed = after > ceiling_dbtp
    note = f"{gain:+.2f} dB to {target_lufs:g} LUFS"
    if limited:
        note += f" (clamped to max gain {max_gain_db:g} dB)"
    if needed:
        note += f"; true peak {after:+.2f} dBTP over the {ceiling_dbtp:g} dBTP ceiling: limit"
    return MasteringGain(gain, target_lufs, ceiling_dbtp, integrated, peak, after, needed,
                         max(0.0, after - ceiling_dbtp), limited, note)
