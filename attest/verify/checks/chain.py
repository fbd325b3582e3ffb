"""Verifier checks on the chain itself: statement shapes, signatures by trusted keys (or, for keyless
lines, by a Sigstore identity the policy pins, verified offline against its pinned trusted root), sequence and
hash links, the order of statement kinds (shards declared before use, back-to-back sampler ranges,
parent roots), and RFC 3161 timestamps where entries carry them (verified against the TSA roots the
policy pins)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from attest.chain import Entry
from attest.dsse import PAYLOAD_TYPE, pae
from attest.verify.findings import (
    Context,
    Finding,
    as_dict,
    as_list,
    shard_subjects,
    short,
    skipped,
)
from attest.keyless import certificate_identity, is_keyless, verify_keyless
from attest.layout import CHAIN_NAME
from attest.signing import PublicKeyVerifier
from attest.statements import validate_statement


def check_statements(ctx: Context) -> Iterator[Finding]:
    """Every line holds a well-formed in-toto statement of a known kind."""
    bad = 0
    for e in ctx.entries:
        problem = validate_statement(e.statement)
        if problem:
            bad += 1
            yield Finding("statement-format", False, ctx.where(e), "a valid kai-train statement", problem)
    moved = _environment_changes(ctx)
    if moved:
        ctx.notes.append(f"checkpoints at steps {moved} ran with other library versions or hardware than the run "
                         "statement records (a run resumed elsewhere): replay those segments with their versions")
    if not bad:
        yield Finding("statement-format", True, CHAIN_NAME, detail=f"{len(ctx.entries)} statements")


def _environment_changes(ctx: Context) -> list[Any]:
    """Steps of checkpoints whose recorded `environment` differs from the run statement's
    versions and hardware (world size aside: sampler ranges record that)."""
    runs = ctx.of_kind("run")
    if not runs:
        return []
    run = runs[0].predicate
    want = (run.get("versions"), {k: v for k, v in as_dict(run.get("hardware")).items() if k != "world_size"})
    out = []
    for e in ctx.of_kind("checkpoint"):
        env = as_dict(e.predicate.get("environment"))
        if env:
            got = (env.get("versions"), {k: v for k, v in as_dict(env.get("hardware")).items() if k != "world_size"})
            if got != want:
                out.append(e.predicate.get("step"))
    return out


def _signed_by(e: Entry, trusted: list[PublicKeyVerifier]) -> bool:
    msg = pae(PAYLOAD_TYPE, e.payload)
    by_keyid = {k.keyid: k for k in trusted}
    # The keyid hint picks the key to try first; any trusted key may still match (hints are unsigned).
    for keyid, sig in e.signatures:
        k = by_keyid.get(keyid)
        if k is not None and k.verify(msg, sig):
            return True
    return any(k.verify(msg, sig) for k in trusted for keyid, sig in e.signatures if keyid not in by_keyid)


def check_signatures(ctx: Context) -> Iterator[Finding]:
    """Each envelope carries a valid signature by a trusted key, or, for a keyless (certificate)
    line, is accepted by sigstore-python's verifier against the trusted root and one of the
    identities the policy pins (attest.keyless.verify_keyless: offline, from the log entry in
    the line itself)."""
    # Serial on purpose: ECDSA verify holds the GIL, and forked workers did not pay for their start
    # on a 2-core machine (bench/RESULTS.md); ~0.1 ms per key-signed entry.
    bad = 0
    keyless = [e for e in ctx.entries if is_keyless(e.bundle)]
    policy = ctx.policy
    unpinned = [k for k, v in (("sigstore_trusted_root", policy.sigstore_trusted_root),
                               ("sigstore_identities", policy.sigstore_identities)) if not v]
    if keyless and unpinned:  # one line for the chain: nothing to verify any keyless line against
        bad += 1
        yield Finding("signature", False, CHAIN_NAME,
                      f"keyless entries verified against a pinned Sigstore root and identity (set "
                      f"{' and '.join(unpinned)} in the policy)",
                      f"{len(keyless)} keyless line(s), first line {keyless[0].lineno}: a certificate for "
                      f"{certificate_identity(keyless[0].bundle)}")
    elif keyless:
        idents = [(i.identity, i.issuer) for i in policy.sigstore_identities]
        for e in keyless:
            why = verify_keyless(e.bundle, policy.sigstore_trusted_root, idents)
            if why:
                bad += 1
                yield Finding("signature", False, ctx.where(e), f"a keyless signature chaining to "
                              f"{policy.sigstore_trusted_root_path} by one of the policy's sigstore_identities",
                              f"not verified: {why}")
    for e in ctx.entries:
        if not is_keyless(e.bundle) and not _signed_by(e, ctx.trusted):
            bad += 1
            keyids = ",".join(short(k) for k, _ in e.signatures) or "none"
            yield Finding(
                "signature", False, ctx.where(e),
                "a signature by " + (",".join(short(k.keyid) for k in ctx.trusted) or "a trusted key (none available)"),
                f"keyid {keyids} not valid",
            )
    if keyless:
        ctx.facts["keyless_entries"] = len(keyless)
    if not bad:
        if keyless:
            idents_txt = ", ".join(f"{i.identity} ({i.issuer})" for i in policy.sigstore_identities)
            origin = (f"keyless identities {idents_txt} under the Sigstore root {policy.sigstore_trusted_root_path}"
                      + (f"; {len(ctx.entries) - len(keyless)} by a trusted key" if len(keyless) < len(ctx.entries) else ""))
        else:
            origin = "the key shipped in the bundle (integrity only)" if ctx.trusted_from_bundle else "a trusted key"
        yield Finding("signature", True, CHAIN_NAME, detail=f"all {len(ctx.entries)} signed by {origin}")


def check_sequence(ctx: Context) -> Iterator[Finding]:
    """sequence runs 0, 1, 2 ... with no gap, and every statement names the same run."""
    bad = 0
    run_id = ctx.entries[0].predicate.get("run_id") if ctx.entries else None
    for i, e in enumerate(ctx.entries):
        if e.predicate.get("sequence") != i:
            bad += 1
            yield Finding("chain-sequence", False, ctx.where(e), f"sequence {i}", f"sequence {e.predicate.get('sequence')}")
        if e.predicate.get("run_id") != run_id:
            bad += 1
            yield Finding("chain-sequence", False, ctx.where(e), f"run_id {run_id}", f"run_id {e.predicate.get('run_id')}")
    if ctx.torn_tail:
        ctx.notes.append(f"{CHAIN_NAME} ends in a torn line (an interrupted append); verified the whole lines before it")
    if not bad:
        yield Finding("chain-sequence", True, CHAIN_NAME, detail=f"0..{len(ctx.entries) - 1}, run {run_id}")


def check_links(ctx: Context) -> Iterator[Finding]:
    """Each `previous` is the sha256 of the line before it (the first has none)."""
    bad = 0
    prev: str | None = None
    for e in ctx.entries:
        got = e.predicate.get("previous")
        if got != prev:
            bad += 1
            yield Finding("chain-link", False, ctx.where(e), f"previous {short(prev)}", f"previous {short(got)}")
        prev = e.digest
    if not bad:
        yield Finding("chain-link", True, CHAIN_NAME, detail=f"head {short(prev)}")


def check_order(ctx: Context) -> Iterator[Finding]:
    """One run and one genesis; data and tokenizer before genesis; checkpoints follow each other
    (parent roots, increasing steps, back-to-back sampler ranges); shards declared before a
    tokenizer or checkpoint uses them; the release names the last checkpoint."""
    kinds = [e.kind for e in ctx.entries]
    problems: list[tuple[str, str]] = []
    for k in ("run", "genesis"):
        if kinds.count(k) != 1:
            problems.append((f"exactly one {k} statement", f"{kinds.count(k)}"))
    if not problems:
        g = kinds.index("genesis")
        if kinds.index("run") > g:
            problems.append(("run statement before genesis", "run after genesis"))
        late = [i + 1 for i, k in enumerate(kinds) if k in ("data-shard", "tokenizer") and i > g]
        if late:
            problems.append(("data and tokenizer declared before genesis", f"declared after, at lines {late}"))
        early = [i + 1 for i, k in enumerate(kinds) if k in ("checkpoint", "release") and i < g]
        if early:
            problems.append(("checkpoints after genesis", f"before, at lines {early}"))
        root = ctx.entries[g].predicate.get("weights_root")
        step, position = 0, 0
        for e in ctx.of_kind("checkpoint"):
            p = e.predicate
            if p.get("parent_root") != root:
                problems.append((f"line {e.lineno} parent_root {short(root)}", short(p.get("parent_root"))))
            if not isinstance(p.get("step"), int) or p["step"] <= step:
                problems.append((f"line {e.lineno} step above {step}", str(p.get("step"))))
            sampler = as_dict(as_dict(p.get("data_consumed")).get("sampler"))
            lo, hi = sampler.get("position_start"), sampler.get("position_end")
            if lo != position or not isinstance(hi, int) or hi < position:
                problems.append((f"line {e.lineno} sampler range starting at {position} (where the previous "
                                 "segment ended)", f"[{lo}, {hi})"))
            position = hi if isinstance(hi, int) else position
            root, step = p.get("weights_root"), p["step"] if isinstance(p.get("step"), int) else step
        for e in ctx.of_kind("release"):
            if e.predicate.get("weights_root") != root:
                problems.append((f"release of the last checkpoint {short(root)}", short(e.predicate.get("weights_root"))))
    # A shard must be declared before anything uses it (data-lineage reports shards never declared).
    declared = shard_subjects(ctx)
    index = {id(e): i for i, e in enumerate(ctx.entries)}
    for e in ctx.of_kind("tokenizer") + ctx.of_kind("checkpoint"):
        if e.kind == "tokenizer":
            used = [as_dict(t).get("name") for t in as_list(e.predicate.get("trained_on"))]
        else:
            used = as_list(as_dict(e.predicate.get("data_consumed")).get("shards"))
        i = index[id(e)]
        later = [n for n in used if isinstance(n, str) and n in declared and declared[n][0] > i]
        if later:
            problems.append((f"line {e.lineno} ({e.kind}) uses shards declared before it",
                             f"{len(later)} declared after it, first {later[0]}"))
    for expected, found in problems:
        yield Finding("statement-order", False, CHAIN_NAME, expected, found)
    if not problems:
        yield Finding("statement-order", True, CHAIN_NAME, detail=" → ".join(_compress(kinds)))


def _compress(kinds: list[str]) -> list[str]:
    """['a', 'a', 'b'] -> ['a ×2', 'b']."""
    runs: list[list[Any]] = []
    for k in kinds:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return [k if n == 1 else f"{k} ×{n}" for k, n in runs]


# A token may be this far ahead of the verifier's clock (two clocks never agree exactly).
TSA_CLOCK_SKEW = timedelta(seconds=60)
SHA256_OID = "2.16.840.1.101.3.4.2.1"
MAX_TOKENS_PER_ENTRY = 8  # RFC 3161 tokens one chain line may carry (kai-train writes one)


def check_timestamps(ctx: Context) -> Iterator[Finding]:
    """RFC 3161 tokens, where entries carry them: each over sha256 of its entry's signature, signed
    by a TSA certificate (EKU timeStamping) that chains to a root the policy pins (`tsa_roots`),
    never later than the verification time, and never going backwards along the chain. Without
    pinned roots the tokens' signatures are not verified and the check is skipped."""
    tokens: list[tuple[Entry, Any]] = []  # (entry, its base64 token: token_time checks it first)
    crowded = []
    for e in ctx.entries:
        tvd = as_dict(as_dict(e.bundle.get("verificationMaterial")).get("timestampVerificationData"))
        listed = as_list(tvd.get("rfc3161Timestamps"))
        if len(listed) > MAX_TOKENS_PER_ENTRY:  # charged before any token is decoded
            crowded.append(e)
            continue
        for t in listed:
            tokens.append((e, as_dict(t).get("signedTimestamp")))
    for e in crowded:
        yield Finding("timestamps", False, ctx.where(e), f"at most {MAX_TOKENS_PER_ENTRY} RFC 3161 timestamps on a line",
                      f"{len(as_list(as_dict(as_dict(e.bundle.get('verificationMaterial')).get('timestampVerificationData')).get('rfc3161Timestamps')))}")
    if crowded and not tokens:
        return
    if not tokens:
        why = ("keyless lines carry their log's integrated time instead, checked by signature" if
               ctx.facts.get("keyless_entries") else "key-mode signatures carry no trusted time")
        yield skipped("timestamps", CHAIN_NAME, f"no RFC 3161 timestamps in the chain ({why})")
        return
    try:
        import rfc3161_client  # noqa: F401
    except ImportError:
        yield skipped("timestamps", CHAIN_NAME, f"{len(tokens)} RFC 3161 timestamps not checked: pip install rfc3161-client")
        return
    pinned = bool(ctx.policy.tsa_roots)
    now = datetime.now(timezone.utc)
    bad, last, times, tsas = 0, None, [], set()
    for e, raw in tokens:
        try:
            when, imprint = token_time(raw)
        except ValueError as ex:
            bad += 1
            yield Finding("timestamps", False, ctx.where(e), "an RFC 3161 TimeStampResponse", str(ex)[:200])
            continue
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        sigs = {hashlib.sha256(s).digest() for _, s in e.signatures}
        if imprint not in sigs:
            bad += 1
            yield Finding("timestamps", False, ctx.where(e), "a timestamp over sha256 of this entry's signature",
                          f"imprint {imprint.hex()[:16]}…")
        elif pinned:
            try:
                tsas.add(tsa_verify(raw, imprint, ctx.policy.tsa_roots, ctx.policy.tsa_intermediates))
            except ValueError as ex:
                bad += 1
                yield Finding("timestamps", False, ctx.where(e), "a token signed by a TSA certificate (EKU "
                              "timeStamping) that chains to a root pinned in the policy (tsa_roots)", str(ex)[:300])
        if when > now + TSA_CLOCK_SKEW:
            bad += 1
            yield Finding("timestamps", False, ctx.where(e), f"a time no later than the verification time "
                          f"{now.isoformat(timespec='seconds')}", when.isoformat())
        if last is not None and when < last[1]:
            bad += 1
            yield Finding("timestamps", False, ctx.where(e), f"a time at or after {last[1].isoformat()} "
                          f"(line {last[0].lineno})", when.isoformat())
        last = (e, when)
        times.append((e.lineno, when.isoformat()))
    ctx.facts["timestamps"] = times
    bare = sorted({e.lineno for e in ctx.entries} - {e.lineno for e, _ in tokens})
    if bare:
        ctx.notes.append(f"{len(bare)} of {len(ctx.entries)} chain lines carry no RFC 3161 token (first: line "
                         f"{bare[0]}): when those were signed is not established")
    if bad:
        return
    span = f"{len(tokens)} tokens, {times[0][1]} … {times[-1][1]}, monotonic"
    if not pinned:
        yield skipped("timestamps", CHAIN_NAME, f"no TSA roots pinned: timestamp signatures not verified ({span}; "
                      "pin the TSA's root under tsa_roots in the policy)")
        return
    ctx.facts["timestamp_authorities"] = sorted(tsas)
    yield Finding("timestamps", True, CHAIN_NAME, detail=f"{span}, signed by {', '.join(sorted(tsas))}")


def token_time(b64: Any) -> tuple[Any, bytes]:
    """(genTime, message imprint) of a base64 DER TimeStampResponse; ValueError if unreadable."""
    from rfc3161_client import decode_timestamp_response

    if not isinstance(b64, str):
        raise ValueError("signedTimestamp is not a base64 string")
    try:
        resp = decode_timestamp_response(base64.b64decode(b64, validate=True))
        return resp.tst_info.gen_time, bytes(resp.tst_info.message_imprint.message)
    except Exception as ex:  # noqa: BLE001 - a parser of hostile DER: any failure is "unreadable"
        raise ValueError(f"unreadable TimeStampResponse ({type(ex).__name__}: {ex})") from None


def tsa_verify(b64: str, imprint: bytes, roots: list[Any], intermediates: list[Any]) -> str:
    """Verify a base64 DER TimeStampResponse over the sha256 digest `imprint`: status granted, the
    CMS signature by the certificate its SignerInfo names, that certificate valid at genTime with a
    critical timeStamping EKU and chaining to one of `roots` (through the token's own certificates
    or `intermediates`). Returns the TSA certificate's subject; ValueError says what failed."""
    from cryptography import x509
    from rfc3161_client import VerifierBuilder, decode_timestamp_response

    try:
        resp = decode_timestamp_response(base64.b64decode(b64, validate=True))
        if resp.tst_info.message_imprint.hash_algorithm.dotted_string != SHA256_OID:
            raise ValueError(f"imprint hash {resp.tst_info.message_imprint.hash_algorithm.dotted_string}, not sha256")
        VerifierBuilder(roots=list(roots), intermediates=list(intermediates)).build().verify(resp, imprint)
        (si,) = resp.signed_data.signer_infos
        for der in resp.signed_data.certificates:
            c = x509.load_der_x509_certificate(der)
            if c.issuer == si.issuer and c.serial_number == si.serial_number:
                return c.subject.rfc4514_string()
        return "a TSA certificate not in the token"
    except Exception as ex:  # noqa: BLE001 - hostile DER and a failed verification both mean "not verified"
        raise ValueError(f"not verified ({_openssl_why(str(ex)) or type(ex).__name__ + ': ' + str(ex)})") from None


def _openssl_why(msg: str) -> str:
    """The readable part of an OpenSSL error stack ("Verify error: certificate has expired"), or ""."""
    if "ErrorStack" not in msg:
        return ""
    found = re.findall(r'data: "([^"]+)"', msg) or re.findall(r'reason: "([^"]+)"', msg)
    return "; ".join(dict.fromkeys(found))
