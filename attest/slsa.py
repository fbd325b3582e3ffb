"""Standard statements in and out: SLSA Provenance v1 for the release, and the evaluator's
verdict as a signed SLSA Verification Summary Attestation (VSA v1).

Provenance (write side, rank 0 at release): `release.slsa.json` beside the chain, a Sigstore
bundle (v0.3) holding a DSSE envelope over an in-toto Statement v1 with predicateType
https://slsa.dev/provenance/v1. Its subjects are the release's (every file of export/); the build
definition names the run config, and its resolved dependencies are the declared data shards and
the tokenizer; `runDetails.metadata.invocationId` is the chain digest of the release statement,
so the provenance points at the chain and the chain does not need to know about it. Anyone who
speaks in-toto/SLSA reads it without knowing kai-train's statement kinds; `kai-attest verify`
checks it (check `slsa-provenance`).

Verdict (read side): `kai-attest verify BUNDLE --vsa OUT --sign-key KEY` signs a VSA whose subjects
are the released files, with `verificationResult` PASSED or FAILED, the policy's digest and the
chain as input attestation. `kai-attest check-vsa OUT BUNDLE --key KEY.pub` checks it with the evaluator's public key against the
artifact in hand (its subjects' files and digests, the chain, the policy); any DSSE verifier
(securesystemslib, sigstore-js) checks the signature alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attest import inputs, jsonread
from attest.dsse import PAYLOAD_TYPE, EnvelopeError, open_bundle, pae, sign_statement
from attest.verify.findings import Context, Finding, skipped, subjects_of
from attest.layout import CHAIN_NAME, SLSA_NAME
from attest.signing import PublicKeyVerifier, Signer

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PROVENANCE_TYPE = "https://slsa.dev/provenance/v1"
VSA_TYPE = "https://slsa.dev/verification_summary/v1"
BUILD_TYPE = "https://kai-train.dev/training/v1"  # docs/bundle-format.md describes its parameters
BUILDER_ID = "https://kai-train.dev/trainer"
VERIFIER_ID = "https://kai-train.dev/kai-attest"
MAX_BYTES = 64 << 20


def provenance_statement(entries: list[Any], release_digest: str) -> dict[str, Any]:
    """The SLSA Provenance v1 statement of a release, from the chain's entries (the release last)."""
    release = entries[-1]
    run = next((e for e in entries if e.kind == "run"), None)
    deps = [{"name": s["name"], "digest": dict(s["digest"])}
            for e in entries if e.kind in ("data-shard", "tokenizer") for s in e.statement["subject"]]
    run_pred = run.predicate if run is not None else {}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": s["name"], "digest": dict(s["digest"])} for s in release.statement["subject"]],
        "predicateType": PROVENANCE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"config": run_pred.get("config"),
                                       "config_file": [dict(s) for s in (run.statement["subject"] if run else [])]},
                "internalParameters": {"code_digest": run_pred.get("code_digest"), "versions": run_pred.get("versions")},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID},
                "metadata": {"invocationId": f"{CHAIN_NAME}#sha256:{release_digest}"},
                "byproducts": [{"name": CHAIN_NAME, "digest": {"sha256": release_digest},
                                "annotations": {"step": release.predicate.get("step"),
                                                "weights_root": release.predicate.get("weights_root")}}],
            },
        },
    }


def write_provenance(run_dir: Path, signer: Signer) -> Path:
    """Sign the SLSA provenance of the chain's release into RUN_DIR/release.slsa.json."""
    from attest.chain import read_chain

    entries, _ = read_chain(run_dir / CHAIN_NAME)
    if not entries or entries[-1].kind != "release":
        raise ValueError(f"{run_dir / CHAIN_NAME}: the last statement is not a release")
    statement = provenance_statement(entries, entries[-1].digest)
    out = run_dir / SLSA_NAME
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(sign_statement(statement, signer)) + "\n")
    tmp.replace(out)
    return out


def _open(path: Path) -> tuple[bytes, list[tuple[str, bytes]], dict[str, Any]]:
    try:
        doc = jsonread.load_file(path, MAX_BYTES)
        return open_bundle(doc)
    except (jsonread.JsonReadError, EnvelopeError) as e:
        raise EnvelopeError(f"{path}: {e}") from None


def signed_by(payload: bytes, sigs: list[tuple[str, bytes]], keys: list[PublicKeyVerifier]) -> bool:
    msg = pae(PAYLOAD_TYPE, payload)
    return any(k.verify(msg, s) for k in keys for _, s in sigs)


def check_slsa_provenance(ctx: Context) -> Iterator[Finding]:
    """release.slsa.json: signed by a trusted key, and its statement is exactly the SLSA Provenance v1
    this verifier rebuilds from the chain (subjects = the release's, builder, build definition, data
    and tokenizer dependencies, invocationId = the release statement's chain digest): nothing in it is
    the team's free text."""
    releases = ctx.of_kind("release")
    path = ctx.root / SLSA_NAME
    if not os.path.lexists(path):
        yield skipped("slsa-provenance", SLSA_NAME, "no SLSA provenance in the bundle")
        return
    if not stat.S_ISREG(os.lstat(path).st_mode):  # a link is never followed out of the bundle
        yield Finding("slsa-provenance", False, SLSA_NAME, "a regular file inside the bundle", "a link or special file")
        return
    if not releases:
        yield skipped("slsa-provenance", SLSA_NAME, "no release statement to compare with (release reports it)")
        return
    try:
        payload, sigs, st = _open(path)
    except EnvelopeError as e:
        yield Finding("slsa-provenance", False, SLSA_NAME, "a Sigstore bundle with an in-toto statement", str(e)[:200])
        return
    bad = []
    if not signed_by(payload, sigs, ctx.trusted):
        bad.append(("a signature by a trusted key", "no valid signature"))
    if st.get("predicateType") != PROVENANCE_TYPE or st.get("_type") != STATEMENT_TYPE:
        bad.append((f"predicateType {PROVENANCE_TYPE}", str(st.get("predicateType"))[:80]))
    r = releases[-1]
    want = sorted((s["name"], s["sha256"]) for s in subjects_of(r))
    got = sorted((str(s.get("name")), str((s.get("digest") or {}).get("sha256")))
                 for s in st.get("subject") or [] if isinstance(s, dict))
    if got != want:
        bad.append((f"the release's {len(want)} subjects", f"{len(got)} subjects, {len(set(got) ^ set(want))} differ"))
    upto = ctx.entries[:next((i for i, e in enumerate(ctx.entries) if e is r), len(ctx.entries) - 1) + 1]
    rendered = provenance_statement(upto, r.digest)
    if not bad and _canonical(st) != _canonical(rendered):  # every other byte is rebuilt from the chain
        bad.append(("the SLSA provenance rebuilt from the chain", _first_key_difference(rendered, st)))
    for expected, found in bad:
        yield Finding("slsa-provenance", False, SLSA_NAME, expected, found)
    if not bad:
        yield Finding("slsa-provenance", True, SLSA_NAME, detail=f"SLSA Provenance v1 of the release, {len(want)} subjects")


def _canonical(x: Any) -> str:
    return json.dumps(x, sort_keys=True, allow_nan=True)


def _first_key_difference(want: Any, got: Any, path: str = "") -> str:
    """The first path where two JSON values differ, for the failure line."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got), key=str):
            if _canonical(want.get(k)) != _canonical(got.get(k)) or (k in want) != (k in got):
                return _first_key_difference(want.get(k), got.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (a, b) in enumerate(zip(want, got)):
            if _canonical(a) != _canonical(b):
                return _first_key_difference(a, b, f"{path}[{i}]")
    return f"{path or 'statement'}: {json.dumps(got)[:80]} (rebuilt: {json.dumps(want)[:80]})"


def vsa_statement(report: Any, resource: str, policy_file: str | None, chain_sha: str | None,
                  subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Verification Summary Attestation (SLSA VSA v1) of a verify report."""
    from attest import tool_version

    policy: dict[str, Any] = {"uri": policy_file or "kai-attest default policy"}
    if policy_file:
        policy["digest"] = {"sha256": hashlib.sha256(inputs.read_bytes(policy_file, 1 << 20)).hexdigest()}
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": VSA_TYPE,
        "predicate": {
            "verifier": {"id": VERIFIER_ID, "version": {"kai-attest": tool_version()}},
            "timeVerified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "resourceUri": resource,
            "policy": policy,
            "inputAttestations": [{"uri": CHAIN_NAME, "digest": {"sha256": chain_sha}}] if chain_sha else [],
            "verificationResult": "PASSED" if report.verdict == "pass" else "FAILED",
            "verifiedLevels": [],
            "slsaVersion": "1.0",
            "kai_verdict": report.verdict,
            "failed_checks": sorted({f.check for f in report.failed}),
        },
    }


def write_vsa(report: Any, bundle_root: Path, resource: str, policy_file: str | None, out: Path,
              signer: Signer) -> Path:
    """Sign the VSA of `report` into `out` (a Sigstore bundle v0.3, one JSON line). Subjects: the
    release's files (what the verdict is about), else the chain file."""
    from attest.chain import read_chain

    chain = bundle_root / CHAIN_NAME
    try:
        chain_sha: str | None = hashlib.sha256(inputs.read_bytes(CHAIN_NAME, 4 << 30, root=bundle_root)).hexdigest()
    except inputs.InputError:
        chain_sha = None
    subjects: list[dict[str, Any]] = []
    try:
        entries, _ = read_chain(chain)
        releases = [e for e in entries if e.kind == "release"]
        if releases:
            subjects = [{"name": s["name"], "digest": {"sha256": s["sha256"]}} for s in subjects_of(releases[-1])]
    except Exception:  # noqa: BLE001 - the verdict already says what is wrong with the chain
        pass
    if not subjects and chain_sha:
        subjects = [{"name": CHAIN_NAME, "digest": {"sha256": chain_sha}}]
    statement = vsa_statement(report, resource, policy_file, chain_sha, subjects)
    out.write_text(json.dumps(sign_statement(statement, signer)) + "\n")
    return out


def check_vsa(path: Path, key: PublicKeyVerifier, artifact: Path, policy_file: str | None = None,
              resource: str | None = None) -> tuple[bool, str]:
    """(holds, one line per finding): a VSA signed by `key`, PASSED, and about the artifact in hand:
    `artifact` is the bundle (or its export/ folder) whose files the VSA's subjects name, every file
    of export/ is one of them with that sha256, the bundle's chain is the VSA's input attestation,
    the policy is `policy_file`'s (or kai-attest's default when none is given), and the resource URI
    is `resource` when given. A genuine PASSED VSA beside other files is a failure."""
    try:
        payload, sigs, st = _open(path)
    except EnvelopeError as e:
        return False, str(e)
    if not signed_by(payload, sigs, [key]):
        return False, f"{path}: no valid signature by key {key.keyid[:16]}…"
    if st.get("predicateType") != VSA_TYPE:
        return False, f"{path}: predicateType {str(st.get('predicateType'))[:80]!r}, expected {VSA_TYPE}"
    pred: dict[str, Any] = st["predicate"] if isinstance(st.get("predicate"), dict) else {}
    result = pred.get("verificationResult")
    subjects = [s for s in (st.get("subject") or []) if isinstance(s, dict)] if isinstance(st.get("subject"), list) else []
    names = ", ".join(str(s.get("name"))[:80] for s in subjects[:3])
    verifier: dict[str, Any] = pred["verifier"] if isinstance(pred.get("verifier"), dict) else {}
    line = (f"{path}: {str(result)[:20]} by {str(verifier.get('id'))[:80]} at "
            f"{str(pred.get('timeVerified'))[:40]} for {str(pred.get('resourceUri'))[:120]} ({len(subjects)} subjects: "
            f"{names}…), signed by {key.keyid[:16]}…")
    problems = _vsa_artifact(pred, subjects, artifact) + _vsa_policy(pred, policy_file)
    if resource is not None and pred.get("resourceUri") != resource:
        problems.append(f"resourceUri {str(pred.get('resourceUri'))[:120]!r}, expected {resource[:120]!r}")
    lines = [line] + [f"{path}: {p}" for p in problems]
    return result == "PASSED" and not problems, "\n".join(lines)


def _vsa_artifact(pred: dict[str, Any], subjects: list[dict[str, Any]], artifact: Path) -> list[str]:
    """What differs between the VSA's subjects and input attestation and the files in hand."""
    from attest.digest import sha256_file
    from attest.layout import EXPORT_DIR

    bundle = artifact if (artifact / CHAIN_NAME).is_file() else None
    export = artifact / EXPORT_DIR if bundle is not None else artifact
    if not export.is_dir():
        return [f"{artifact}: neither a bundle with {EXPORT_DIR}/ nor an export folder"]
    problems: list[str] = []
    want: dict[str, str] = {}
    for s in subjects:
        name, sha = s.get("name"), (s.get("digest") or {}).get("sha256") if isinstance(s.get("digest"), dict) else None
        if isinstance(name, str) and isinstance(sha, str):
            want[name] = sha
    held: dict[str, Path] = {}
    for p in sorted(export.rglob("*")):
        rel = f"{EXPORT_DIR}/{p.relative_to(export).as_posix()}"
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            problems.append(f"{rel}: not a regular file")
        elif p.is_file():
            held[rel] = p
    for rel in sorted(set(held) - set(want)):
        problems.append(f"{rel}: a file in hand the VSA does not cover")
    for name, sha in sorted(want.items()):
        if name == CHAIN_NAME:
            continue
        if name not in held:
            problems.append(f"{name}: named by the VSA, not in {artifact}")
        elif sha256_file(held[name]) != sha:
            problems.append(f"{name}: sha256 differs from the VSA's {sha[:16]}…")
    attested = [a for a in pred.get("inputAttestations") or [] if isinstance(a, dict)] \
        if isinstance(pred.get("inputAttestations"), list) else []
    chain_sha = next((str((a.get("digest") or {}).get("sha256")) for a in attested
                      if a.get("uri") == CHAIN_NAME and isinstance(a.get("digest"), dict)), None)
    if bundle is not None:
        have = sha256_file(bundle / CHAIN_NAME)
        if chain_sha != have:
            problems.append(f"{CHAIN_NAME}: sha256 {have[:16]}… in hand, the VSA attests {str(chain_sha)[:16]}…")
    if problems[20:]:
        problems[20:] = [f"… and {len(problems) - 20} more"]
    return problems


def _vsa_policy(pred: dict[str, Any], policy_file: str | None) -> list[str]:
    policy: dict[str, Any] = pred["policy"] if isinstance(pred.get("policy"), dict) else {}
    got = (policy.get("digest") or {}).get("sha256") if isinstance(policy.get("digest"), dict) else None
    if policy_file is None:
        return [] if got is None else [f"verified under policy {str(policy.get('uri'))[:80]!r} (sha256 {str(got)[:16]}…), "
                                       "not kai-attest's default: give --policy FILE to accept that policy"]
    want = hashlib.sha256(inputs.read_bytes(policy_file, 1 << 20)).hexdigest()
    return [] if got == want else [f"policy sha256 {str(got)[:16]}…, expected {want[:16]}… ({policy_file})"]


def envelope_of(path: Path) -> dict[str, Any]:
    """The bare DSSE envelope of a signed file (for DSSE tools that take an envelope)."""
    doc = jsonread.load_file(path, MAX_BYTES)
    env = doc.get("dsseEnvelope") if isinstance(doc, dict) else None
    if not isinstance(env, dict):
        raise EnvelopeError(f"{path}: no dsseEnvelope")
    return {"payload": env["payload"], "payloadType": env["payloadType"],
            "signatures": [{"keyid": s.get("keyid", ""), "sig": s["sig"]} for s in env["signatures"]]}


