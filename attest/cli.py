"""`kai-attest`: keygen, bundle, verify (optionally signing the verdict as a VSA), check-vsa, challenge,
respond, lineage.

Exit codes follow docs/bundle-format.md: 0 every check holds against a trust root the evaluator
supplied (--trust or policy keys), 1 a check failed (one line per failure: check, file, expected,
found), 2 usage error or unreadable input, 3 every check holds but only against the key shipped in
the bundle (integrity only: who signed is not established, so this is not a pass), 4 every check that
ran holds but the claim was not recomputed (incomplete, not a pass): no segment drawn by the evaluator
and the last segment were replayed (--no-replay, an install without torch, a segment above the
policy's replay limits, a tolerance replay without a drift budget), or a light bundle's held state
has not been produced on challenge.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

from attest import tool_version
from attest.bundle import make_bundle
from attest.errors import KaiError
from attest.verify.findings import term_safe
from attest.signing import keygen
from attest.verify import verify_bundle


def _cmd_keygen(args: argparse.Namespace) -> int:
    priv, pub = keygen(args.out_dir)
    print(f"private key: {priv} (keep it secret; mode 0600)")
    print(f"public key:  {pub} (give this to evaluators)")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    out = make_bundle(args.run_dir, args.out or f"{args.run_dir}/bundle", include_data=not args.no_data,
                      light=args.light)
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


def _worlds_arg(v: str) -> tuple[int, ...]:
    try:
        worlds = tuple(int(x) for x in v.split(","))
    except ValueError:
        worlds = ()
    if len(worlds) != 2 or worlds[0] == worlds[1] or min(worlds) < 1:
        raise argparse.ArgumentTypeError(f"--replay-worlds takes two different rank counts, e.g. 1,2; not {v!r}")
    return worlds


def _cmd_verify(args: argparse.Namespace) -> int:
    # Imported here so that `kai-attest keygen` never pays for numpy.
    from attest.archive import opened_bundle
    from attest.challenge import load_challenge
    from attest.verify.policy import Policy, load_policy, parse_drift

    if args.no_replay and args.replay not in (None, 0):
        print("kai-attest: error: --no-replay and --replay N go against each other", file=sys.stderr)
        return 2
    if args.max_drift is not None:
        try:
            args.max_drift = parse_drift(args.max_drift, "--max-drift")
        except KaiError as e:
            print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
            return 2
    if bool(args.vsa) != bool(args.sign_key):
        print("kai-attest: error: --vsa OUT and --sign-key KEY.pem go together", file=sys.stderr)
        return 2
    if args.sign_key:
        from attest.signing import PemSigner

        PemSigner.from_file(args.sign_key)  # a bad key fails now (exit 2), not after the verification
    try:
        policy = load_policy(args.policy) if args.policy else Policy()
        challenge = load_challenge(Path(args.challenge)) if args.challenge else None
        with opened_bundle(args.bundle, policy.limits["max_bundle_bytes"], policy.limits["max_archive_members"]) as root:
            report = verify_bundle(root, args.trust, policy, replay=0 if args.no_replay else args.replay,
                                   replay_seed=args.replay_seed,
                                   replay_data=args.replay_data, replay_mode=args.replay_mode,
                                   replay_worlds=args.replay_worlds, light=args.light,
                                   packs=Path(args.packs) if args.packs else None, challenge=challenge,
                                   progress=args.progress, max_drift=args.max_drift)
            report.bundle = args.bundle
            if args.vsa:  # the VSA names the released files; read them while the bundle is open
                from attest.signing import PemSigner
                from attest.slsa import write_vsa

                write_vsa(report, root, args.bundle, args.policy, Path(args.vsa), PemSigner.from_file(args.sign_key))
    except KaiError as e:  # an unreadable bundle, policy, archive, challenge or key: one line, exit 2
        print(error_line(e), file=sys.stderr)
        return 2
    except OSError as e:  # --vsa OUT not writable, a missing bundle: one line naming the file
        if getattr(e, "filename", None) == args.vsa:
            print(f"kai-attest: error: cannot write {term_safe(args.vsa)} ({e.strerror})", file=sys.stderr)
            return 2
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # hostile input must never end in a traceback: a verifier bug is named as one
        if os.environ.get("KAI_ATTEST_TRACEBACK"):
            raise
        print(term_safe(f"kai-attest: error: internal error while verifying {args.bundle} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:500]})"), file=sys.stderr)
        return 2
    if args.report:
        from attest.verify.report import write_html

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


def _cmd_check_vsa(args: argparse.Namespace) -> int:
    from attest.signing import PublicKeyVerifier
    from attest.slsa import check_vsa

    try:
        ok, line = check_vsa(Path(args.vsa), PublicKeyVerifier.from_file(args.key), Path(args.artifact),
                             args.policy, args.resource_uri)
    except KaiError as e:
        print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kai-attest: error: {term_safe(f'{e.filename or args.artifact}: {e.strerror or e}')}", file=sys.stderr)
        return 2
    for part in line.splitlines():
        print(term_safe(part))
    return 0 if ok else 1


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
    b.add_argument("--light", action="store_true",
                   help="leave out the heavy state (genesis and checkpoint shards, data shard files): held by the "
                        "team and produced on challenge (docs/evaluators-guide.md)")
    b.set_defaults(func=_cmd_bundle)
    v = sub.add_parser("verify", help="verify a bundle offline (docs/evaluators-guide.md)",
                       description="Verify a bundle folder, .tar or .tar.gz offline. Exit 0: every check holds against "
                       "a key you trust (--trust or policy keys); 1: a check failed (one FAIL line each: check, file, "
                       "expected, found); 2: usage error or unreadable input; 3: every check holds but only against "
                       "the key shipped in the bundle (integrity only, not a pass); 4: every check that ran holds "
                       "but nothing was recomputed, or held state was not produced (incomplete, not a pass).")
    v.add_argument("bundle", help="bundle folder, or a .tar / .tar.gz of one (extracted safely to a temp folder)")
    v.add_argument("--trust", action="append", default=[], metavar="PUBKEY.pem",
                   help="public key(s) to trust (without one: the key in the bundle, integrity only, exit 3)")
    v.add_argument("--policy", metavar="FILE", help="the evaluator's policy, JSON (docs/policy.example.json)")
    v.add_argument("--replay", type=_replay_arg, metavar="N|all",
                   help="replay N checkpoint segments drawn at random, plus the last one always, or all of them "
                        "(default: the policy's replay.segments, 1; a PASS needs at least one replayed segment)")
    v.add_argument("--no-replay", action="store_true",
                   help="replay nothing (the same as --replay 0): a quick integrity check whose best verdict is "
                        "INCOMPLETE (exit 4), never PASS")
    v.add_argument("--replay-seed", type=int, metavar="S", help="seed of the segment choice (default: fresh randomness)")
    v.add_argument("--replay-mode", choices=("auto", "exact", "tolerance"), default="auto",
                   help="every segment is first replayed bit for bit at its recorded layout. auto (default): when "
                        "that does not reproduce it, two tolerance replays on other world sizes measure the noise "
                        "floor; exact: no tolerance; tolerance: measure the floor in any case (report figures)")
    v.add_argument("--replay-worlds", type=_worlds_arg, metavar="A,B",
                   help="tolerance mode's two world sizes (default 1,2)")
    v.add_argument("--max-drift", metavar="FRACTION",
                   help="tolerance mode's drift budget: the fraction of a segment's update (e.g. 1e-3 or 0.1%%) a "
                        "claimed state may be off and still pass (default: the policy's replay.max_drift; none: "
                        "tolerance gives at best INCOMPLETE)")
    v.add_argument("--replay-data", action="store_true",
                   help="recompute the dedup and pack shards from the ingest shards and the declared tokenizer "
                        "(needs the shards in the bundle and kai-train's data pipelines)")
    v.add_argument("--light", action="store_true",
                   help="a light bundle: heavy state it leaves out is held by the team (verdict INCOMPLETE, exit 4, "
                        "until a challenge is answered)")
    v.add_argument("--challenge", metavar="CHALLENGE.json", help="your challenge (kai-attest challenge); with --packs")
    v.add_argument("--packs", metavar="PACKS", help="the team's packs answering --challenge: their segments are replayed")
    v.add_argument("--report", metavar="FILE.html", help="also write a self-contained HTML report")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--vsa", metavar="OUT", help="also write the verdict as a signed SLSA Verification Summary "
                   "Attestation (in-toto, DSSE in a Sigstore bundle); needs --sign-key")
    v.add_argument("--sign-key", metavar="KEY.pem", help="the evaluator's private key that signs --vsa")
    v.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="hashing and replay progress on stderr: a bar on a terminal; elsewhere plain lines for "
                        "work that runs longer than a few seconds (auto), from the start (always), or none")
    v.set_defaults(func=_cmd_verify)
    c = sub.add_parser("challenge", help="draw segments to audit from a received bundle (evaluator)",
                       description="Draw K segments with fresh randomness (or --seed) and bind them to the bundle's "
                       "chain; send the challenge file to the team, keep your copy for verify --challenge.")
    c.add_argument("bundle")
    c.add_argument("--segments", type=int, required=True, metavar="K")
    c.add_argument("--seed", type=int, help="seed of the draw (default: fresh randomness, recorded in the file)")
    c.add_argument("--out", required=True, metavar="CHALLENGE.json")
    c.set_defaults(func=_cmd_challenge)
    r = sub.add_parser("respond", help="write the segment packs a challenge asks for (team)")
    r.add_argument("run_dir")
    r.add_argument("challenge", metavar="CHALLENGE.json")
    r.add_argument("--out", required=True, metavar="PACKS")
    r.set_defaults(func=_cmd_respond)
    c = sub.add_parser("check-vsa", help="check a verification summary written by verify --vsa",
                       description="Exit 0: signed by KEY, PASSED, and about the artifact in hand (its files, chain "
                                   "and policy); 1: FAILED, not signed by KEY, or about other files; 2: unreadable.")
    c.add_argument("vsa")
    c.add_argument("artifact", metavar="BUNDLE", help="the bundle (or its export/ folder) the VSA is about")
    c.add_argument("--policy", metavar="FILE", help="the policy the verdict must have been reached under "
                   "(default: kai-attest's default policy)")
    c.add_argument("--resource-uri", metavar="URI", help="the resource URI the VSA must name")
    c.add_argument("--key", required=True, metavar="PUBKEY.pem", help="the evaluator's public key")
    c.set_defaults(func=_cmd_check_vsa)
    _add_lineage_parser(sub)
    return p


def _cmd_challenge(args: argparse.Namespace) -> int:
    import json

    from attest.challenge import draw

    try:
        c = draw(Path(args.bundle), args.segments, args.seed)
    except (KaiError, FileNotFoundError) as e:
        print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(c, indent=1) + "\n")
    print(f"challenge: segments {[s['segment'] for s in c['segments']]} of {c['segments_total']} "
          f"(steps {[s['step'] for s in c['segments']]}) -> {args.out}")
    return 0


def _cmd_respond(args: argparse.Namespace) -> int:
    from attest.challenge import respond

    try:
        packs = respond(Path(args.run_dir), Path(args.challenge), Path(args.out))
    except (KaiError, FileNotFoundError) as e:
        print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
        return 2
    for p in packs:
        print(f"pack: {p}")
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    # Imported here: scipy is needed by this command only (the `lineage` extra).
    try:
        from attest.lineage import PUBLIC_SEEDS, lineage
        from attest.lineage.report import write_html
    except ModuleNotFoundError as e:
        print(f"kai-attest: error: lineage needs {e.name} (pip install 'kai-train[lineage]')", file=sys.stderr)
        return 2

    given = {"alpha": args.alpha, "null_draws": args.null_draws, "seed": args.seed, "layout": args.layout,
             "reference_layout": args.reference_layout, "match_layers": args.match_layers or None,
             "public_seeds": None if args.public_seed is None else (*PUBLIC_SEEDS, *args.public_seed)}
    opts = {k: v for k, v in given.items() if v is not None}  # unset: the defaults in attest/lineage/__init__.py
    if not args.reference and not args.reference_name:
        print("kai-attest: error: lineage needs --reference or --reference-name", file=sys.stderr)
        return 2
    if args.reference_name and not args.registry:
        print("kai-attest: error: --reference-name needs --registry FILE.json", file=sys.stderr)
        return 2
    try:
        refs: list[Any] = list(args.reference or [])
        if args.reference_name:
            from attest.lineage.registry import open_references

            refs += open_references(args.registry, args.reference_name, args.registry_root)
        report = lineage(args.candidate, refs, **opts)
        if args.report:
            write_html(report, args.report)
    except (KaiError, OSError) as e:
        print(f"kai-attest: error: {term_safe(e)}", file=sys.stderr)
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
    ln.add_argument("--reference", nargs="+", action="extend", metavar="REF",
                    help="reference model(s): safetensors files, folders or bundles")
    ln.add_argument("--reference-name", nargs="+", action="extend", metavar="NAME",
                    help="reference model(s) by their name in --registry (files checked against its sha256)")
    ln.add_argument("--registry", metavar="FILE.json", help="a reference registry (docs/lineage.md)")
    ln.add_argument("--registry-root", metavar="DIR", help="where the registry's files are, as DIR/NAME/FILE "
                    "(default: the folder holding the registry)")
    ln.add_argument("--json", action="store_true", help="print the results as JSON")
    ln.add_argument("--report", metavar="FILE.html", help="also write a self-contained HTML report")
    ln.add_argument("--alpha", type=float, help="family-wise level before Bonferroni (default 1e-3)")
    ln.add_argument("--null-draws", type=int, help="residual-stream permutations in the null (default 99)")
    ln.add_argument("--seed", type=int, help="seed of the null draws (default 0)")
    ln.add_argument("--public-seed", type=int, action="append", metavar="S",
                    help="a kai-init/v2 genesis seed others may have started from too (repeatable; 1234 and "
                    "the seeds reference bundles record are always tried): a component both models inherit "
                    "from it reads 'shared initialisation', not dependent")
    ln.add_argument("--layout", metavar="NAME", help="how the candidate's tensor names are read: auto (default: "
                    "detected from the names), kai, llama, qwen2, qwen2-vl, qwen2.5-vl, qwen2-vl-vision, siglip, "
                    "clip, vit, llava, whisper")
    ln.add_argument("--reference-layout", metavar="NAME", help="the same for every reference given by path")
    ln.add_argument("--match-layers", action="store_true", help="match each candidate block to the most alike "
                    "reference block even when both stacks are equally deep (layers moved to another depth); "
                    "stacks of different depths are always matched")
    ln.set_defaults(func=_cmd_lineage)


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    return build_parser()


def error_line(e: BaseException) -> str:
    """The one line an entry point prints for an error it ends on (exit 2)."""
    if isinstance(e, (KaiError, argparse.ArgumentTypeError)):
        text = str(e)
    elif isinstance(e, OSError):  # a file the user named: which one and why
        name = e.filename if e.filename is not None else ""
        text = f"{name}: {e.strerror or type(e).__name__}" if name else f"{e.strerror or e}"
    elif isinstance(e, MemoryError):
        text = "out of memory (a bound the verifier does not know of was exceeded; please report it)"
    else:  # a bug of kai-attest, never the input's fault: named as such, with its type
        text = f"internal error ({type(e).__name__}: {e})"
    text = " ".join(str(text).split())
    return term_safe(f"kai-attest: error: {text[:2000]}")


def main(argv: list[str] | None = None) -> int:
    """Every command ends here: exit 0, 1, 3 or 4 with its own lines, or 2 with exactly one error
    line for any input (never a traceback). "internal error" names a bug, never bad input."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (KaiError, OSError, MemoryError, RecursionError) as e:
        if isinstance(e, RecursionError):  # nesting the readers did not bound: report, do not crash
            e = KaiError("input nested too deeply to read")
        print(error_line(e), file=sys.stderr)
        return 2
    except Exception as e:  # hostile input must never end in a traceback
        if os.environ.get("KAI_ATTEST_TRACEBACK"):
            raise
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
