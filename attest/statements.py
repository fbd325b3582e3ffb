"""The chain's statement kinds: in-toto Statement v1 with one predicate type per kind.

Every predicate carries `kind`, `run_id`, `sequence` and `previous` (sha256 of the previous chain
line), added by the chain writer. The fields each kind must carry are listed in `REQUIRED`; the
full meaning of each is documented in docs/bundle-format.md, which must match this file.
Subjects name files by their path relative to the run directory (= the bundle root).
"""

from __future__ import annotations

import math
import re
from typing import Any

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_PREFIX = "https://kai-train.dev/provenance/"

# kind -> predicate fields the writer must supply (beyond kind/run_id/sequence/previous).
REQUIRED: dict[str, tuple[str, ...]] = {
    # A data shard: its manifest (source, licence, rows, schema, derived_from ...).
    "data-shard": ("manifest",),
    # The tokenizer model file and the parameters it was trained with.
    "tokenizer": ("trainer", "params", "trained_on"),
    # The resolved training config, code digest, library versions, hardware.
    "run": ("config", "code_digest", "versions", "hardware"),
    # Initial weights: the recipe that re-creates them and their canonical digest.
    "genesis": ("recipe", "weights_root", "tensors"),
    # A checkpoint: step, canonical digest, data consumed since the previous one, metrics; optional
    # (checked when present): optimizer, rng_state, environment, routing (see checkpoint_extras).
    "checkpoint": ("step", "weights_root", "parent_root", "data_consumed", "metrics"),
    # The released weights: the last checkpoint, by canonical digest.
    "release": ("step", "weights_root"),
}
CHAIN_FIELDS = ("kind", "run_id", "sequence", "previous")
# A data source whose `collection` contains one of these markers is synthetic and must name its
# `generator`; these `generator` values name none (kai-data refuses them, the licences check fails them).
SYNTHETIC_MARKERS = ("synthetic", "generated", "distill", "teacher")
NO_GENERATOR = ("", "none", "unknown", "n/a", "na", "null", "undisclosed")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def predicate_type(kind: str) -> str:
    return f"{PREDICATE_PREFIX}{kind}/v1"


def kind_of(predicate_type_uri: str) -> str | None:
    if not predicate_type_uri.startswith(PREDICATE_PREFIX) or not predicate_type_uri.endswith("/v1"):
        return None
    kind = predicate_type_uri[len(PREDICATE_PREFIX) : -len("/v1")]
    return kind if kind in REQUIRED else None


def subject(name: str, sha256: str) -> dict[str, Any]:
    return {"name": name, "digest": {"sha256": sha256}}


def build_statement(kind: str, subjects: list[dict[str, Any]], predicate: dict[str, Any]) -> dict[str, Any]:
    if kind not in REQUIRED:
        raise ValueError(f"unknown statement kind {kind!r}")
    missing = [f for f in REQUIRED[kind] if f not in predicate]
    if missing:
        raise ValueError(f"{kind} statement is missing predicate fields {missing}")
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": predicate_type(kind),
        "predicate": {"kind": kind, **predicate},
    }


def validate_statement(st: dict[str, Any]) -> str | None:
    """Return a problem description, or None when the statement has the right shape."""
    if st.get("_type") != STATEMENT_TYPE:
        return f"_type is {st.get('_type')!r}, not in-toto Statement v1"
    kind = kind_of(str(st.get("predicateType", "")))
    if kind is None:
        return f"unknown predicateType {str(st.get('predicateType'))[:100]!r}"
    pred = st.get("predicate")
    if not isinstance(pred, dict) or pred.get("kind") != kind:
        return "predicate missing or its kind does not match predicateType"
    missing = [f for f in REQUIRED[kind] + CHAIN_FIELDS if f not in pred]
    if missing:
        return f"{kind} predicate is missing fields {missing}"
    subs = st.get("subject")
    if not isinstance(subs, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("digest"), dict)
        and isinstance(s["digest"].get("sha256"), str)
        for s in subs
    ):
        return "subject must be a list of {name, digest: {sha256}}"
    if not isinstance(pred.get("sequence"), int) or not isinstance(pred.get("previous"), (str, type(None))):
        return "sequence must be an integer and previous a digest or null"
    return checkpoint_extras(pred) if kind == "checkpoint" else None


def checkpoint_extras(pred: dict[str, Any]) -> str | None:
    """Shape of the optional checkpoint fields (`metrics.grad_norm`, `rng_state`, `environment`,
    `routing`); statements written before they existed lack them, which is fine, and so do a dense
    model's (`routing`)."""
    metrics = pred.get("metrics")
    if isinstance(metrics, dict) and "grad_norm" in metrics:
        g = metrics["grad_norm"]
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0):
            return f"metrics.grad_norm must be a finite number >= 0 or null, found {str(g)[:40]!r}"
    if "rng_state" in pred:
        rng = pred["rng_state"]
        sources = rng.get("sources") if isinstance(rng, dict) else None
        ranks = rng.get("ranks") if isinstance(rng, dict) else None
        if not (isinstance(sources, list) and sources and all(isinstance(x, str) for x in sources)
                and isinstance(ranks, list) and ranks and all(isinstance(x, str) and _HEX64.fullmatch(x) for x in ranks)):
            return "rng_state must be {sources: [names], ranks: [a sha256 hex per rank]}"
        consumed = pred.get("data_consumed")
        sampler = consumed.get("sampler") if isinstance(consumed, dict) else None
        world = sampler.get("world_size") if isinstance(sampler, dict) else None
        if isinstance(world, int) and len(ranks) != world:
            return f"rng_state has {len(ranks)} rank digests, data_consumed.sampler.world_size is {world}"
    if "environment" in pred:
        env = pred["environment"]
        versions = env.get("versions") if isinstance(env, dict) else None
        if not (isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())
                and isinstance(env.get("hardware"), dict)):
            return "environment must be {versions: {library: version}, hardware: {...}}"
    if "routing" in pred:
        return routing_problem(pred["routing"], pred.get("step_losses"))
    return None


ROUTING_ALGORITHM = "kai-routing/v1"
MAX_ROUTING_LAYERS = 4096


def routing_problem(routing: Any, step_losses: Any = None) -> str | None:
    """Shape of a checkpoint's `routing`: {algorithm, layers: [unique names], steps: [[a sha256 hex
    per layer] per step of the segment]}; as many steps as `step_losses` when both are present."""
    if not isinstance(routing, dict) or routing.get("algorithm") != ROUTING_ALGORITHM:
        return f"routing must be {{algorithm: {ROUTING_ALGORITHM}, layers, steps}}"
    layers, steps = routing.get("layers"), routing.get("steps")
    if not (isinstance(layers, list) and 0 < len(layers) <= MAX_ROUTING_LAYERS
            and all(isinstance(x, str) and 0 < len(x) <= 200 for x in layers) and len(set(layers)) == len(layers)):
        return "routing.layers must be a list of distinct MoE layer names"
    if not (isinstance(steps, list) and steps and all(
            isinstance(row, list) and len(row) == len(layers) and all(isinstance(x, str) and _HEX64.fullmatch(x) for x in row)
            for row in steps)):
        return f"routing.steps must be, per step, a list of {len(layers)} sha256 hex digests (one per layer)"
    if isinstance(step_losses, list) and len(step_losses) != len(steps):
        return f"routing has {len(steps)} steps, step_losses {len(step_losses)}"
    return None
