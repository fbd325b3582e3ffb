"""The offline verifier: small named checks over a bundle, each returning findings.

`verify_bundle` reads the chain once, then runs every check in `CHECKS`. A check never raises
on bad content: it returns a failing `Finding` naming the file, what was expected and what was
found. Only an unreadable bundle (no chain, a chain line that is not a bundle) raises
`BundleUnreadable`, which the CLI maps to exit 2.
"""

from __future__ import annotations

import hmac
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attest.bundle import CHAIN_NAME, KEYS_DIR, BundlePathError, safe_file
from attest.chain import ChainError, Entry, read_chain
from attest.digest import DigestError, merkle_root, safetensors_leaves, sha256_file
from attest.dsse import PAYLOAD_TYPE, pae
from attest.signing import KeyError_, PublicKeyVerifier
from attest.statements import validate_statement

# Genesis derivers a bundle may name. Never import a module merely because a bundle names it.
DERIVERS = {"kai_train.genesis:derive": "kai_train.genesis"}


class BundleUnreadable(Exception):
    """The bundle cannot be read at all (exit 2)."""


@dataclass
class Finding:
    check: str
    ok: bool
    file: str = ""
    expected: str = ""
    found: str = ""
    detail: str = ""
    skipped: bool = False

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.check:<17} {self.file} {self.detail}".rstrip()
        if self.skipped:
            return f"SKIP  {self.check:<17} {self.file}: {self.detail}"
        return f"FAIL  {self.check:<17} {self.file}: expected {self.expected}, found {self.found}" + (
            f" ({self.detail})" if self.detail else ""
        )


@dataclass
class Context:
    root: Path
    entries: list[Entry]
    trusted: list[PublicKeyVerifier]
    trusted_from_bundle: bool
    torn_tail: bool
    notes: list[str] = field(default_factory=list)

    def where(self, e: Entry) -> str:
        return f"{CHAIN_NAME}:{e.lineno}"

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]


def _short(d: str | None) -> str:
    return "null" if d is None else (d[:16] + "…" if len(d) > 16 else d)


# ---------------------------------------------------------------- checks


def check_statements(ctx: Context) -> Iterator[Finding]:
    """Every line holds a well-formed in-toto statement of a known kind."""
    bad = 0
    for e in ctx.entries:
        problem = validate_statement(e.statement)
        if problem:
            bad += 1
            yield Finding("statement-format", False, ctx.where(e), "a valid kai-train statement", problem)
    if not bad:
        yield Finding("statement-format", True, CHAIN_NAME, detail=f"{len(ctx.entries)} statements")


def check_signatures(ctx: Context) -> Iterator[Finding]:
    """Each envelope carries a valid signature by a trusted key."""
    bad = 0
    for e in ctx.entries:
        msg = pae(PAYLOAD_TYPE, e.payload)
        if not any(k.verify(msg, sig) for k in ctx.trusted for _, sig in e.signatures):
            bad += 1
            keyids = ",".join(_short(k) for k, _ in e.signatures) or "none"
            yield Finding(
                "signature", False, ctx.where(e),
                "a signature by " + ",".join(_short(k.keyid) for k in ctx.trusted), f"keyid {keyids} not valid",
            )
    if not bad:
        origin = "key shipped in the bundle" if ctx.trusted_from_bundle else "trusted key"
        yield Finding("signature", True, CHAIN_NAME, detail=f"all signed by {origin}")


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
            yield Finding("chain-link", False, ctx.where(e), f"previous {_short(prev)}", f"previous {_short(got)}")
        prev = e.digest
    if not bad:
        yield Finding("chain-link", True, CHAIN_NAME, detail=f"head {_short(prev)}")


def check_order(ctx: Context) -> Iterator[Finding]:
    """One run and one genesis; data and tokenizer before genesis; checkpoints follow each other."""
    kinds = [e.kind for e in ctx.entries]
    problems = []
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
        step = 0
        for e in ctx.of_kind("checkpoint"):
            p = e.predicate
            if p.get("parent_root") != root:
                problems.append((f"line {e.lineno} parent_root {_short(root)}", _short(p.get("parent_root"))))
            if not isinstance(p.get("step"), int) or p["step"] <= step:
                problems.append((f"line {e.lineno} step above {step}", str(p.get("step"))))
            root, step = p.get("weights_root"), p.get("step") if isinstance(p.get("step"), int) else step
        for e in ctx.of_kind("release"):
            if e.predicate.get("weights_root") != root:
                problems.append((f"release of the last checkpoint {_short(root)}", _short(e.predicate.get("weights_root"))))
    for expected, found in problems:
        yield Finding("statement-order", False, CHAIN_NAME, expected, found)
    if not problems:
        yield Finding("statement-order", True, CHAIN_NAME, detail=" → ".join(_compress(kinds)))


def _compress(kinds: list[str]) -> list[str]:
    out: list[str] = []
    for k in kinds:
        if out and out[-1].split(" ×")[0] == k:
            n = int(out[-1].split(" ×")[1]) + 1 if " ×" in out[-1] else 2
            out[-1] = f"{k} ×{n}"
        else:
            out.append(k)
    return out


def check_subjects(ctx: Context) -> Iterator[Finding]:
    """Every subject file in the bundle has the digest its statement records."""
    checked = absent = bad = 0
    for e in ctx.entries:
        for s in e.statement.get("subject", []):
            name, want = s.get("name", ""), s.get("digest", {}).get("sha256")
            try:
                got = sha256_file(safe_file(ctx.root, name))
            except FileNotFoundError:
                if e.kind == "data-shard" and name.endswith(".parquet"):
                    absent += 1  # shards may travel separately; their manifests are checked
                    continue
                bad += 1
                yield Finding("subject-digest", False, name, f"sha256 {_short(want)}", "file missing from the bundle")
                continue
            except (BundlePathError, OSError) as ex:
                bad += 1
                yield Finding("subject-digest", False, name, "a regular file inside the bundle", str(ex))
                continue
            checked += 1
            if not hmac.compare_digest(str(want), got):
                bad += 1
                yield Finding("subject-digest", False, name, f"sha256 {_short(want)}", f"sha256 {_short(got)}")
    if absent:
        ctx.notes.append(f"{absent} data shard file(s) not in the bundle: their digests were not checked")
    if not bad:
        yield Finding("subject-digest", True, "", detail=f"{checked} files match")


def _weights_files(e: Entry) -> list[str]:
    return [s["name"] for s in e.statement.get("subject", []) if s.get("name", "").endswith(".safetensors")]


def check_weights(ctx: Context) -> Iterator[Finding]:
    """The canonical digest of each genesis/checkpoint/release weights file equals the recorded root."""
    n = bad = 0
    for e in ctx.entries:
        if e.kind not in ("genesis", "checkpoint", "release"):
            continue
        files = _weights_files(e)
        try:
            root = merkle_root(safetensors_leaves(safe_file(ctx.root, f) for f in files)) if files else None
        except (FileNotFoundError, BundlePathError, DigestError, OSError) as ex:
            bad += 1
            yield Finding("weights-digest", False, ",".join(files), "readable safetensors", str(ex))
            continue
        n += 1
        want = e.predicate.get("weights_root")
        if root != want:
            bad += 1
            yield Finding("weights-digest", False, ",".join(files) or ctx.where(e), f"root {_short(want)}", f"root {_short(root)}")
    if not bad:
        yield Finding("weights-digest", True, "", detail=f"{n} weight sets match their canonical digest")


def check_genesis(ctx: Context) -> Iterator[Finding]:
    """Re-derive the initial weights from the committed recipe, tensor by tensor."""
    gens = ctx.of_kind("genesis")
    if len(gens) != 1:
        return  # statement-order reports it
    g = gens[0]
    pred = g.predicate
    recipe = pred.get("recipe") if isinstance(pred.get("recipe"), dict) else {}
    runs = ctx.of_kind("run")
    if runs:
        cfg = runs[0].predicate.get("config", {})
        want_seed = cfg.get("seed") if isinstance(cfg, dict) else None
        if recipe.get("seed") != want_seed:
            yield Finding("genesis", False, ctx.where(g), f"seed {want_seed} (run config)", f"seed {recipe.get('seed')}")
            return
    module = DERIVERS.get(str(recipe.get("deriver")))
    if module is None:
        yield Finding("genesis", False, ctx.where(g), f"a known deriver {sorted(DERIVERS)}", repr(recipe.get("deriver")))
        return
    try:
        derive: Callable[[dict[str, Any]], Iterator[tuple[str, str]]] = importlib.import_module(module).derive
    except ImportError as ex:
        yield Finding("genesis", False, ctx.where(g), "torch and kai_train installed", str(ex),
                      detail="install kai-train[train] to re-derive the genesis", skipped=True)
        return
    recorded = pred.get("tensors") if isinstance(pred.get("tensors"), dict) else {}
    leaves: dict[str, str] = {}
    try:
        for name, leaf in derive(recipe):
            leaves[name] = leaf
    except (ValueError, TypeError, KeyError) as ex:
        yield Finding("genesis", False, ctx.where(g), "a recipe the deriver accepts", f"{type(ex).__name__}: {ex}")
        return
    differ = sorted(n for n in leaves if not isinstance(recorded.get(n), dict) or recorded[n].get("digest") != leaves[n])
    differ += sorted(set(recorded) - set(leaves))
    root = merkle_root(leaves)
    if differ or root != pred.get("weights_root"):
        shown = ", ".join(differ[:6]) + (f" … (+{len(differ) - 6})" if len(differ) > 6 else "")
        yield Finding(
            "genesis", False, ctx.where(g), f"root {_short(root)} re-derived from seed {recipe.get('seed')}",
            f"root {_short(pred.get('weights_root'))}", detail=f"{len(differ)} of {len(leaves)} tensors differ: {shown}",
        )
        return
    yield Finding("genesis", True, ctx.where(g), detail=f"{len(leaves)} tensors re-derived from seed {recipe.get('seed')}")


def check_oms(ctx: Context) -> Iterator[Finding]:
    """Each checkpoint folder's OpenSSF model-signing signature lists exactly its files, is signed by a
    trusted key, and names the same weights file digest as the chain."""
    from attest.oms import OmsError, cross_check, read_oms

    n = bad = 0
    for e in ctx.entries:
        subs = {s.get("name", ""): s.get("digest", {}).get("sha256") for s in e.statement.get("subject", [])}
        for name in (k for k in subs if k.endswith("/model.sig")):
            try:
                sig = safe_file(ctx.root, name)
            except (FileNotFoundError, BundlePathError):
                continue  # subject-digest reports the missing or unsafe file
            n += 1
            folder = name.rsplit("/", 1)[0]
            for f in cross_check(sig, sig.parent, ctx.trusted, where=name):
                if not f.ok:
                    bad += 1
                    yield Finding(f.check, False, f.file.replace(str(ctx.root) + "/", ""), f.expected, f.found, f.detail)
            try:
                oms_digests = read_oms(sig).resources
            except OmsError:
                continue
            for rel, digest in oms_digests.items():
                chain_digest = subs.get(f"{folder}/{rel}")
                if chain_digest is not None and chain_digest != digest:
                    bad += 1
                    yield Finding("oms-signature", False, f"{folder}/{rel}", f"sha256 {_short(chain_digest)} (chain)", f"sha256 {_short(digest)} (OMS)")
    if n and not bad:
        yield Finding("oms-signature", True, "", detail=f"{n} checkpoint folders match their model-signing signatures")


CHECKS: list[Callable[[Context], Iterator[Finding]]] = [
    check_statements,
    check_signatures,
    check_sequence,
    check_links,
    check_order,
    check_subjects,
    check_weights,
    check_oms,
    check_genesis,
]


@dataclass
class Report:
    bundle: str
    findings: list[Finding]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def to_json(self) -> str:
        return json.dumps(
            {"bundle": self.bundle, "verdict": "pass" if self.ok else "fail",
             "findings": [asdict(f) for f in self.findings], "notes": self.notes},
            indent=2,
        )


def load_trust(root: Path, trust: list[str]) -> tuple[list[PublicKeyVerifier], bool]:
    if trust:
        return [PublicKeyVerifier.from_file(t) for t in trust], False
    keys_dir = root / KEYS_DIR
    names = sorted(p.name for p in keys_dir.glob("*.pub.pem")) if keys_dir.is_dir() else []
    if not names:
        raise BundleUnreadable(f"{root}: no --trust key given and no {KEYS_DIR}/*.pub.pem in the bundle")
    try:
        return [PublicKeyVerifier.from_file(safe_file(root, f"{KEYS_DIR}/{n}")) for n in names], True
    except BundlePathError as e:
        raise BundleUnreadable(f"{root}: {e}") from None


def verify_bundle(bundle: str | Path, trust: list[str] | None = None) -> Report:
    root = Path(bundle)
    if not root.is_dir():
        raise BundleUnreadable(f"{root}: not a bundle folder")
    try:
        entries, torn = read_chain(safe_file(root, CHAIN_NAME))
    except (FileNotFoundError, BundlePathError) as e:
        raise BundleUnreadable(f"{root}: {e}") from None
    except ChainError as e:
        raise BundleUnreadable(str(e)) from None
    if not entries:
        raise BundleUnreadable(f"{root / CHAIN_NAME}: the chain is empty")
    try:
        trusted, from_bundle = load_trust(root, trust or [])
    except KeyError_ as e:
        raise BundleUnreadable(str(e)) from None
    ctx = Context(root, entries, trusted, from_bundle, torn)
    if from_bundle:
        ctx.notes.append("no --trust key given: trusted the public key shipped in the bundle (proves integrity, not identity)")
    findings = [f for check in CHECKS for f in check(ctx)]
    return Report(str(root), findings, ctx.notes)
