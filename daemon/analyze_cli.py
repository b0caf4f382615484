"""`echoel analyze FILE`: the offline analysis report of a sound file, and loudness
normalisation into a new file.

daemon/cli.py adds it with `add_analyze_parser(sub)`. The report (daemon/file_analysis.py) is
a few readable lines, or everything as JSON with --json. --normalize LUFS --out OUT writes OUT
at that loudness with the true peak at or below --ceiling (default -1 dBTP), then reads OUT
back and reports what it measures.

Exit status: 0 done; 1 the normalised file misses its promise (true peak above the ceiling +
0.1 dB, or loudness off the target by more than 0.5 LU with no hard limiting to blame); 2 the
input or an option cannot be used (the message names the file, the value and what is allowed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import soundfile as sf
from echoel.daemon.file_analysis import (
    ANALYSES,
    LOUDNESS_TOLERANCE_LU,
    TRUE_PEAK_TOLERANCE_DB,
    AudioInputError,
    analyze_audio,
    check_ceiling,
    chord_symbol,
    normalize_audio,
    parse_what,
    read_audio,
)
from echoel.dsp.loudness import measure
from echoel.dsp.mastering_gain import TARGET_RANGE_LUFS

FIRST_CHORDS = 8  # chord segments shown in the human report
COMMON_OUT = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".caf", ".w64", ".rf64")
NOT_WRITTEN = {"RAW"}  # no header: it could not be read back and checked
EXTENSIONS = {"aif": "AIFF", "aiff": "AIFF", "oga": "OGG", "opus": "OGG", "mp3": "MP3"}


class OptionError(ValueError):
    """An option value that cannot be used."""


# ----------------------------------------------------------------------------- options

def output_format(out: Path, in_subtype: str) -> tuple[str, str]:
    """(format, subtype) to write `out`: the format its extension names; the input's subtype
    where that format takes it, else FLOAT, else 24-bit PCM, else the format's default."""
    ext = out.suffix.lower().lstrip(".")
    fmt = EXTENSIONS.get(ext, ext.upper())
    if not ext or fmt not in sf.available_formats() or fmt in NOT_WRITTEN:
        others = sorted(f".{f.lower()}" for f in sf.available_formats()
                        if f not in NOT_WRITTEN and f".{f.lower()}" not in COMMON_OUT)
        raise OptionError(f"--out {out}: extension {out.suffix or '(none)'} names no sound "
                          f"format to write; allowed {', '.join(COMMON_OUT)} (or "
                          f"{', '.join(others)})")
    for subtype in (in_subtype, "FLOAT", "PCM_24"):
        if subtype and sf.check_format(fmt, subtype):
            return fmt, subtype
    return fmt, sf.default_subtype(fmt)


def check_options(args: argparse.Namespace) -> tuple[str, ...]:
    """Check option values and combinations; returns the analyses asked for."""
    what = parse_what(args.only.split(",")) if args.only else ANALYSES
    if args.normalize is None:
        given = [o for o, v in (("--out", args.out), ("--ceiling", args.ceiling),
                                ("--max-gain", args.max_gain)) if v is not None]
        if given:
            raise OptionError(f"{', '.join(given)} given without --normalize LUFS")
        return what
    lo, hi = TARGET_RANGE_LUFS
    if not (math.isfinite(args.normalize) and lo <= args.normalize <= hi):
        raise OptionError(f"--normalize {args.normalize:g} LUFS: allowed {lo:g} to {hi:g} LUFS")
    if args.out is None:
        raise OptionError("--normalize needs --out OUT (the file to write)")
    check_ceiling(-1.0 if args.ceiling is None else args.ceiling)
    if args.max_gain is not None and not math.isfinite(args.max_gain):
        raise OptionError(f"--max-gain {args.max_gain}: need a number of dB")
    out = Path(args.out)
    output_format(out, "")  # the extension names a format
    if out.exists() and Path(args.file).exists() and os.path.samefile(out, args.file):
        raise OptionError(f"--out {out} is the input file; write to another file")
    if not out.parent.is_dir():
        raise OptionError(f"--out {out}: folder {out.parent} does not exist")
    return what


# ----------------------------------------------------------------------------- the report

def _lvl(v: float | None, unit: str) -> str:
    return "-inf " + unit if v is None else f"{v:.1f} {unit}"


def human_lines(path: str, info: Any, rep: dict) -> list[str]:
    """The human report: a few lines."""
    inp = rep["input"]
    lines = [f"{path}: {info.format} {info.subtype}, {inp['rate']} Hz, {inp['channels']} ch "
             f"({inp['layout']}), {inp['duration_s']:.2f} s"]
    if "loudness" in rep:
        lo = rep["loudness"]
        integ = ("below the -70 LUFS gate (silence)" if lo["integrated"] is None
                 else _lvl(lo["integrated"], "LUFS"))
        lines.append(f"loudness: integrated {integ}, LRA {lo['lra']:.1f} LU, true peak "
                     f"{_lvl(lo['true_peak_max_dbtp'], 'dBTP')}")
        lines.append(f"          max momentary {_lvl(lo['max_momentary'], 'LUFS')}, max "
                     f"short-term {_lvl(lo['max_short_term'], 'LUFS')}, sample peak "
                     f"{_lvl(lo['sample_peak_max_dbfs'], 'dBFS')}, duration "
                     f"{lo['duration_s']:.2f} s")
    if "key" in rep:
        k = rep["key"]
        if k["key"]:
            nxt = k["candidates"][1]["key"] if len(k["candidates"]) > 1 else ""
            lines.append(f"key: {k['key']} (confidence {k['confidence']:.2f}"
                         + (f"; next {nxt}" if nxt else "")
                         + f"), tuning {k['tuning_cents']:+.0f} cents")
        else:
            lines.append("key: none (no tonal content)")
    if "chords" in rep:
        c = rep["chords"]
        segs = c["segments"]
        shown = " | ".join(f"{chord_symbol(lab)} {s:.1f}" for s, _, lab in segs[:FIRST_CHORDS])
        more = " | ..." if len(segs) > FIRST_CHORDS else ""
        summ = c["summary"]
        top = summ["most_held"][0] if summ["most_held"] else None
        lines.append(f"chords: {shown}{more}")
        lines.append(f"        {summ['segments']} segments, {summ['distinct']} distinct chords"
                     + (f", most held {chord_symbol(top['label'])} "
                        f"{100 * top['share']:.0f}%" if top else "")
                     + f", no chord {100 * summ['no_chord_share']:.0f}%")
    if "pitch" in rep:
        p = rep["pitch"]
        if p["median_f0_hz"] is None:
            lines.append("pitch (mono mix): no voiced frames")
        else:
            lo_hz, hi_hz = p["range_hz"]
            lines.append(f"pitch (mono mix): voiced {100 * p['voiced_share']:.0f}% of the "
                         f"time, median {p['median_f0_hz']:.1f} Hz ({p['median_note']} "
                         f"{p['median_cents']:+.0f} cents), range {lo_hz:.1f}-{hi_hz:.1f} Hz "
                         f"({p['range_notes'][0]}-{p['range_notes'][1]})")
    return lines


def normalize_file(args: argparse.Namespace, audio, rate: int, info: Any
                   ) -> tuple[dict, list[str], bool]:
    """Normalise, write OUT, read it back and measure it: (JSON part, lines, promise kept)."""
    ceiling = -1.0 if args.ceiling is None else args.ceiling
    out_path = Path(args.out)
    fmt, subtype = output_format(out_path, info.subtype)
    out, res = normalize_audio(audio, rate, args.normalize, ceiling, max_gain_db=args.max_gain)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        sf.write(str(tmp), out, rate, subtype=subtype, format=fmt)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    back, back_rate = read_audio(out_path)
    m = measure(back, back_rate)
    got_i = m.integrated if math.isfinite(m.integrated) else None
    got_tp = m.true_peak_max_dbtp if math.isfinite(m.true_peak_max_dbtp) else None
    silent = res.input_lufs is None
    loud_ok = silent or (got_i is not None
                         and abs(got_i - args.normalize) <= LOUDNESS_TOLERANCE_LU)
    tp_ok = got_tp is None or got_tp <= ceiling + TRUE_PEAK_TOLERANCE_DB
    excused = res.limiter_hard or res.gain_clamped
    kept = tp_ok and (loud_ok or excused)
    part = {**res.to_dict(), "out": str(out_path), "out_format": fmt, "out_subtype": subtype,
            "out_frames": int(back.shape[0]), "achieved_lufs": got_i,
            "achieved_true_peak_dbtp": got_tp, "loudness_within_tolerance": bool(loud_ok),
            "true_peak_within_ceiling": bool(tp_ok), "promise_kept": bool(kept)}
    lines = [f"normalized: {res.note}",
             f"  wrote {out_path} ({fmt} {subtype}, {back.shape[0]} frames); measured: "
             f"integrated {_lvl(got_i, 'LUFS')} (target {args.normalize:g}), true peak "
             f"{_lvl(got_tp, 'dBTP')} (ceiling {ceiling:g})"]
    if not tp_ok:
        lines.append(f"  NOT MET: true peak {got_tp:.2f} dBTP is above the ceiling {ceiling:g} "
                     f"+ {TRUE_PEAK_TOLERANCE_DB:g} dB (a lossy format re-shapes peaks; use "
                     "WAV or FLAC, or a lower ceiling)")
    if not loud_ok:
        why = ("the limiter had to work very hard" if res.limiter_hard else
               "the gain was clamped by --max-gain" if res.gain_clamped else "NOT MET")
        lines.append(f"  loudness {_lvl(got_i, 'LUFS')} is more than "
                     f"{LOUDNESS_TOLERANCE_LU:g} LU from the target: {why}")
    return part, lines, kept


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse FILE (and normalise it with --normalize); see the module docstring."""
    try:
        what = check_options(args)
    except (OptionError, AudioInputError) as exc:
        print(f"echoel analyze: {exc}", file=sys.stderr)
        return 2
    try:
        audio, rate = read_audio(args.file)
        info = sf.info(args.file)
        rep = analyze_audio(audio, rate, what=what)
        norm = normalize_file(args, audio, rate, info) if args.normalize is not None else None
    except (AudioInputError, OptionError) as exc:
        print(f"echoel analyze: {args.file}: {exc}", file=sys.stderr)
        return 2
    kept = True
    if args.json:
        doc = {"file": args.file, "format": info.format, "subtype": info.subtype, **rep}
        if norm is not None:
            doc["normalize"] = norm[0]
            kept = norm[2]
        print(json.dumps(doc, indent=1, allow_nan=False))
    else:
        lines = human_lines(args.file, info, rep)
        if norm is not None:
            lines += norm[1]
            kept = norm[2]
        print("\n".join(lines))
    return 0 if kept else 1


def add_analyze_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `analyze FILE [--json] [--only ...] [--normalize LUFS --out OUT [--ceiling DBTP]]`."""
    p = subparsers.add_parser(
        "analyze", help="offline report of a sound file: loudness, key, chords, pitch; "
                        "--normalize writes a loudness-normalised copy")
    p.add_argument("file", metavar="FILE", help="sound file (WAV, FLAC, OGG, AIFF, MP3...)")
    p.add_argument("--json", action="store_true", help="everything as JSON (with the pitch "
                                                       "track, 10 points a second)")
    p.add_argument("--only", metavar="LIST",
                   help=f"comma-separated analyses among {','.join(ANALYSES)} (default all)")
    p.add_argument("--normalize", type=float, metavar="LUFS",
                   help="write OUT at this integrated loudness (e.g. -14 or -23)")
    p.add_argument("--ceiling", type=float, metavar="DBTP",
                   help="true-peak ceiling of OUT, -30..0 dBTP (default -1); a true-peak "
                        "limiter holds it when the gain would pass it")
    p.add_argument("--max-gain", type=float, metavar="DB",
                   help="at most this much gain (default: no bound)")
    p.add_argument("--out", metavar="OUT", help="the normalised file; its extension names the "
                                                "format, the input's sample format is kept where "
                                                "it can be, else float")
    p.set_defaults(func=cmd_analyze)
    return p
