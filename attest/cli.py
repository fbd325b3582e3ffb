"""`kai-attest`: keygen, bundle and verify.

Exit codes follow docs/bundle-format.md: 0 every check holds, 1 a check failed (one line per
failure: check, file, expected, found), 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import sys

from attest.bundle import make_bundle
from attest.chain import ChainError
from attest.signing import KeyError_, keygen
from attest.verify import BundleUnreadable, verify_bundle


def _cmd_keygen(args: argparse.Namespace) -> int:
    priv, pub = keygen(args.out_dir)
    print(f"private key: {priv} (keep it secret; mode 0600)")
    print(f"public key:  {pub} (give this to evaluators)")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    out = make_bundle(args.run_dir, args.out or f"{args.run_dir}/bundle", include_data=not args.no_data)
    print(f"bundle: {out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    report = verify_bundle(args.bundle, args.trust)
    if args.json:
        print(report.to_json())
    else:
        for f in report.findings:
            print(f.line())
        for n in report.notes:
            print(f"note  {n}")
        failed = sum(not f.ok for f in report.findings)
        print(f"verdict: {'PASS' if report.ok else f'FAIL ({failed} finding(s))'}  {report.bundle}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kai-attest", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="make an ECDSA P-256 signing key pair")
    k.add_argument("out_dir")
    k.set_defaults(func=_cmd_keygen)
    b = sub.add_parser("bundle", help="assemble a bundle from a run directory")
    b.add_argument("run_dir")
    b.add_argument("--out", help="output folder (default RUN_DIR/bundle)")
    b.add_argument("--no-data", action="store_true", help="leave shard files out (manifests stay)")
    b.set_defaults(func=_cmd_bundle)
    v = sub.add_parser("verify", help="verify a bundle offline")
    v.add_argument("bundle")
    v.add_argument("--trust", action="append", default=[], metavar="PUBKEY.pem",
                   help="public key(s) to trust (default: the key in the bundle, with a note)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BundleUnreadable, ChainError, KeyError_, FileNotFoundError) as e:
        print(f"kai-attest: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
