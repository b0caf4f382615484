"""Finding sound interfaces (drivers/alsa_cards.py) in fake /proc/asound trees: which cards
exist, which one 'auto' means (a USB interface before onboard audio), and the PCM to open."""

from __future__ import annotations

from pathlib import Path

import pytest
from echoel.drivers.alsa_cards import Card, list_cards, pick_auto, resolve

ONBOARD = (
    " 0 [PCH            ]: HDA-Intel - HDA Intel PCH\n"
    "                      HDA Intel PCH at 0xf7f10000 irq 32\n"
)
USB = (
    " 1 [USB            ]: USB-Audio - Scarlett 2i2 USB\n"
    "                      Focusrite Scarlett 2i2 USB at usb-0000:00:14.0-1, high speed\n"
)
PI_HDMI = (
    " 0 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0\n"
    "                      vc4-hdmi-0\n"
    " 1 [Headphones     ]: bcm2835_headpho - bcm2835 Headphones\n"
    "                      bcm2835 Headphones\n"
)


def asound(root: Path, cards_text: str, usb_indexes: tuple[int, ...] = ()) -> Path:
    """A fake /proc/asound: the cards file and a cardN folder (with usbid for USB cards)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cards").write_text(cards_text)
    for line in cards_text.splitlines():
        head = line.split("[")[0].strip()
        if head.isdigit():
            card_dir = root / f"card{head}"
            card_dir.mkdir()
            (card_dir / "id").write_text(line.split("[")[1].split("]")[0].strip() + "\n")
            if int(head) in usb_indexes:
                (card_dir / "usbid").write_text("1235:8210\n")
    return root


def test_no_asound_folder(tmp_path):
    assert list_cards(tmp_path / "absent") == []


def test_no_cards_file(tmp_path):
    assert list_cards(tmp_path) == []
    assert resolve("auto", tmp_path) is None


def test_no_soundcards_line(tmp_path):
    root = asound(tmp_path / "asound", "--- no soundcards ---\n")
    assert list_cards(root) == []
    assert pick_auto(list_cards(root)) is None
    assert resolve("auto", root) is None


def test_onboard_only_is_picked(tmp_path):
    root = asound(tmp_path / "asound", ONBOARD)
    cards = list_cards(root)
    assert cards == [Card(0, "PCH", "HDA-Intel", "HDA Intel PCH", usb=False)]
    assert pick_auto(cards) == cards[0]
    assert resolve("auto", root) == "hw:CARD=PCH,DEV=0"


def test_usb_is_picked_even_when_listed_second(tmp_path):
    root = asound(tmp_path / "asound", ONBOARD + USB, usb_indexes=(1,))
    cards = list_cards(root)
    assert [(c.index, c.id, c.driver, c.usb) for c in cards] == [
        (0, "PCH", "HDA-Intel", False),
        (1, "USB", "USB-Audio", True),
    ]
    assert cards[1].name == "Scarlett 2i2 USB"
    assert pick_auto(cards) is cards[1]
    assert resolve("auto", root) == "hw:CARD=USB,DEV=0"


def test_usb_card_known_by_its_usbid_file(tmp_path):
    """A USB interface whose driver is not snd-usb-audio is still USB: it has a usbid."""
    text = ONBOARD + (" 1 [DJ4            ]: snd_usb_caiaq - Native Instruments Traktor\n"
                      "                      Native Instruments Traktor (usb-0000:00:14.0-2)\n")
    root = asound(tmp_path / "asound", text, usb_indexes=(1,))
    cards = list_cards(root)
    assert [c.usb for c in cards] == [False, True]
    assert resolve("auto", root) == "hw:CARD=DJ4,DEV=0"


def test_usb_audio_driver_without_usbid_file(tmp_path):
    root = asound(tmp_path / "asound", ONBOARD + USB)  # no usbid files at all
    assert [c.usb for c in list_cards(root)] == [False, True]
    assert resolve("auto", root) == "hw:CARD=USB,DEV=0"


def test_first_of_several_usb_cards(tmp_path):
    second_usb = (
        " 2 [Babyface       ]: USB-Audio - Babyface Pro\n"
        "                      RME Babyface Pro at usb-0000:00:14.0-3, high speed\n"
    )
    root = asound(tmp_path / "asound", ONBOARD + USB + second_usb, usb_indexes=(1, 2))
    assert [c.id for c in list_cards(root)] == ["PCH", "USB", "Babyface"]
    assert resolve("auto", root) == "hw:CARD=USB,DEV=0"


def test_raspberry_pi_onboard_cards(tmp_path):
    root = asound(tmp_path / "asound", PI_HDMI)
    cards = list_cards(root)
    assert [(c.index, c.id, c.driver, c.name) for c in cards] == [
        (0, "vc4hdmi0", "vc4-hdmi", "vc4-hdmi-0"),
        (1, "Headphones", "bcm2835_headpho", "bcm2835 Headphones"),
    ]
    assert not any(c.usb for c in cards)
    assert resolve("auto", root) == "hw:CARD=vc4hdmi0,DEV=0"


def test_two_digit_index_and_gaps(tmp_path):
    text = ("10 [Loopback       ]: Loopback - Loopback\n"
            "                      Loopback 1\n")
    root = asound(tmp_path / "asound", text)
    assert list_cards(root) == [Card(10, "Loopback", "Loopback", "Loopback", usb=False)]
    # the usbid of another card index does not make this one USB
    (root / "card3").mkdir()
    (root / "card3" / "usbid").write_text("1235:8210\n")
    assert list_cards(root)[0].usb is False


def test_pick_auto_on_lists():
    onboard = Card(0, "PCH", "HDA-Intel", "HDA Intel PCH", usb=False)
    hdmi = Card(1, "HDMI", "HDA-Intel", "HDA ATI HDMI", usb=False)
    usb_a = Card(2, "A", "USB-Audio", "A", usb=True)
    usb_b = Card(3, "B", "USB-Audio", "B", usb=True)
    assert pick_auto([]) is None
    assert pick_auto([onboard]) is onboard
    assert pick_auto([onboard, hdmi]) is onboard
    assert pick_auto([onboard, hdmi, usb_a, usb_b]) is usb_a
    assert pick_auto([usb_b, onboard, usb_a]) is usb_b


def test_card_pcm():
    assert Card(4, "Scarlett", "USB-Audio", "x", usb=True).pcm == "hw:CARD=Scarlett,DEV=0"


@pytest.mark.parametrize("device", ["hw:CARD=PCH,DEV=0", "hw:1,0", "plughw:CARD=USB,DEV=0",
                                    "default", "box_cap"])
def test_named_device_is_returned_unchanged(tmp_path, device):
    root = asound(tmp_path / "asound", ONBOARD + USB, usb_indexes=(1,))
    assert resolve(device, root) == device
    assert resolve(device, tmp_path / "absent") == device  # even with no cards at all


def test_auto_with_no_cards_is_none(tmp_path):
    root = asound(tmp_path / "asound", "")
    assert resolve("auto", root) is None
    assert resolve("auto", tmp_path / "absent") is None
