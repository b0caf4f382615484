"""`echoel models ...`: list, install, activate, roll back and verify on-device models.

daemon/cli.py adds these with `add_models_parser(sub)`. The store folder comes from --store,
else $ECHOEL_MODEL_STORE, else /var/lib/echoel/models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from echoel.daemon.model_store import ModelRefusedError, ModelStore

DEFAULT_STORE = "/var/lib/echoel/models"


def store_path(arg: str | None) -> Path:
    """The store folder: the option, $ECHOEL_MODEL_STORE, or the default."""
    return Path(arg or os.environ.get("ECHOEL_MODEL_STORE") or DEFAULT_STORE)


def cmd_list(args: argparse.Namespace) -> int:
    """Print every installed version; `*` marks the active one."""
    st = ModelStore(store_path(args.store))
    rows = st.list()
    if args.json:
        print(json.dumps([{"name": m.name, "version": m.version, "active": m.active,
                           "previous": st.previous_version(m.name) == m.version,
                           "sha256": m.manifest.sha256, "size": m.manifest.size,
                           "licence": m.manifest.licence} for m in rows], indent=2))
        return 0
    if not rows:
        print(f"no models in {st.root}")
        return 0
    for m in rows:
        mark = "*" if m.active else ("p" if st.previous_version(m.name) == m.version else " ")
        print(f"{mark} {m.name:<20} {m.version:<12} {m.manifest.size:>10} B  "
              f"{m.manifest.sha256[:16]}  {m.manifest.licence}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Install a model file or URL with its manifest."""
    m = ModelStore(store_path(args.store)).install(args.source, args.manifest,
                                                   activate=args.activate)
    print(f"installed {m.name} {m.version} ({m.model_path})" + (" active" if m.active else ""))
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    """Make one installed version active."""
    m = ModelStore(store_path(args.store)).activate(args.name, args.version)
    print(f"{m.name} {m.version} active")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Go back to the previously active version."""
    m = ModelStore(store_path(args.store)).rollback(args.name)
    print(f"{m.name} rolled back to {m.version}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every installed version again; exit 1 when any fails."""
    results = ModelStore(store_path(args.store)).verify()
    bad = 0
    for r in results:
        state = "ok" if r.ok else "FAILED"
        print(f"{'*' if r.active else ' '} {r.name:<20} {r.version:<12} {state}"
              + (f": {r.error}" if r.error else ""))
        bad += not r.ok
    if not results:
        print(f"no models in {store_path(args.store)}")
    return 1 if bad else 0


def cmd_models(args: argparse.Namespace) -> int:
    """Dispatch `echoel models ACTION`; a refused model is reported, exit status 1."""
    try:
        return args.models_func(args)
    except ModelRefusedError as exc:
        print(f"echoel models {args.models_action}: {exc}", file=sys.stderr)
        return 1


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `models list|install|activate|rollback|verify` to the `echoel` subparsers."""
    p = subparsers.add_parser("models", help="on-device models: list, install, activate, "
                                             "rollback, verify")
    p.add_argument("--store", help=f"model store folder (default $ECHOEL_MODEL_STORE or "
                                   f"{DEFAULT_STORE})")
    sub = p.add_subparsers(dest="models_action", required=True)
    q = sub.add_parser("list", help="installed models; * active, p previous")
    q.add_argument("--json", action="store_true")
    q.set_defaults(models_func=cmd_list)
    q = sub.add_parser("install", help="install a model from a file or http/https/file URL")
    q.add_argument("source", metavar="FILE_OR_URL")
    q.add_argument("--manifest", help="its manifest.json (default: one beside the file)")
    q.add_argument("--activate", action="store_true", help="make it active once installed")
    q.set_defaults(models_func=cmd_install)
    q = sub.add_parser("activate", help="make an installed version active")
    q.add_argument("name")
    q.add_argument("version")
    q.set_defaults(models_func=cmd_activate)
    q = sub.add_parser("rollback", help="make the previously active version active again")
    q.add_argument("name")
    q.set_defaults(models_func=cmd_rollback)
    q = sub.add_parser("verify", help="check size, sha256 and tensors of every version")
    q.set_defaults(models_func=cmd_verify)
    p.set_defaults(func=cmd_models)
    return p
