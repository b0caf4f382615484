"""The live status on the terminal (`echoel run --show`, `make run`)."""

from __future__ import annotations

import sys
import time


def _meter(db: float, width: int = 24) -> str:
    filled = int(max(0.0, min(1.0, (db + 60.0) / 60.0)) * width)
    return "#" * filled + "." * (width - filled)


def render(s: dict) -> list[str]:
    """Status as a few lines of text."""
    dev = s.get("device") or {}
    lines = [
        f"echoel engine [{s['instance']}]  state: {s['state'].upper()}"
        + (f"  ({s['problem']})" if s.get("problem") and s["state"] != "running" else ""),
        f"  device   capture {dev.get('capture', '-')}  playback {dev.get('playback', '-')}",
        f"  stream   {s['rate']} Hz  period {s['period']} x {s['periods']}  {s['format']}  "
        f"in {s['channels']['in']} / out {s['channels']['out']} ch  "
        f"latency {s['latency_ms']:.2f} ms",
        f"  load     DSP {s['dsp_load_pct']:5.1f} %   blocks {s['blocks']}   xruns capture "
        f"{s['xruns']['capture']} / playback {s['xruns']['playback']}"
        + (f" (last {s['last_xrun_s_ago']} s ago)" if s.get("last_xrun_s_ago") else ""),
    ]
    lv = s.get("levels") or {}
    for i, (pk, rms) in enumerate(zip(lv.get("out_peak_dbfs", []), lv.get("out_rms_dbfs", []),
                                      strict=False)):
        inp = lv.get("in_peak_dbfs", [])
        in_db = inp[i] if i < len(inp) else None
        lines.append(f"  out {i + 1:<2}   [{_meter(rms)}] rms {rms:6.1f} peak {pk:6.1f} dBFS"
                     + (f"   in peak {in_db:6.1f}" if in_db is not None else ""))
    if s.get("limiter_gr_db"):
        lines.append(f"  limiter  -{s['limiter_gr_db']:.1f} dB")
    for name, why in (s.get("missing_guarantees") or {}).items():
        lines.append(f"  MISSING  {name}: {why}")
    lines += s.get("extra_lines", [])  # other services' lines (fleet, analysis, notes)
    return lines


class LiveView:
    """Redraws in place on a terminal; prints a line every few seconds otherwise."""

    def __init__(self, stream=sys.stdout, every_s: float = 2.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every_s
        self._last = 0.0
        self._height = 0

    def update(self, status: dict) -> None:
        """Show the latest status."""
        lines = render(status)
        if self.tty:
            if self._height:
                self.stream.write(f"\x1b[{self._height}F\x1b[J")
            self.stream.write("\n".join(lines) + "\n")
            self._height = len(lines)
        elif time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            extra = status.get("extra_lines", [])
            self.stream.write(" | ".join(x.strip() for x in lines[:4] + extra) + "\n")
        self.stream.flush()
