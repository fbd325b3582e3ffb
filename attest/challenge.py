"""Audit at scale: light bundles, evaluator challenges and the team's segment packs.

A light bundle (`kai-attest bundle RUN --light`) carries the chain, statements, run config, keys,
data manifests, tokenizer and the release export; its size does not grow with the number of
checkpoints. The heavy bytes stay with the team, committed in the chain by their sha256 (and, for
weights, canonical per-tensor roots): the genesis and checkpoint state shards (float32 weights,
AdamW moments, their model-signing signatures) and the data shards' Parquet files (`HELD`).

The protocol, after the evaluator has received the light bundle:

  kai-attest challenge BUNDLE --segments K [--seed S] --out CHALLENGE.json   (evaluator)
  kai-attest respond RUN_DIR CHALLENGE.json --out PACKS                     (team)
  kai-attest verify BUNDLE --packs PACKS --challenge CHALLENGE.json         (evaluator)

The challenge binds the bundle's chain by its sha256 and draws K segments with the evaluator's
randomness (fresh unless `--seed`), so the team learns which segments are audited only after every
commitment is fixed. A pack holds one segment's start state, end state and the training shards it
read, at their bundle names, plus `pack.json` listing each file's size and sha256: files can be
sent, and checked on arrival, one shard at a time. The verifier reads pack files only for names a
signed statement commits (their sha256 is checked like any subject), refuses anything else in a
pack, and replays exactly the challenged segments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from attest import inputs, jsonread
from attest.bundle import safe_file
from attest.chain import Entry, read_chain
from attest.digest import sha256_file
from attest.errors import KaiError
from attest.layout import CHAIN_NAME

CHALLENGE_FORMAT = "kai-challenge/v1"
PACK_FORMAT = "kai-pack/v1"
PACK_MANIFEST = "pack.json"
MAX_CHALLENGE_BYTES = 1 << 20
MAX_PACK_MANIFEST_BYTES = 64 << 20
MAX_SEGMENTS = 100_000  # segments one challenge may name (each is replayed)
MAX_CHAIN_BYTES = 64 << 20  # the chain `challenge` reads (the verifier's default limits.max_chain_bytes)


class ChallengeError(KaiError, ValueError):
    """A challenge or pack cannot be used; the message names the file and the problem."""


def held(e: Entry, name: str) -> bool:
    """Whether subject `name` of statement `e` is heavy state a light bundle leaves with the team."""
    return e.kind in ("genesis", "checkpoint") or (e.kind == "data-shard" and name.endswith(".parquet"))


def _subjects(e: Entry) -> list[tuple[str, str]]:
    out = []
    subjects = e.statement.get("subject")
    for s in subjects if isinstance(subjects, list) else []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            digest = s.get("digest")
            out.append((s["name"], str(digest.get("sha256") if isinstance(digest, dict) else None)))
    return out


def segment_files(entries: list[Entry], k: int) -> list[str]:
    """What segment k needs that a light bundle does not carry: every subject of its start statement
    (genesis for k = 0, else checkpoint k-1) and of its end statement (checkpoint k), and the
    training shards the signed run config names."""
    ckpts = [e for e in entries if e.kind == "checkpoint"]
    gens = [e for e in entries if e.kind == "genesis"]
    runs = [e for e in entries if e.kind == "run"]
    if not 0 <= k < len(ckpts) or (k == 0 and not gens):
        raise ChallengeError(f"segment {k}: the chain has {len(ckpts)} checkpoint(s)")
    start = ckpts[k - 1] if k else gens[0]
    names = [n for e in (start, ckpts[k]) for n, _ in _subjects(e)]
    cfg = runs[0].predicate.get("config") if runs else None
    shards = cfg.get("data_shards") if isinstance(cfg, dict) else None
    names += [s["name"] for s in (shards if isinstance(shards, list) else [])
              if isinstance(s, dict) and isinstance(s.get("name"), str)]
    return sorted(dict.fromkeys(names))


def committed(entries: list[Entry]) -> dict[str, str]:
    """Every subject name of the chain -> its signed sha256 (first statement that names it)."""
    out: dict[str, str] = {}
    for e in entries:
        for n, sha in _subjects(e):
            out.setdefault(n, sha)
    return out


def draw(bundle: Path, segments: int, seed: int | None = None) -> dict[str, Any]:
    """The evaluator's challenge: `segments` of the bundle's segments before the last, drawn with fresh
    randomness (or `seed`), bound to the bundle's chain by its sha256, and the last segment (the one
    that yields the release) always with them. Asking for as many as there are, or more, challenges
    every segment."""
    chain = safe_file(bundle, CHAIN_NAME, MAX_CHAIN_BYTES)
    entries, _ = read_chain(chain, MAX_CHAIN_BYTES)
    n = sum(1 for e in entries if e.kind == "checkpoint")
    if n == 0 or segments < 1:
        raise ChallengeError(f"{chain}: {n} segment(s) to challenge; --segments {segments} must be at least 1")
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    chain_sha = sha256_file(chain)
    # The draw depends on the chain too: one seed reused for two bundles draws independently.
    rng = random.Random(hashlib.sha256(f"{seed}:{chain_sha}".encode()).digest())
    pool = range(n - 1) if n > 1 else range(n)
    picked = sorted(set(rng.sample(pool, min(segments, len(pool)))) | {n - 1})
    steps = [e.predicate.get("step") for e in entries if e.kind == "checkpoint"]
    return {"format": CHALLENGE_FORMAT, "chain_sha256": chain_sha, "segments_total": n, "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "segments": [{"segment": k, "step": steps[k], "files": segment_files(entries, k)} for k in picked]}


def load_challenge(path: Path) -> dict[str, Any]:
    """A challenge file read strictly; ChallengeError names the file and the field."""
    try:
        c = jsonread.load_file(path, MAX_CHALLENGE_BYTES)
    except (OSError, ValueError) as ex:
        raise ChallengeError(f"{path}: {ex}") from None
    where = str(path)
    if not isinstance(c, dict) or c.get("format") != CHALLENGE_FORMAT:
        raise ChallengeError(f"{where}: not a {CHALLENGE_FORMAT} challenge")
    if not (isinstance(c.get("chain_sha256"), str) and isinstance(c.get("segments"), list) and c["segments"]):
        raise ChallengeError(f"{where}: needs chain_sha256 and a non-empty segments list")
    if len(c["segments"]) > MAX_SEGMENTS:
        raise ChallengeError(f"{where}: {len(c['segments'])} segments (the limit is {MAX_SEGMENTS})")
    seen: set[int] = set()
    for s in c["segments"]:
        if not (isinstance(s, dict) and isinstance(s.get("segment"), int) and not isinstance(s["segment"], bool)
                and 0 <= s["segment"] < MAX_SEGMENTS):
            raise ChallengeError(f"{where}: segments: each needs an integer segment in [0, {MAX_SEGMENTS})")
        if s["segment"] in seen:
            raise ChallengeError(f"{where}: segment {s['segment']} is listed twice (each segment once)")
        seen.add(s["segment"])
    return c


def pack_dir(out: Path, k: int) -> Path:
    return out / f"segment-{k:05d}"


def respond(run_dir: Path, challenge_path: Path, out: Path) -> list[Path]:
    """The team's answer: one pack per challenged segment, each file checked against its signed
    sha256 while it is copied (or hard-linked), written one file at a time. Returns the pack folders."""
    c = load_challenge(challenge_path)
    chain = safe_file(run_dir, CHAIN_NAME)
    if sha256_file(chain) != c["chain_sha256"]:
        raise ChallengeError(f"{challenge_path}: drawn for another chain than {chain} (chain_sha256 differs)")
    entries, _ = read_chain(chain)
    signed = committed(entries)
    packs = []
    for seg in c["segments"]:
        k = seg["segment"]
        folder = pack_dir(out, k)
        if folder.exists():
            shutil.rmtree(folder)
        files = []
        for name in segment_files(entries, k):
            src = safe_file(run_dir, name)
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            sha = sha256_file(dst)
            if sha != signed.get(name):
                raise ChallengeError(f"{src}: sha256 {sha[:16]}… differs from the signed {str(signed.get(name))[:16]}…")
            files.append({"name": name, "size": dst.stat().st_size, "sha256": sha})
        manifest = {"format": PACK_FORMAT, "chain_sha256": c["chain_sha256"], "segment": k,
                    "step": seg.get("step"), "files": files}
        (folder / PACK_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        packs.append(folder)
    return packs


def open_packs(bundle: Path, packs: Path, challenge: dict[str, Any], entries: list[Entry]) -> tuple[list[Path], list[str]]:
    """The pack folders for a challenge, checked before anything in them is read as bundle data:
    the challenge binds this bundle's chain; each challenged segment has its pack; every file in a
    pack is one the segment needs and a signed subject. Returns (pack folders, problems): each
    problem is one line naming the pack file."""
    problems: list[str] = []
    if sha256_file(safe_file(bundle, CHAIN_NAME)) != challenge["chain_sha256"]:
        return [], [f"{CHAIN_NAME}: the challenge was drawn for another chain (chain_sha256 differs)"]
    signed = committed(entries)
    folders: list[Path] = []
    seen: set[str] = set()  # names an earlier pack holds: the verifier reads that copy, so check this one here
    for seg in challenge["segments"]:
        k = seg["segment"]
        folder = pack_dir(packs, k)
        if folder.is_symlink() or not folder.is_dir():
            problems.append(f"{folder}: no pack for challenged segment {k}")
            continue
        try:
            need = set(segment_files(entries, k))
        except ChallengeError as ex:
            problems.append(str(ex))
            continue
        for dirpath, _, filenames in os.walk(folder):
            for fn in filenames:
                rel = os.path.relpath(os.path.join(dirpath, fn), folder).replace(os.sep, "/")
                if rel == PACK_MANIFEST:
                    continue
                if rel not in need or rel not in signed:
                    problems.append(f"{folder}/{rel}: not a signed file of segment {k}; a pack holds nothing else")
                elif rel in seen:
                    try:
                        sha = sha256_file(safe_file(folder, rel))
                    except (OSError, ValueError) as ex:
                        problems.append(f"{folder}/{rel}: {ex}")
                        continue
                    if sha != signed[rel]:
                        problems.append(f"{folder}/{rel}: sha256 {sha[:16]}… differs from the signed "
                                        f"{signed[rel][:16]}…")
        seen |= need
        missing = sorted(n for n in need if not inputs.is_regular(n, folder))
        if missing:
            problems.append(f"{folder}: {len(missing)} file(s) of segment {k} missing, first {missing[0]}")
        folders.append(folder)
    return folders, problems
