"""`echoel flash IMAGE TARGET...`: write the image to cards or files in parallel, verify by
read-back, provision each with its own identity, print a summary table (and JSON)."""

from __future__ import annotations

import argparse
import sys

from echoel.provisioning import flash
from echoel.provisioning.image_layout import LayoutError
from echoel.provisioning.pki import PkiError
from echoel.provisioning.provision import ProvisionError
from echoel.provisioning.provision_cli import add_box_settings_args, open_pki, settings_from


def add_flash_parser(sub) -> None:
    """Add `flash` to the `echoel` parser."""
    p = sub.add_parser("flash", help="write the box image to cards or image files (bmaptool, "
                       "read-back verified), provisioning each with its own identity")
    p.add_argument("image", help="IMAGE.img or IMAGE.img.zst, with IMAGE.img.bmap beside it")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="whole cards (/dev/sdX, /dev/mmcblkN) or image files to write")
    p.add_argument("--bmap", help="the block map (default: beside the image)")
    p.add_argument("--batch", metavar="CSV", help="manifest: device_id with target and/or "
                   "serial (optional hostname, group) per line")
    p.add_argument("--jobs", type=int, default=4, help="targets written at the same time")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON ('-': "
                   "stdout, instead of the table)")
    p.add_argument("--no-image-check", action="store_true", help="skip checking the image "
                   "against its bmap before writing (bmaptool still verifies while writing)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_box_settings_args(p, broker_required=False)
    p.set_defaults(func=cmd_flash)


def cmd_flash(args: argparse.Namespace) -> int:
    """Flash: 0 all written and verified, 1 some target failed, 2 refused before writing."""
    if not 1 <= args.jobs <= 64:
        print(f"echoel flash: --jobs {args.jobs}: allowed 1 to 64", file=sys.stderr)
        return 2
    try:
        if bool(args.pki) != bool(args.broker):
            raise ProvisionError("provisioning needs both --pki DIR and --broker HOST[:PORT] "
                                 "(or neither: flash only)")
        batch = flash.read_batch(args.batch) if args.batch else None
        pki = open_pki(args.pki) if args.pki else None
        base = settings_from(args, "placeholder-id") if pki else None
        bmap, jobs = flash.plan(args.image, args.targets, args.bmap, batch, base)
        run = flash.flash(args.image, jobs, bmap, pki, args.jobs, sys.stderr, args.quiet,
                          not args.no_image_check, args.keep_secrets, args.days)
    except (flash.FlashError, ProvisionError, PkiError, LayoutError) as exc:
        print(f"echoel flash: {exc}", file=sys.stderr)
        return 2
    if args.json:
        flash.write_summary_json(args.json, run)
    if args.json != "-":
        print(flash.summary_table(run))
    return 0 if run.ok else 1
