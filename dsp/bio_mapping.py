"""From body to sound: mappings from HRV figures to live engine parameters (no I/O).

A mapping ([[bio.mappings]] in the config, KEYS below) reads one source figure of a sensor,
normalises it over an input range (clamped), bends it by a curve, scales it to an output
range of one live engine parameter, smooths it (one-pole, time constant `smoothing_s`), and
weighs it against the parameter's neutral value by the sensor's presence:

    u = clamp((x - in_lo) / (in_hi - in_lo), 0, 1)          in_lo > in_hi inverts
    c = curve(u)    linear: u;  exp: (e^(k u) - 1) / (e^k - 1);  log: ln(1 + (e^k - 1) u) / k
                    s-curve: logistic of steepness k centred on 0.5, rescaled to 0..1
    v = out_lo + c * (out_hi - out_lo), smoothed:  s += (v - s) * (1 - e^(-dt / smoothing_s))
    y = neutral + w(p) * (s - neutral),  w(p) = (1 - cos(pi p)) / 2  (raised cosine)

k is `shape`. The presence p rises linearly from 0 to 1 over `fade_in_s` while the source is
valid (sensor connected, figure computable) and falls to 0 over `fade_out_s` when it is not
(sensor lost, gap): the parameter glides back to neutral, and glides in again on return, with
no step. `neutral` defaults to the parameter's configured base value (what the config sets).
Every y lies between neutral and the output range, inside the parameter's allowed range.

`step_kernel` advances every mapping by dt over preallocated arrays (numba, no allocation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from echoel.daemon import config as config_mod
from echoel.daemon.config import ConfigError, Key

SOURCES = ("hr_bpm", "rmssd_ms", "sdnn_ms", "lf_hf", "coherence", "hr_trend")
CURVES = {"linear": 0, "exp": 1, "log": 2, "s-curve": 3}
C_LINEAR, C_EXP, C_LOG, C_S = 0, 1, 2, 3
MAX_MAPPINGS = 32
SECTION = "bio.mappings"

KEYS: dict[str, Key] = {
    "source": Key(str, "hr_bpm", "HRV figure read (hr_trend in bpm/min, coherence: McCraty "
                  "ratio)", choices=SOURCES),
    "sensor": Key(str, "", "sensor name; empty: the first connected sensor with the figure"),
    "target": Key(str, "", "live engine parameter: chain.gain_db, chain.eq.N.freq, "
                  "chain.eq.N.gain_db, chain.eq.N.q, chain.limiter.threshold_db, "
                  "chain.limiter.release_ms"),
    "curve": Key(str, "linear", "shape from input to output", choices=tuple(CURVES)),
    "shape": Key(float, 3.0, "steepness k of the exp, log and s-curve curves", 0.1, 20.0),
    "in_lo": Key(float, None, "source value mapped to out_lo (required)", -1e6, 1e6),
    "in_hi": Key(float, None, "source value mapped to out_hi (required)", -1e6, 1e6),
    "out_lo": Key(float, None, "parameter value at in_lo (required)", -1e6, 1e6),
    "out_hi": Key(float, None, "parameter value at in_hi (required)", -1e6, 1e6),
    "neutral": Key(float, None, "value without a sensor; unset: the configured base",
                   -1e6, 1e6),
    "smoothing_s": Key(float, 2.0, "time constant of the mapped value (s; 0: none)", 0.0,
                       120.0),
    "fade_in_s": Key(float, 5.0, "glide from neutral to the mapped value when the sensor "
                     "(re)appears (s)", 0.05, 600.0),
    "fade_out_s": Key(float, 3.0, "glide back to neutral when the sensor is lost (s)", 0.05,
                      600.0),
}
REQUIRED = ("target", "in_lo", "in_hi", "out_lo", "out_hi")

# parameter columns of the kernel
(M_CURVE, M_SHAPE, M_IN_LO, M_IN_HI, M_OUT_LO, M_OUT_HI, M_NEUTRAL, M_TAU, M_FADE_IN,
 M_FADE_OUT, M_LO, M_HI) = range(12)
N_MPAR = 12
# state columns: smoothed value, presence, smoothed value valid
S_VALUE, S_PRESENCE, S_INIT = 0, 1, 2
N_MSTATE = 3


@dataclass(frozen=True)
class Mapping:
    """One validated mapping; lo/hi: the target parameter's allowed range."""

    source: str
    target: str
    out_lo: float
    out_hi: float
    in_lo: float
    in_hi: float
    neutral: float
    lo: float
    hi: float
    sensor: str = ""
    curve: str = "linear"
    shape: float = 3.0
    smoothing_s: float = 2.0
    fade_in_s: float = 5.0
    fade_out_s: float = 3.0

    def row(self) -> np.ndarray:
        """This mapping's parameter row for step_kernel."""
        r = np.zeros(N_MPAR, np.float64)
        r[M_CURVE] = CURVES[self.curve]
        r[M_SHAPE] = self.shape
        r[M_IN_LO], r[M_IN_HI] = self.in_lo, self.in_hi
        r[M_OUT_LO], r[M_OUT_HI] = self.out_lo, self.out_hi
        r[M_NEUTRAL] = self.neutral
        r[M_TAU] = self.smoothing_s
        r[M_FADE_IN], r[M_FADE_OUT] = self.fade_in_s, self.fade_out_s
        r[M_LO], r[M_HI] = self.lo, self.hi
        return r


def target_key(target: str) -> Key | None:
    """The schema Key of a live parameter name (chain.eq.N.x included), or None."""
    if not config_mod.is_live(target):
        return None
    parts = target.split(".")
    if parts[:2] == ["chain", "eq"]:
        return config_mod.SCHEMA["chain.eq"][parts[3]]
    return config_mod.SCHEMA[".".join(parts[:-1])][parts[-1]]


def base_value(cfg: config_mod.Config, target: str) -> float:
    """The configured value of a live parameter (its neutral), e.g. chain.eq.0.freq."""
    node: Any = cfg.data
    for p in target.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return float(node)


def parse_mappings(where: str, raw: Any, cfg: config_mod.Config | None = None
                   ) -> list[Mapping]:
    """Validate a [[bio.mappings]] array; ConfigError names the mapping, key, value, rule.

    cfg (the box's config) gives each target's neutral base and the EQ bands that exist;
    without it every mapping must set `neutral`.
    """
    if not isinstance(raw, list) or len(raw) > MAX_MAPPINGS:
        raise ConfigError(f"{where}: [[{SECTION}]] must be a list of at most {MAX_MAPPINGS} "
                          f"tables, got {raw!r}")
    out: list[Mapping] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        w = f"{where} mapping {i}"
        t = config_mod.check_table(w, SECTION, item, {SECTION: KEYS})
        for k in REQUIRED:
            if t[k] is None or t[k] == "":
                raise ConfigError(f"{w} [{SECTION}]: {k} is missing; allowed: "
                                  f"{KEYS[k].allowed()} ({KEYS[k].doc})")
        out.append(_mapping(w, t, cfg))
        if t["target"] in seen:
            raise ConfigError(f"{w} [{SECTION}]: target = {t['target']!r} is already driven by "
                              f"mapping {seen[t['target']]}; allowed: one mapping per "
                              "parameter")
        seen[t["target"]] = i
    return out


def _mapping(w: str, t: dict[str, Any], cfg: config_mod.Config | None) -> Mapping:
    target = t["target"]
    key = target_key(target)
    if key is None:
        raise ConfigError(f"{w} [{SECTION}]: target = {target!r} is not a live engine "
                          f"parameter; allowed: {KEYS['target'].doc.split(': ', 1)[1]}")
    lo, hi = float(key.lo), float(key.hi)
    parts = target.split(".")
    if cfg is not None and parts[:2] == ["chain", "eq"]:
        bands = len(cfg["chain"]["eq"])
        if int(parts[2]) >= bands:
            allowed = (f"chain.eq.0 to chain.eq.{bands - 1}" if bands
                       else "none: the config has no [[chain.eq]] band")
            raise ConfigError(f"{w} [{SECTION}]: target = {target!r}: the config has "
                              f"{bands} EQ band(s); allowed: {allowed}")
        if parts[3] == "freq":
            hi = min(hi, cfg["engine"]["rate"] / 2.0 * 0.999)
    if t["in_lo"] == t["in_hi"]:
        raise ConfigError(f"{w} [{SECTION}]: in_lo = in_hi = {t['in_lo']:g}: allowed two "
                          "different values (in_lo > in_hi inverts)")
    for k in ("out_lo", "out_hi"):
        if not lo <= t[k] <= hi:
            raise ConfigError(f"{w} [{SECTION}]: {k} = {t[k]:g} for {target}: allowed "
                              f"{lo:g} to {hi:g}")
    neutral = t["neutral"]
    if neutral is None:
        if cfg is None:
            raise ConfigError(f"{w} [{SECTION}]: neutral is missing and no config gives "
                              f"{target}'s base; allowed: a number from {lo:g} to {hi:g}")
        neutral = base_value(cfg, target)
    if not lo <= neutral <= hi:
        raise ConfigError(f"{w} [{SECTION}]: neutral = {neutral:g} for {target}: allowed "
                          f"{lo:g} to {hi:g}")
    return Mapping(source=t["source"], target=target, out_lo=t["out_lo"], out_hi=t["out_hi"],
                   in_lo=t["in_lo"], in_hi=t["in_hi"], neutral=float(neutral), lo=lo, hi=hi,
                   sensor=t["sensor"], curve=t["curve"], shape=t["shape"],
                   smoothing_s=t["smoothing_s"], fade_in_s=t["fade_in_s"],
                   fade_out_s=t["fade_out_s"])


@numba.njit(nogil=True, cache=True)
def curve_value(kind: int, k: float, u: float) -> float:
    """The curve at u in [0, 1]; 0 -> 0 and 1 -> 1 for every kind."""
    if kind == C_EXP:
        return math.expm1(k * u) / math.expm1(k)
    if kind == C_LOG:
        return math.log1p(math.expm1(k) * u) / k
    if kind == C_S:
        a = 1.0 / (1.0 + math.exp(k * 0.5))
        b = 1.0 / (1.0 + math.exp(-k * 0.5))
        return (1.0 / (1.0 + math.exp(-k * (u - 0.5))) - a) / (b - a)
    return u


@numba.njit(nogil=True, cache=True)
def map_value(par, x: float) -> float:
    """Input figure -> parameter value of one mapping (no smoothing, no presence)."""
    u = (x - par[M_IN_LO]) / (par[M_IN_HI] - par[M_IN_LO])
    u = min(max(u, 0.0), 1.0)
    c = curve_value(int(par[M_CURVE]), par[M_SHAPE], u)
    return par[M_OUT_LO] + c * (par[M_OUT_HI] - par[M_OUT_LO])


@numba.njit(nogil=True, cache=True)
def step_kernel(inputs, valid, par, st, dt, out):
    """Advance every mapping by dt seconds; out[i] = value to apply (within range).

    inputs: float64[n] source figures; valid: bool[n] sensor present and figure finite;
    par: float64[n, N_MPAR]; st: float64[n, N_MSTATE] (reset where it became non-finite).
    """
    for i in range(inputs.shape[0]):
        p = par[i]
        s = st[i]
        if not (math.isfinite(s[S_VALUE]) and math.isfinite(s[S_PRESENCE])):
            s[S_VALUE] = p[M_NEUTRAL]
            s[S_PRESENCE] = 0.0
            s[S_INIT] = 0.0
        x = inputs[i]
        if valid[i] and math.isfinite(x):
            v = map_value(p, x)
            if s[S_INIT] == 0.0 or p[M_TAU] <= 0.0:
                s[S_VALUE] = v
                s[S_INIT] = 1.0
            else:
                s[S_VALUE] += (v - s[S_VALUE]) * (1.0 - math.exp(-dt / p[M_TAU]))
            s[S_PRESENCE] = min(1.0, s[S_PRESENCE] + dt / p[M_FADE_IN])
        else:
            s[S_PRESENCE] = max(0.0, s[S_PRESENCE] - dt / p[M_FADE_OUT])
            if s[S_PRESENCE] == 0.0:
                s[S_INIT] = 0.0  # next return starts from its own fresh value
        w = 0.5 - 0.5 * math.cos(math.pi * s[S_PRESENCE])
        y = p[M_NEUTRAL] + w * (s[S_VALUE] - p[M_NEUTRAL])
        out[i] = min(max(y, p[M_LO]), p[M_HI])


class MappingBank:
    """The state of a set of mappings, stepped together (arrays built once)."""

    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = list(mappings)
        n = len(self.mappings)
        self.par = np.zeros((n, N_MPAR), np.float64)
        for i, m in enumerate(self.mappings):
            self.par[i] = m.row()
        self.st = np.zeros((n, N_MSTATE), np.float64)
        self.st[:, S_VALUE] = self.par[:, M_NEUTRAL]
        self.inputs = np.full(n, np.nan)
        self.valid = np.zeros(n, np.bool_)
        self.out = self.par[:, M_NEUTRAL].copy()

    def step(self, dt: float) -> np.ndarray:
        """Advance by dt seconds (inputs/valid set by the caller); returns `out`."""
        step_kernel(self.inputs, self.valid, self.par, self.st, max(dt, 0.0), self.out)
        return self.out

    @property
    def presence(self) -> np.ndarray:
        """Presence (0..1) of each mapping."""
        return self.st[:, S_PRESENCE]
