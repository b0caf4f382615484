"""`echoel provision` (one box's identity and settings, into its image or card) and
`echoel first-boot` (the box applies them)."""

from __future__ import annotations

import argparse
import json
import sys

from echoel.provisioning import first_boot
from echoel.provisioning.image_layout import LayoutError
from echoel.provisioning.pki import FleetPki, PkiError
from echoel.provisioning.provision import (
    BoxSettings,
    Network,
    ProvisionError,
    check_network,
    parse_broker,
    provision_target,
    read_psk,
    read_ssh_keys,
)


def add_box_settings_args(p: argparse.ArgumentParser, broker_required: bool) -> None:
    """The options shared by `provision` and `flash`: PKI, broker, network, SSH keys."""
    p.add_argument("--pki", required=broker_required,
                   help="the fleet's PKI folder (`echoel pki`); the CA signs each box")
    p.add_argument("--broker", required=broker_required, metavar="HOST[:PORT]",
                   help="the fleet's MQTT broker (TLS port, default 8883)")
    p.add_argument("--group", default="", help="device group the box announces")
    p.add_argument("--wifi-ssid", help="Wi-Fi network name (with --wifi-psk-file)")
    p.add_argument("--wifi-psk-file", help="file holding the Wi-Fi passphrase (first line)")
    p.add_argument("--static", metavar="IP/NN", help="wired static address, e.g. "
                   "192.168.10.20/24 (default: wired DHCP)")
    p.add_argument("--gateway", help="static: the gateway")
    p.add_argument("--dns", action="extend", nargs="+", default=[],
                   help="static: DNS server(s)")
    p.add_argument("--ssh-key", action="extend", nargs="+", default=[], metavar="FILE",
                   help="technicians' public key file(s) (authorized_keys format)")
    p.add_argument("--keep-secrets", metavar="DIR", help="also keep each box's private key "
                   "and certificate in DIR (by default the key exists only on the target)")
    p.add_argument("--days", type=int, default=825, help="certificate validity (days)")


def network_from(args: argparse.Namespace) -> Network:
    """The network settings the options ask for (validated)."""
    if args.wifi_ssid or args.wifi_psk_file:
        if args.static:
            raise ProvisionError("--static with --wifi-ssid: choose wired static or Wi-Fi")
        if not (args.wifi_ssid and args.wifi_psk_file):
            raise ProvisionError("Wi-Fi needs both --wifi-ssid and --wifi-psk-file")
        return check_network(Network("wifi", ssid=args.wifi_ssid,
                                     psk=read_psk(args.wifi_psk_file)))
    if args.static:
        if not args.gateway:
            raise ProvisionError("--static needs --gateway (and --dns)")
        return check_network(Network("static", args.static, args.gateway, tuple(args.dns)))
    if args.gateway or args.dns:
        raise ProvisionError("--gateway/--dns only with --static IP/NN")
    return Network()


def settings_from(args: argparse.Namespace, device_id: str, hostname: str = "") -> BoxSettings:
    """BoxSettings from the shared options (and --days checked)."""
    if not 1 <= args.days <= 3650:
        raise ProvisionError(f"--days {args.days}: allowed 1 to 3650 (the CA's own expiry "
                             "caps it too)")
    host, port = parse_broker(args.broker)
    return BoxSettings(device_id, host, port, args.group, hostname, network_from(args),
                       read_ssh_keys(args.ssh_key))


def open_pki(folder: str) -> FleetPki:
    """The fleet CA folder, refused when it has no CA."""
    pki = FleetPki(folder)
    if not pki.exists():
        raise ProvisionError(f"--pki {folder}: no CA there (ca.crt and ca.key); create it "
                             f"with `echoel pki init --dir {folder}`")
    return pki


def add_provision_parser(sub) -> None:
    """Add `provision` and `first-boot` to the `echoel` parser."""
    p = sub.add_parser("provision", help="give one box (image file or card) its identity and "
                       "settings: device id, key and certificate, broker, network, SSH keys")
    p.add_argument("target", help="image file or card (/dev/sdX) with the Echoel layout")
    p.add_argument("--device-id", required=True, help="the box's id (certificate CN)")
    p.add_argument("--hostname", default="", help="host name (default: the device id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_box_settings_args(p, broker_required=True)
    p.set_defaults(func=cmd_provision)
    add_first_boot_parser(sub)


def add_first_boot_parser(sub) -> None:
    """Add `first-boot` (run on the box by its first-boot unit)."""
    p = sub.add_parser("first-boot", help="on the box: apply /data/provisioning (hostname, "
                       "network, SSH keys, agent) or report the box unprovisioned")
    p.add_argument("--root", default="/", help="the system tree to configure (default /)")
    p.add_argument("--data", default="/data", help="the mounted data partition (default /data)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_first_boot)


def cmd_provision(args: argparse.Namespace) -> int:
    """Provision one target."""
    try:
        settings = settings_from(args, args.device_id, args.hostname)
        got = provision_target(args.target, settings, open_pki(args.pki), args.keep_secrets,
                               args.days)
    except (ProvisionError, PkiError, LayoutError) as exc:
        print(f"echoel provision: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(got.to_json(), indent=1))
    else:
        print(f"provisioned {got.target}: device {got.device_id}, certificate serial "
              f"{got.serial:x}" + (f"; key kept in {got.kept_key}" if got.kept_key else
                                   "; the private key exists only on the target"))
    return 0


def cmd_first_boot(args: argparse.Namespace) -> int:
    """Apply the provisioning; exit 0 when done, provisioned or not (an unprovisioned box
    is a state, reported in state.json and box.toml: the stack starts, the agent stays
    disabled); 2 when the box's config cannot be written."""
    try:
        done = first_boot.apply(args.root, args.data)
    except ProvisionError as exc:
        print(f"echoel first-boot: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(done.to_json(), indent=1))
    elif done.state == "provisioned":
        print(f"provisioned: device {done.device_id}, hostname {done.hostname}, SSH keys in "
              f"{done.ssh_keys_file}" + (f"; warning: {done.warning}" if done.warning else ""))
    else:
        print(f"UNPROVISIONED: {done.reason}; the fleet agent stays disabled")
    return 0
