"""Percentiles from the engine's 1-microsecond histograms."""

from __future__ import annotations

import numpy as np


def percentile_us(hist_row: np.ndarray, q: float) -> float | None:
    """The q-th percentile (0-100) in microseconds, None when the histogram is empty."""
    counts = np.asarray(hist_row, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return None
    rank = int(np.ceil(q / 100.0 * total))
    idx = int(np.searchsorted(np.cumsum(counts), max(rank, 1)))
    return float(idx)


def summary_us(hist_row: np.ndarray, max_ns: int) -> dict:
    """p50, p99 and max (max exact, from the engine's own maximum) in microseconds."""
    return {
        "p50_us": percentile_us(hist_row, 50),
        "p99_us": percentile_us(hist_row, 99),
        "max_us": round(max_ns / 1000.0, 1),
        "count": int(np.asarray(hist_row).sum()),
    }
