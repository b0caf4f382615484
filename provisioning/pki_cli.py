"""`echoel pki`: the fleet CA, device/service/broker certificates, revocation, broker files."""

from __future__ import annotations

import argparse
import json

from echoel.provisioning.broker_files import write_broker_files
from echoel.provisioning.pki import SERVICE_PREFIX, FleetPki, PkiError

DEFAULT_DIR = "/etc/echoel-fleet/pki"


def add_pki_parser(sub) -> None:
    """Add `pki` and its subcommands to the `echoel` parser."""
    p = sub.add_parser("pki", help="the fleet CA: init, issue, revoke, list, broker-files")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"the PKI folder (default {DEFAULT_DIR})")
    s = p.add_subparsers(dest="pki_cmd", required=True)
    s.add_parser("init", help="create the CA (once)").add_argument("--org", default="Echoel fleet")
    q = s.add_parser("issue", help="issue a certificate: device ID | service fleet-NAME | "
                     "broker NAME")
    q.add_argument("kind", choices=("device", "service", "broker"))
    q.add_argument("name")
    q.add_argument("--days", type=int, default=825)
    q.add_argument("--dns", action="append", default=[], help="broker: DNS name (repeat)")
    q.add_argument("--ip", action="append", default=[], help="broker: IP address (repeat)")
    r = s.add_parser("revoke", help="revoke a certificate (the broker refuses it after a "
                     "restart/reload)")
    r.add_argument("kind", choices=("device", "service", "broker"))
    r.add_argument("name")
    s.add_parser("list", help="certificates issued")
    b = s.add_parser("broker-files", help="write mosquitto.conf and the ACL")
    b.add_argument("--out", required=True)
    b.add_argument("--port", type=int, default=8883)
    b.add_argument("--bind", default="0.0.0.0")
    b.add_argument("--service", action="append", default=[], help="fleet service CNs")
    p.set_defaults(func=cmd_pki)


def cmd_pki(args: argparse.Namespace) -> int:
    """Run one `echoel pki` subcommand."""
    pki = FleetPki(args.dir)
    try:
        if args.pki_cmd == "init":
            print(f"CA created: {pki.init(args.org)}")
        elif args.pki_cmd == "issue":
            if args.kind == "device" and args.name.startswith(SERVICE_PREFIX):
                raise PkiError(f"device id {args.name!r}: names starting with "
                               f"{SERVICE_PREFIX!r} are for fleet services")
            if args.kind == "service" and not args.name.startswith(SERVICE_PREFIX):
                raise PkiError(f"service name {args.name!r}: must start with "
                               f"{SERVICE_PREFIX!r} (the ACL gives those names fleet rights)")
            got = pki.issue(args.kind, args.name, args.days, tuple(args.dns), tuple(args.ip))
            print(f"issued {args.kind} {args.name}: {got.cert} (key {got.key}, mode 0600)")
        elif args.pki_cmd == "revoke":
            n = pki.revoke(args.kind, args.name)
            print(f"revoked {n} certificate(s) of {args.kind} {args.name}; CRL: {pki.crl_path} "
                  "(restart the broker to apply it)")
        elif args.pki_cmd == "list":
            print(json.dumps(pki.list(), indent=1))
        elif args.pki_cmd == "broker-files":
            services = args.service or ["fleet-service"]
            conf = write_broker_files(pki, args.out, args.port, services, args.bind, True)
            print(f"broker config: {conf}")
    except PkiError as exc:
        print(f"echoel pki: {exc}")
        return 2
    return 0
