"""`kai-attest`: keygen, bundle and verify.

Exit codes follow docs/bundle-format.md: 0 every check holds against a trust root the evaluator
supplied (--trust or policy keys), 1 a check failed (one line per failure: check, file, expected,
found), 2 usage error or unreadable input, 3 every check holds but only against the key shipped in
the bundle (integrity only: who signed is not established, so this is not a pass).
"""

from __future__ import annotations

import argparse
import sys

from attest.bundle import make_bundle
from attest.chain import ChainError
from attest.findings import term_safe
from attest.signing import KeyError_, keygen
from attest.verify import BundleUnreadable, tool_version, verify_bundle


def _cmd_keygen(args: argparse.Namespace) -> int:
    priv, pub = keygen(args.out_dir)
    print(f"private key: {priv} (keep it secret; mode 0600)")
    print(f"public key:  {pub} (give this to evaluators)")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    out = make_bundle(args.run_dir, args.out or f"{args.run_dir}/bundle", include_data=not args.no_data)
    print(f"bundle: {out}")
    return 0


def _replay_arg(v: str) -> int | str:
    if v == "all":
        return "all"
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--replay takes a number of segments or 'all', not {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("--replay takes a non-negative number of segments")
    return n


def _cmd_verify(args: argparse.Namespace) -> int:
    # Imported here so that `kai-attest keygen` never pays for numpy.
    from attest.archive import ArchiveError, opened_bundle
    from attest.policy import Policy, PolicyError, load_policy

    try:
        policy = load_policy(args.policy) if args.policy else Policy()
        with opened_bundle(args.bundle, policy.limits["max_bundle_bytes"], policy.limits["max_archive_members"]) as root:
            report = verify_bundle(root, args.trust, policy, replay=args.replay, replay_seed=args.replay_seed,
                                   replay_data=args.replay_data, progress=args.progress)
            report.bundle = args.bundle
    except (PolicyError, ArchiveError) as e:
        print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
        return 2
    except (BundleUnreadable, ChainError, KeyError_, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - hostile input must never end in a traceback
        print(term_safe(f"kai-attest: error: internal error while verifying {args.bundle} ({type(e).__name__}: {e})"),
              file=sys.stderr)
        return 2
    if args.report:
        from attest.report import write_html

        try:
            write_html(report, args.report)
        except OSError as e:
            print(f"kai-attest: error: cannot write {args.report} ({e.strerror})", file=sys.stderr)
            return 2
    if args.json:
        print(report.to_json())  # ASCII: json escapes every control and non-ASCII character
    else:  # bundle strings are escaped (term_safe); the verdict is always the last line printed
        for f in report.findings:
            print(f.line())
        for n in report.notes:
            print(f"note  {term_safe(n)}")
        sys.stderr.flush()
        print(term_safe(report.verdict_line()), flush=True)
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kai-attest", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {tool_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="make an ECDSA P-256 signing key pair")
    k.add_argument("out_dir")
    k.set_defaults(func=_cmd_keygen)
    b = sub.add_parser("bundle", help="assemble a bundle from a run directory")
    b.add_argument("run_dir")
    b.add_argument("--out", help="output folder (default RUN_DIR/bundle)")
    b.add_argument("--no-data", action="store_true", help="leave shard files out (manifests stay)")
    b.set_defaults(func=_cmd_bundle)
    v = sub.add_parser("verify", help="verify a bundle offline (docs/evaluators-guide.md)",
                       description="Verify a bundle folder, .tar or .tar.gz offline. Exit 0: every check holds against "
                       "a key you trust (--trust or policy keys); 1: a check failed (one FAIL line each: check, file, "
                       "expected, found); 2: usage error or unreadable input; 3: every check holds but only against "
                       "the key shipped in the bundle (integrity only, not a pass).")
    v.add_argument("bundle", help="bundle folder, or a .tar / .tar.gz of one (extracted safely to a temp folder)")
    v.add_argument("--trust", action="append", default=[], metavar="PUBKEY.pem",
                   help="public key(s) to trust (without one: the key in the bundle, integrity only, exit 3)")
    v.add_argument("--policy", metavar="FILE", help="the evaluator's policy, JSON (docs/policy.example.json)")
    v.add_argument("--replay", type=_replay_arg, metavar="N|all",
                   help="replay N randomly chosen checkpoint segments, or all of them")
    v.add_argument("--replay-seed", type=int, metavar="S", help="seed of the segment choice (default: fresh randomness)")
    v.add_argument("--replay-data", action="store_true",
                   help="recompute the dedup and pack shards from the ingest shards and the declared tokenizer "
                        "(needs the shards in the bundle and kai-train's data pipelines)")
    v.add_argument("--report", metavar="FILE.html", help="also write a self-contained HTML report")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="hashing and replay progress on stderr: a bar on a terminal; elsewhere plain lines for "
                        "work that runs longer than a few seconds (auto), from the start (always), or none")
    v.set_defaults(func=_cmd_verify)
    _add_lineage_parser(sub)
    return p


def _cmd_lineage(args: argparse.Namespace) -> int:
    # Imported here: scipy is needed by this command only.
    from attest.lineage import LineageInputError, lineage
    from attest.lineage_report import write_html

    given = {"alpha": args.alpha, "null_draws": args.null_draws, "seed": args.seed}
    opts = {k: v for k, v in given.items() if v is not None}  # unset: the defaults in attest/lineage.py
    try:
        report = lineage(args.candidate, args.reference, **opts)
        if args.report:
            write_html(report, args.report)
    except (LineageInputError, OSError) as e:
        print(f"kai-attest: error: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else "\n".join(report.lines()))
    return 1 if report.dependent else 0


def _add_lineage_parser(sub: argparse._SubParsersAction) -> None:
    ln = sub.add_parser(
        "lineage", help="test each component for independence from reference models (docs/lineage.md)",
        description="Per-component independence test (matched |correlation|, residual-stream permutation "
        "null, Bonferroni). Exit 0: completed, no component dependent on a reference; 1: completed, at "
        "least one component dependent on a reference (the positive control does not count); 2: usage "
        "error or unreadable input.")
    ln.add_argument("candidate", help="safetensors file, folder of them, or a bundle (its release is tested, "
                    "its genesis is the positive control)")
    ln.add_argument("--reference", nargs="+", action="extend", required=True, metavar="REF",
                    help="reference model(s): safetensors files, folders or bundles")
    ln.add_argument("--json", action="store_true", help="print the results as JSON")
    ln.add_argument("--report", metavar="FILE.html", help="also write a self-contained HTML report")
    ln.add_argument("--alpha", type=float, help="family-wise level before Bonferroni (default 1e-3)")
    ln.add_argument("--null-draws", type=int, help="residual-stream permutations in the null (default 99)")
    ln.add_argument("--seed", type=int, help="seed of the null draws (default 0)")
    ln.set_defaults(func=_cmd_lineage)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BundleUnreadable, ChainError, KeyError_, FileNotFoundError) as e:
        print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
