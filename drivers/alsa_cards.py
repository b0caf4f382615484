"""Finding sound interfaces in /proc/asound: which are present, and which to prefer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PROC_ASOUND = Path("/proc/asound")
_CARD_LINE = re.compile(r"^\s*(\d+)\s+\[(\S+)\s*\]:\s*(\S+)\s+-\s+(.*)$")


@dataclass(frozen=True)
class Card:
    """One ALSA card."""

    index: int
    id: str
    driver: str
    name: str
    usb: bool

    @property
    def pcm(self) -> str:
        """The ALSA PCM name of its first device, by card id (stable across reboots)."""
        return f"hw:CARD={self.id},DEV=0"


def list_cards(root: Path = PROC_ASOUND) -> list[Card]:
    """Cards the kernel knows now (empty when none or no /proc/asound)."""
    try:
        text = (root / "cards").read_text()
    except OSError:
        return []
    cards = []
    for line in text.splitlines():
        m = _CARD_LINE.match(line)
        if m:
            idx = int(m.group(1))
            usb = (root / f"card{idx}" / "usbid").exists() or m.group(3).startswith("USB")
            cards.append(Card(idx, m.group(2), m.group(3), m.group(4).strip(), usb))
    return cards


def pick_auto(cards: list[Card]) -> Card | None:
    """The interface 'auto' means: the first USB card, else the first other card."""
    usb = [c for c in cards if c.usb]
    return (usb or cards or [None])[0]


def resolve(device: str, root: Path = PROC_ASOUND) -> str | None:
    """The PCM to open for a configured device, or None while no interface is present."""
    if device != "auto":
        return device
    card = pick_auto(list_cards(root))
    return card.pcm if card else None
