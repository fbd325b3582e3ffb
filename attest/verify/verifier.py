"""The offline verifier: small named checks over a bundle, each returning findings.

`verify_bundle` reads the chain once, then runs every check in `CHECKS`. A check never raises
on bad content: it returns a failing `Finding` naming the file, what was expected and what was
found, or a skipped one saying why it could not run. Only an unreadable bundle (no chain, a chain
line that is not a bundle, an input above a size limit) raises `BundleUnreadable`, which the CLI
maps to exit 2.

Trust: keys shipped inside the bundle are never trusted by themselves. With `--trust` or a
policy that lists keys, only those keys verify signatures; with neither, the bundle's own key is
used and the verdict says "integrity only" (the bundle is self-consistent; who signed it is not
established).

Checks, in order (docs/bundle-format.md "What kai-attest verify checks" is the contract):
statement-format, signature, chain-sequence, chain-link, statement-order, timestamps,
subject-digest, weights-digest, oms-signature, run-config, genesis, trajectory, release, slsa-provenance,
data-lineage,
data-licence, data-sampler, data-replay, replay.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attest import tool_version
from attest.bundle import BundlePathError, safe_file
from attest.chain import ChainError, read_chain
from attest.verify.checks.chain import (
    check_links,
    check_order,
    check_sequence,
    check_signatures,
    check_statements,
    check_timestamps,
    token_time,
)
from attest.verify.checks.data import check_data_licence, check_data_lineage, check_data_sampler
from attest.verify.data_replay import check_data_replay
from attest.verify.checks.files import check_oms, check_run_config, check_subjects, check_weights
from attest.verify.checks.model import (
    DEFAULT_REPLAY_PLUGIN,
    DERIVERS,
    REPLAYERS,
    Replayer,
    check_genesis,
    check_release,
    check_replay,
    check_trajectory,
    replay_segments,
    trajectory_jobs,
)
from attest.verify.findings import HELD, UNDECIDED, BundleUnreadable, Context, Finding, as_dict, skipped, subjects_of
from attest.layout import CHAIN_NAME, KEYS_DIR
from attest.verify.policy import Policy
from attest.progress import Progress
from attest.verify.replay import register as _register_replay
from attest.signing import SigningKeyError, PublicKeyVerifier
from attest.slsa import check_slsa_provenance

_register_replay()  # the kai_train.replay plug-in (runs in a subprocess; torch is not imported here)

__all__ = ["CHECKS", "DEFAULT_REPLAY_PLUGIN", "DERIVERS", "REPLAYERS", "BundleUnreadable", "Context", "Finding",
           "Replayer", "Report", "check_data_licence", "check_data_lineage", "check_data_sampler", "check_data_replay", "check_genesis", "check_links",
           "check_oms", "check_order", "check_run_config", "check_release", "check_replay", "check_sequence", "check_signatures",
           "check_statements", "check_subjects", "check_timestamps", "check_trajectory", "check_weights",
           "load_trust", "replay_segments", "skipped", "token_time", "verify_bundle"]

CHECKS: list[Callable[[Context], Iterator[Finding]]] = [
    check_statements,
    check_signatures,
    check_sequence,
    check_links,
    check_order,
    check_timestamps,
    check_subjects,
    check_weights,
    check_oms,
    check_run_config,
    check_genesis,
    check_trajectory,
    check_release,
    check_slsa_provenance,
    check_data_lineage,
    check_data_licence,
    check_data_sampler,
    check_data_replay,
    check_replay,
]

# Checks that hash, derive or re-run at the scale of the model: they run only once the chain's
# statements parse and every signature verifies (cheap first: an unauthenticated bundle never makes
# the verifier hash terabytes, re-derive a declared 80-layer model, or replay).
BULK: dict[Callable[[Context], Iterator[Finding]], str] = {
    check_subjects: "subject-digest", check_weights: "weights-digest", check_oms: "oms-signature",
    check_genesis: "genesis", check_trajectory: "trajectory", check_release: "release",
    check_data_replay: "data-replay", check_replay: "replay",
}
GATE = ("statement-format", "signature")


@dataclass
class Report:
    bundle: str
    findings: list[Finding]
    notes: list[str]
    trust: str = "identity"  # "identity": trusted keys given; "integrity-only": the bundle's own key
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(f.ok or f.skipped for f in self.findings)

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok and not f.skipped]

    @property
    def skipped_checks(self) -> list[str]:
        return sorted({f.check for f in self.findings if f.skipped})

    @property
    def undecided(self) -> list[Finding]:
        """Parts that ran as far as they could and neither hold nor fail (INCOMPLETE)."""
        return [f for f in self.findings if f.skipped and f.detail.startswith(UNDECIDED)]

    @property
    def not_recomputed(self) -> list[str]:
        """Why the from-scratch claim was not recomputed here (empty: it was). A PASS needs at least
        one segment replayed that the evaluator's randomness drew, and the last segment (the one that
        yields the release) among the segments replayed."""
        rec = self.facts.get("recomputed")
        if not isinstance(rec, dict):
            return ["no segment was replayed (the replay check did not run)"]
        why = []
        if not rec.get("reproduced"):
            why.append(f"no segment was replayed ({rec.get('why') or 'none reproduced'})")
        elif not rec.get("last_reproduced"):
            why.append(f"the last segment (step {rec.get('last_step')}, the one that yields the release) was not "
                       "replayed")
        for f in self.undecided:  # a segment not decided (its line says why); check-wide reasons are in `why`
            if f.file:
                why.append(f"{f.file}: {f.detail[len(UNDECIDED) + 2:]}")
        return why

    @property
    def verdict(self) -> str:
        """"pass", "fail", "integrity-only" (every check holds, but only against the bundle's own key),
        or "incomplete" (every check of what ran holds, but held state was not produced, or nothing
        was recomputed: no PASS without recomputation)."""
        if not self.ok:
            return "fail"
        if self.trust == "integrity-only":
            return "integrity-only"
        if self.facts.get("held_files") and not self.facts.get("challenge"):
            return "incomplete"
        return "incomplete" if self.not_recomputed else "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": 1, "integrity-only": 3, "incomplete": 4}[self.verdict]

    def coverage_line(self) -> str:
        """k of n segments replayed and what escapes, for the verdict line and the report."""
        rec = self.facts.get("recomputed")
        if not isinstance(rec, dict):
            return "0 segments replayed"
        esc = rec.get("escape_probability") or {}
        shown = ", ".join(f"{p:.3g} (m={m})" for m, p in esc.items() if isinstance(p, (int, float)))
        return (f"{rec.get('reproduced', 0)} of {rec.get('segments', 0)} segments replayed"
                + (f", last included; a forgery confined to m other segments escapes with probability {shown}"
                   if rec.get("last_reproduced") and shown else ""))

    def verdict_line(self) -> str:
        if not self.ok:
            return f"verdict: FAIL ({len(self.failed)} finding(s))  {self.bundle}"
        extra = ["skipped: " + ", ".join(self.skipped_checks)] if self.skipped_checks else []
        if self.trust == "integrity-only":
            extra.insert(0, "signed by the key shipped in the bundle; pass --trust KEY.pem or a policy with keys")
            return f"verdict: INTEGRITY ONLY, not a pass ({'; '.join(extra)})  {self.bundle}"
        if self.facts.get("held_files") and not self.facts.get("challenge"):
            return (f"verdict: INCOMPLETE, not a pass (light bundle: every check of what it holds passes; "
                    f"{self.facts['held_files']} held file(s) are checked through a challenge: kai-attest challenge, "
                    f"then verify --packs)  {self.bundle}")
        if self.verdict == "incomplete":
            return (f"verdict: INCOMPLETE, not a pass (every check that ran holds, but not recomputed: "
                    f"{'; '.join(self.not_recomputed)})  {self.bundle}")
        extra.insert(0, self.coverage_line())
        return f"verdict: PASS ({'; '.join(extra)})  {self.bundle}"

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "verdict": self.verdict, "tool": {"name": "kai-attest", "version": tool_version()},
                "trust": self.trust, "recomputed": self.facts.get("recomputed"), "coverage": self.coverage_line(),
                "not_recomputed": self.not_recomputed,
                "skipped": self.skipped_checks, "findings": [asdict(f) for f in self.findings], "notes": self.notes,
                "facts": self.facts}

    def to_json(self) -> str:
        return json.dumps(_plain(self.to_dict()), indent=2, default=str)


def _plain(x: Any) -> Any:
    """JSON-safe: non-finite floats (an infinite update norm) become strings, as strict JSON wants."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def load_trust(root: Path, trust: list[str], policy: Policy | None = None) -> tuple[list[PublicKeyVerifier], bool]:
    """The verifying keys: --trust files and the policy's keys; only when neither names a key, the
    bundle's own keys (returns from_bundle=True: integrity only). A key pinned by keyid may come
    from the bundle's keys/ folder: the pin, not the folder, is what is trusted."""
    policy = policy or Policy()
    keys = [PublicKeyVerifier.from_file(t) for t in trust] + [PublicKeyVerifier.from_file(p) for p in policy.key_files]
    if not (trust or policy.pins_keys):
        return _bundle_keys(root, required=True), True
    have = {k.keyid for k in keys}
    keys += [k for k in _bundle_keys(root, required=False) if k.keyid in policy.keyids and k.keyid not in have]
    return keys, False


def _bundle_keys(root: Path, required: bool) -> list[PublicKeyVerifier]:
    keys_dir = root / KEYS_DIR
    names = sorted(p.name for p in keys_dir.glob("*.pub.pem")) if keys_dir.is_dir() and not keys_dir.is_symlink() else []
    if not names and required:
        raise BundleUnreadable(f"{root}: no --trust key given and no {KEYS_DIR}/*.pub.pem in the bundle (a keyless "
                               "chain verifies against a policy's sigstore_trusted_root and sigstore_identities)")
    try:
        return [PublicKeyVerifier.from_file(safe_file(root, f"{KEYS_DIR}/{n}", 1 << 20)) for n in names]
    except (BundlePathError, FileNotFoundError) as e:
        raise BundleUnreadable(f"{root}: {e}") from None


# Failures one check lists one by one; the rest become one summary line (the verdict counts them all).
MAX_FINDINGS_PER_CHECK = 100
MAX_BUNDLE_ENTRIES = 1_000_000  # files and folders under a bundle (or a packs) folder


def bundle_size(root: Path, limit: int) -> int:
    """Bytes of regular files under `root` (symlinks not followed), each charged its apparent size
    (a sparse file counts in full); BundleUnreadable above `limit`, or above MAX_BUNDLE_ENTRIES names."""
    total = entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        if entries > MAX_BUNDLE_ENTRIES:
            raise BundleUnreadable(f"{root}: more than {MAX_BUNDLE_ENTRIES} files and folders")
        for n in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > limit:
                    raise BundleUnreadable(f"{root}: more than {limit} bytes (policy limits.max_bundle_bytes)")
    return total


def verify_bundle(bundle: str | Path, trust: list[str] | None = None, policy: Policy | None = None,
                  replay: int | str | None = None, replay_seed: int | None = None,
                  checks: list[Callable[[Context], Iterator[Finding]]] | None = None, replay_data: bool = False,
                  replay_mode: str = "auto", replay_worlds: tuple[int, ...] | None = None, light: bool = False,
                  packs: Path | None = None, challenge: dict[str, Any] | None = None, progress: str = "never",
                  max_drift: float | None = None) -> Report:
    """Verify `bundle`. `replay`: segments to replay, N drawn at random (the last is always added),
    "all", or 0 for none (INCOMPLETE); None: the policy's default (replay.segments, 1 unless set).
    `max_drift`: tolerance mode's drift budget (else the policy's replay.max_drift; None: tolerance
    never passes). `light`: heavy state absent from it is held by the team (attest.challenge);
    `packs` + `challenge`: the team's packs for the evaluator's challenge, whose segments are replayed;
    `progress` (auto | always | never): hashing and replay progress on stderr (attest.progress)."""
    policy = policy or Policy()
    replay_default = replay is None
    if replay is None:
        replay = policy.replay_segments
    root = Path(bundle)
    if not root.is_dir() or root.is_symlink():
        raise BundleUnreadable(f"{root}: not a bundle folder")
    used = bundle_size(root, policy.limits["max_bundle_bytes"])
    if packs is not None:  # the packs are read like the bundle: charged against the same limit (sparse files too)
        if not packs.is_dir() or packs.is_symlink():
            raise BundleUnreadable(f"{packs}: not a folder of packs")
        bundle_size(packs, policy.limits["max_bundle_bytes"] - used)
    try:
        max_chain = policy.limits["max_chain_bytes"]
        entries, torn = read_chain(safe_file(root, CHAIN_NAME, max_chain), max_chain)
    except (FileNotFoundError, BundlePathError) as e:
        raise BundleUnreadable(f"{root}: {e}") from None
    except ChainError as e:
        raise BundleUnreadable(str(e)) from None
    except RecursionError:
        raise BundleUnreadable(f"{root / CHAIN_NAME}: a line is JSON nested too deeply") from None
    if not entries:
        raise BundleUnreadable(f"{root / CHAIN_NAME}: the chain is empty")
    try:
        trusted, from_bundle = load_trust(root, trust or [], policy)
    except SigningKeyError as e:
        raise BundleUnreadable(str(e)) from None
    pack_problems: list[str] = []
    if challenge is not None:
        from attest.challenge import open_packs

        if packs is None:
            raise BundleUnreadable("a challenge is answered by packs: give --packs PACKS with --challenge")
        folders, pack_problems = open_packs(root, packs, challenge, entries)
        replay = [s["segment"] for s in challenge["segments"]]  # type: ignore[assignment]
        light, replay_default = True, False
    elif packs is not None:
        raise BundleUnreadable("--packs needs --challenge CHALLENGE.json: the evaluator's own copy of the challenge "
                               "(a pack folder does not choose which segments are audited)")
    ctx = Context(root, entries, trusted, from_bundle, torn, policy=policy, replay=replay, replay_seed=replay_seed,
                  replay_data=replay_data, replay_mode=replay_mode, replay_worlds=replay_worlds, light=light,
                  max_drift=max_drift if max_drift is not None else policy.max_drift, replay_default=replay_default)
    if challenge is not None:
        ctx.files.overlays = folders
        ctx.facts["challenge"] = {"segments": replay, "of": challenge.get("segments_total"),
                                  "seed": challenge.get("seed"), "created": challenge.get("created")}
    if from_bundle:
        ctx.notes.append("no --trust key and no policy keys: trusted the public key shipped in the bundle "
                         "(proves integrity, not identity)")
    findings: list[Finding] = [Finding("challenge", False, "", "packs holding exactly the challenged segments' signed "
                                       "files", p) for p in pack_problems]
    if challenge is not None and not pack_problems:
        findings.append(Finding("challenge", True, str(packs), detail=f"{len(challenge['segments'])} segment pack(s) for a challenge "
                                f"drawn on this chain; every pack file is a signed subject (subject-digest checks it)"))
    prefetched = False
    for check in checks if checks is not None else CHECKS:
        if check in BULK:
            if ctx.failed & set(GATE):
                findings.append(skipped(BULK[check], "", f"not run: {' and '.join(sorted(ctx.failed & set(GATE)))} "
                                        "failed, and no bulk work is done on unauthenticated input"))
                continue
            if not prefetched:  # hash every subject in the background while the checks start
                # the trajectory check's update norms share the pool (both cores busy to the end)
                jobs = trajectory_jobs(ctx) if check_trajectory in (checks if checks is not None else CHECKS) else []
                with Progress("hashing", 0, "bytes", progress) as hashing:
                    ctx.files.prefetch(((s["name"], s["sha256"]) for e in entries for s in subjects_of(e)),
                                       hashing.update, jobs)
                prefetched = True
        bar = _replay_progress(ctx, progress) if check is check_replay else None
        shown: dict[str, int] = {}
        hidden: dict[str, tuple[int, Finding]] = {}
        for f in check(ctx):
            if not f.ok and not f.skipped:
                ctx.failed.add(f.check)
                shown[f.check] = shown.get(f.check, 0) + 1
                if shown[f.check] > MAX_FINDINGS_PER_CHECK:  # one summary line below instead
                    n, first = hidden.get(f.check, (0, f))
                    hidden[f.check] = (n + 1, first)
                    continue
            findings.append(f)
            if bar is not None and f.check == "replay" and not f.skipped:
                bar.advance()
        for name, (n, first) in hidden.items():
            findings.append(Finding(name, False, first.file, f"at most {MAX_FINDINGS_PER_CHECK} failures of one check "
                                    "listed", f"{n} more", detail="not listed one by one"))
        if bar is not None:
            bar.close()
    asked = ("replay",) * (not replay_default and replay not in (0, None)) + ("data-replay",) * bool(replay_data)
    gated = set(BULK.values()) if ctx.failed & set(GATE) else set()
    findings = _apply_required(findings, policy, whole=checks is None, asked=asked, gated=gated)
    ctx.facts["checkpoints"] = [
        {"step": e.predicate.get("step"), **{k: v for k, v in as_dict(e.predicate.get("metrics")).items()
                                             if isinstance(v, (int, float, str)) or v is None}}
        for e in ctx.of_kind("checkpoint")]
    return Report(str(root), findings, ctx.notes, "integrity-only" if from_bundle else "identity", ctx.facts)


def _replay_progress(ctx: Context, mode: str) -> Progress | None:
    """A bar over the segments replay will re-run (one finding each)."""
    if not ctx.replay:
        return None
    return Progress("replay", len(replay_segments(ctx, draw=False)), "segments", mode)


def _apply_required(findings: list[Finding], policy: Policy, whole: bool = True,
                    asked: tuple[str, ...] = (), gated: set[str] | None = None) -> list[Finding]:
    """A check that the policy requires, or that the evaluator asked for (`asked`: --replay,
    --replay-data), and that only skipped becomes a failure; when every check ran (`whole`), a required check that produced
    no finding at all fails too (a typo in a policy, say). `gated` checks were held back because the
    signatures failed: the verdict already fails, they stay skips."""
    required = policy.required + tuple(c for c in asked if c not in policy.required)
    judged = {f.check for f in findings if not f.skipped}  # ran: a skipped part (one segment, say) is explained there
    out = []
    for f in findings:
        if f.skipped and f.detail.startswith((HELD, UNDECIDED)):
            pass  # the verdict says "incomplete" (held state not produced, or not decidable here), never pass
        elif f.skipped and f.check in required and f.check not in (gated or ()) and f.check not in judged:
            why = "asked for on the command line" if f.check in asked and f.check not in policy.required else "required by policy"
            f = Finding(f.check, False, f.file, f"the check to run ({why})", f"skipped: {f.detail}")
        out.append(f)
    ran = {f.check for f in findings}
    for name in required if whole else ():
        if name not in ran:
            out.append(Finding(name, False, "", "the check to run (required by policy)", "no such check ran"))
    return out
