"""Opening ALSA PCMs through pyalsaaudio, checking that the device gave what was asked.

pyalsaaudio silently accepts settings the device refuses and gives something else (the JACK
PCM turns 2 x S16 into 1 x FLOAT). Every stream is read back with `info()` and refused, with
the setting, the asked and the given value, when it differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import alsaaudio

FORMAT_CODES = {
    "S16_LE": alsaaudio.PCM_FORMAT_S16_LE,
    "S32_LE": alsaaudio.PCM_FORMAT_S32_LE,
    "FLOAT_LE": alsaaudio.PCM_FORMAT_FLOAT_LE,
}
EPIPE = -32  # what read()/write()/avail() return on an xrun


class DeviceError(RuntimeError):
    """The device cannot be opened or used as configured."""


class DeviceMismatchError(DeviceError):
    """The device opened but gave other settings than asked."""


@dataclass(frozen=True)
class StreamSpec:
    """What to ask a device for."""

    device: str
    rate: int
    channels: int
    fmt: str
    period: int
    periods: int


def open_stream(capture: bool, spec: StreamSpec) -> alsaaudio.PCM:
    """Open one direction non-blocking and verify it; raises DeviceError/DeviceMismatchError."""
    direction = "capture" if capture else "playback"
    try:
        pcm = alsaaudio.PCM(
            alsaaudio.PCM_CAPTURE if capture else alsaaudio.PCM_PLAYBACK,
            alsaaudio.PCM_NONBLOCK,
            device=spec.device, rate=spec.rate, channels=spec.channels,
            format=FORMAT_CODES[spec.fmt], periodsize=spec.period, periods=spec.periods)
    except alsaaudio.ALSAAudioError as exc:
        raise DeviceError(f"cannot open ALSA PCM {spec.device!r} for {direction}: {exc}. "
                          "Check that the interface is connected (`aplay -L`, "
                          "`arecord -l`) and the name in [engine] is right") from None
    info = pcm.info()
    given = {
        "rate": info["rate"],
        "channels": info["channels"],
        "format": info["format_name"],
        "period": info["period_size"],
        "periods": info["buffer_size"] // max(info["period_size"], 1),
    }
    asked = {"rate": spec.rate, "channels": spec.channels, "format": spec.fmt,
             "period": spec.period, "periods": spec.periods}
    wrong = [f"{k}: asked {asked[k]}, device gave {given[k]}" for k in asked
             if asked[k] != given[k]]
    if wrong:
        pcm.close()
        raise DeviceMismatchError(
            f"ALSA PCM {spec.device!r} ({direction}) does not support the configured "
            f"settings ({'; '.join(wrong)}). Set [engine] to what the device supports")
    return pcm
