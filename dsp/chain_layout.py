"""The processing chain's parameter layout: names <-> slots in the engine's parameter arrays.

The chain is fixed when the stream starts (number of EQ bands, their types, limiter on/off);
its parameter values change live through the engine's parameter ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from echoel.dsp.biquad_design import BAND_TYPES

GAIN_DB = 0
BAND_BASE = 1  # then 3 slots a band: freq, gain_db, q
LIMITER_SLOTS = 2  # threshold_db, release_ms


@dataclass(frozen=True)
class Band:
    """One EQ band: RBJ type, centre/corner frequency (Hz), gain (dB), Q."""

    kind: str
    freq: float
    gain_db: float = 0.0
    q: float = 0.7071


@dataclass(frozen=True)
class ChainSpec:
    """What the chain is made of and its starting values."""

    gain_db: float = 0.0
    bands: tuple[Band, ...] = ()
    limiter: bool = True
    limiter_threshold_db: float = -1.0
    limiter_release_ms: float = 80.0
    smoothing_ms: float = 10.0

    @property
    def n_params(self) -> int:
        """Number of live parameter slots."""
        return BAND_BASE + 3 * len(self.bands) + LIMITER_SLOTS

    @property
    def limiter_base(self) -> int:
        """Slot of the limiter's threshold."""
        return BAND_BASE + 3 * len(self.bands)

    def param_names(self) -> dict[str, int]:
        """Live parameter names (as in the config, dotted) and their slots."""
        names = {"chain.gain_db": GAIN_DB}
        for i in range(len(self.bands)):
            for j, key in enumerate(("freq", "gain_db", "q")):
                names[f"chain.eq.{i}.{key}"] = BAND_BASE + 3 * i + j
        names["chain.limiter.threshold_db"] = self.limiter_base
        names["chain.limiter.release_ms"] = self.limiter_base + 1
        return names

    def initial_values(self) -> np.ndarray:
        """The starting value of every slot."""
        v = np.zeros(self.n_params)
        v[GAIN_DB] = self.gain_db
        for i, b in enumerate(self.bands):
            v[BAND_BASE + 3 * i: BAND_BASE + 3 * i + 3] = (b.freq, b.gain_db, b.q)
        v[self.limiter_base] = self.limiter_threshold_db
        v[self.limiter_base + 1] = self.limiter_release_ms
        return v

    def band_kinds(self) -> np.ndarray:
        """Band types as ints, for the kernel."""
        return np.array([BAND_TYPES[b.kind] for b in self.bands], dtype=np.int64)
