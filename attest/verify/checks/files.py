"""Verifier checks on files: every subject's sha256, every weight set's canonical digest, each
checkpoint folder's OpenSSF model-signing signature (with the policy's pinned hash settings), and
the run config a person reads against the one the run statement signs."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from attest import inputs
from attest.bundle import BundlePathError, folder_entries
from attest.chain import Entry
from attest.digest import merkle_root
from attest.verify.findings import (
    UNREADABLE,
    Context,
    Finding,
    as_dict,
    held_skip,
    short,
    skipped,
    subjects_of,
    weights_files,
)
from attest.layout import CHAIN_NAME

RUN_CONFIG = "run-config"
MAX_CONFIG_BYTES = 16 << 20


def check_subjects(ctx: Context) -> Iterator[Finding]:
    """Every subject file in the bundle has the digest its statement records."""
    from attest.challenge import held

    checked = absent = bad = kept = 0
    for e in ctx.entries:
        for s in subjects_of(e):
            name, want = s["name"], s["sha256"]
            try:
                got = ctx.files.sha256(name)
            except FileNotFoundError:
                if ctx.light and held(e, name):
                    kept += 1
                    continue
                if e.kind == "data-shard" and name.endswith(".parquet"):
                    absent += 1  # shards may travel separately; their manifests are checked
                    continue
                bad += 1
                yield Finding("subject-digest", False, name, f"sha256 {short(want)}", "file missing from the bundle")
                continue
            except (BundlePathError, OSError) as ex:
                bad += 1
                yield Finding("subject-digest", False, name, "a regular file inside the bundle", str(ex))
                continue
            checked += 1
            if not hmac.compare_digest(str(want).encode(), got.encode()):
                bad += 1
                yield Finding("subject-digest", False, name, f"sha256 {short(want)}", f"sha256 {short(got)}")
    if absent:
        ctx.notes.append(f"{absent} data shard file(s) not in the bundle: their digests were not checked")
    if kept:
        ctx.facts["held_files"] = kept
        ctx.notes.append(f"{kept} file(s) of heavy state held by the team (light bundle), committed by their signed "
                         "sha256: checked only where a challenge's pack brings them")
    if not bad:
        yield Finding("subject-digest", True, "", detail=f"{checked} files match")


def check_weights(ctx: Context) -> Iterator[Finding]:
    """The canonical digest of each genesis/checkpoint/release weights file equals the recorded root."""
    n = bad = 0
    for e in ctx.entries:
        if e.kind not in ("genesis", "checkpoint", "release"):
            continue
        files = weights_files(e)
        try:
            root = merkle_root(ctx.files.leaves(files)) if files else None
        except FileNotFoundError as ex:
            if ctx.light:
                yield held_skip(ctx, "weights-digest", ctx.where(e), "the weights of this statement")
                continue
            bad += 1
            yield Finding("weights-digest", False, ",".join(files), "readable safetensors", str(ex))
            continue
        except UNREADABLE as ex:
            bad += 1
            yield Finding("weights-digest", False, ",".join(files), "readable safetensors", str(ex))
            continue
        n += 1
        want = e.predicate.get("weights_root")
        if root != want:
            bad += 1
            yield Finding("weights-digest", False, ",".join(files) or ctx.where(e), f"root {short(want)}", f"root {short(root)}")
        for f in _optimizer_state(ctx, e):
            bad += 1
            yield f
    if not bad:
        yield Finding("weights-digest", True, "", detail=f"{n} weight sets match their canonical digest "
                      "(and optimizer state its recorded root)")


def _optimizer_state(ctx: Context, e: Entry) -> Iterator[Finding]:
    """A checkpoint's recorded optimizer state names files that are subjects of the same statement,
    and their canonical root is the recorded one."""
    from attest.verify.replay_plan import optimizer_files

    opt = e.predicate.get("optimizer") if e.kind == "checkpoint" else None
    if opt is None:
        return
    names = optimizer_files(opt)
    subs = {s["name"] for s in subjects_of(e)}
    if not names or any(n not in subs for n in names):
        yield Finding("weights-digest", False, ctx.where(e), "optimizer.files naming subjects of this statement",
                      repr(names or opt)[:100])
        return
    try:
        root = merkle_root(ctx.files.leaves(names))
    except FileNotFoundError as ex:
        if not ctx.light:
            yield Finding("weights-digest", False, ",".join(names), "readable safetensors", str(ex))
        return  # held: the weights of the same statement report it
    except UNREADABLE as ex:
        yield Finding("weights-digest", False, ",".join(names), "readable safetensors", str(ex))
        return
    if root != opt.get("root"):
        yield Finding("weights-digest", False, ",".join(names), f"optimizer root {short(opt.get('root'))}",
                      f"root {short(root)}")


def check_oms(ctx: Context) -> Iterator[Finding]:
    """Each checkpoint folder's OpenSSF model-signing signature lists exactly its files, is signed by a
    trusted key, names the same weights file digest as the chain, and uses the policy's hash settings."""
    from attest.oms import OmsError, cross_check, read_oms

    n = bad = 0
    for e in ctx.entries:
        subs = {s["name"]: s["sha256"] for s in subjects_of(e)}
        for name in (k for k in subs if k.endswith("/model.sig")):
            try:
                sig = ctx.files.path(name)
            except (FileNotFoundError, BundlePathError):
                continue  # subject-digest reports the missing or unsafe file
            n += 1
            folder = name.rsplit("/", 1)[0]
            found = cross_check(sig, sig.parent, ctx.trusted, where=name, sha256=ctx.files.sha256_of_path)
            for f in found:
                if not f.ok:
                    bad += 1
                    yield Finding(f.check, False, f.file.replace(str(ctx.root) + "/", ""), f.expected, f.found, f.detail)
            try:
                manifest = read_oms(sig)
            except OmsError:
                continue
            for key, want in ctx.policy.oms.items():
                if manifest.serialization.get(key) != want:
                    bad += 1
                    yield Finding("oms-signature", False, name, f"serialization {key} {want!r} (policy)",
                                  repr(manifest.serialization.get(key)))
            for rel, digest in manifest.resources.items():
                chain_digest = subs.get(f"{folder}/{rel}")
                if chain_digest is not None and chain_digest != digest:
                    bad += 1
                    yield Finding("oms-signature", False, f"{folder}/{rel}", f"sha256 {short(chain_digest)} (chain)", f"sha256 {short(digest)} (OMS)")
    if not n:
        yield skipped("oms-signature", "", "no checkpoint folder carries a model.sig")
    elif not bad:
        yield Finding("oms-signature", True, "", detail=f"{n} checkpoint folders match their model-signing signatures")


def check_run_config(ctx: Context) -> Iterator[Finding]:
    """What a person reads is what was trained: the run statement's config file (its subject,
    `config/run.yaml`) is byte for byte the canonical rendering of the config the statement signs
    (attest.runconfig), and every file in the bundle's config/ folder is a subject of it."""
    from attest.runconfig import render_yaml

    runs = ctx.of_kind("run")
    if len(runs) != 1:
        yield skipped(RUN_CONFIG, CHAIN_NAME, f"{len(runs)} run statements (statement-order reports it)")
        return
    run = runs[0]
    subs = subjects_of(run)
    bad = 0
    if len(subs) != 1 or not subs[0]["name"].endswith(".yaml"):
        bad += 1
        yield Finding(RUN_CONFIG, False, ctx.where(run), "one subject: the run config as YAML",
                      ", ".join(s["name"] for s in subs) or "no subject")
    for s in subs[:1]:
        name = s["name"]
        try:
            want = render_yaml(as_dict(run.predicate.get("config"))).encode()
            got = inputs.read_bytes(ctx.files.path(name), MAX_CONFIG_BYTES, where=name) if ctx.files.path(
                name).stat().st_size <= MAX_CONFIG_BYTES else None
        except TypeError as ex:
            bad += 1
            yield Finding(RUN_CONFIG, False, ctx.where(run), "a config of mappings, lists and scalars", str(ex))
            continue
        except UNREADABLE as ex:
            bad += 1
            yield Finding(RUN_CONFIG, False, name, "the run config a person reads", str(ex))
            continue
        if got is None:
            bad += 1
            yield Finding(RUN_CONFIG, False, name, f"at most {MAX_CONFIG_BYTES} bytes", "a larger file")
        elif got != want:
            bad += 1
            yours, ours = got.decode("utf-8", "replace").splitlines(), want.decode().splitlines()
            i = next((i for i, (a, b) in enumerate(zip(yours, ours)) if a != b), min(len(yours), len(ours)))
            yield Finding(RUN_CONFIG, False, name, "the run statement's signed config, rendered canonically",
                          f"other text at line {i + 1}: {(yours[i] if i < len(yours) else '(end of file)')[:80]!r}",
                          detail=f"signed: {(ours[i] if i < len(ours) else '(end of file)')[:80]!r}")
    named = {s["name"] for s in subs}
    for rel, odd in folder_entries(ctx.root, "config"):
        if odd or rel not in named:
            bad += 1
            yield Finding(RUN_CONFIG, False, rel, "a subject of the run statement",
                          "not a regular file" if odd else "an unsigned file")
    if not bad:
        yield Finding(RUN_CONFIG, True, subs[0]["name"], detail="equals the signed run config")

