"""What a segment replay may read and run, decided by the verifier from signed statements only.

`build_plan` turns segment k of a bundle into a closed plan for the replay plug-in: every file it
names is a subject of a signed statement (found through that statement, never by a naming
convention) whose sha256 and canonical root were checked first; every number comes from the
signed run config or the signed checkpoint statements, and must agree between them; the config
handed to DeepSpeed and the trainer is validated against a schema (unknown keys, path-bearing keys
and out-of-range values are refused), so a bundle supplies data, never code paths or file paths.

Segment k runs from the start state S_k (genesis for k = 0: weights only; otherwise checkpoint
k-1: weights and AdamW state) to checkpoint k, whose weights *and* optimizer state it must
reproduce (`expect`), so replayed segments chain end to end. torch-free.
"""

from __future__ import annotations

import hmac
import math
from pathlib import Path
from typing import Any, TypeGuard

from attest.chain import Entry
from attest.digest import merkle_root
from attest.errors import KaiError
from attest.verify.findings import UNREADABLE, Context, as_dict, shard_subjects, subjects_of, weights_files


class PlanError(KaiError, ValueError):
    """Segment k cannot be replayed as signed; the message names what is missing or disagrees."""


class ReplayUndecided(PlanError):
    """Segment k is not replayed here, though nothing in it is wrong: it costs more than the policy's
    limits allow, or this install cannot run it. The verdict is INCOMPLETE, never FAIL or PASS."""


MAX_THREADS = 256  # intra-op threads a replay rank may be pinned to (what the segment's training recorded)
RANK_OVERHEAD_BYTES = 512 << 20  # a rank's interpreter, torch and DeepSpeed, before the model
DETERMINISM_MODES = ("exact", "fast")  # kai_train.determinism.MODES (attest does not import torch)


def replay_cost(plan: dict[str, Any], weight_bytes: int, model: dict[str, Any]) -> dict[str, int]:
    """What replaying one plan costs, from signed numbers only: micro-batches and tokens it runs, ranks
    it starts and an estimate of its resident memory (all ranks): every rank may hold the float32
    weights and gradients (ZeRO-1/2), the AdamW moments once over all ranks, plus activations and a
    fixed overhead per rank."""
    train, ranks = plan["train"], plan["world_size"]
    steps = plan["target_step"] - plan["start_step"]
    micro = steps * train["grad_accum"] * ranks
    tokens = micro * train["micro_batch"] * train["text_len"]
    activations = train["micro_batch"] * train["text_len"] * model["dim"] * model["n_layers"] * 4 * 16
    memory = ranks * (2 * weight_bytes + activations + RANK_OVERHEAD_BYTES) + 3 * weight_bytes
    return {"ranks": ranks, "micro_batches": micro, "tokens": tokens, "memory_bytes": memory,
            "threads": plan.get("threads", 1)}


def check_cost(ctx: Context, cost: dict[str, int], where: str) -> None:
    """ReplayUndecided when `cost` exceeds a policy limit: checked before any process starts."""
    limits = ctx.policy.limits
    for key, limit in (("ranks", "max_replay_ranks"), ("micro_batches", "max_replay_micro_batches"),
                       ("tokens", "max_replay_tokens"), ("memory_bytes", "max_replay_memory_bytes")):
        if cost[key] > limits[limit]:
            raise ReplayUndecided(f"{where}: not replayed, it would cost {cost[key]:,} {key.replace('_', ' ')} "
                                  f"(policy limits.{limit} {limits[limit]:,}; raise it in a --policy file to replay "
                                  "this segment)")


# ---------------------------------------------------------------- config schema

_BOOL, _INT, _NUM, _STR = "bool", "int", "num", "str"
# (type, low, high) or (type, allowed values). A key absent here is refused.
TRAIN_SCHEMA: dict[str, tuple[Any, ...]] = {
    "steps": (_INT, 1, 10**7), "micro_batch": (_INT, 1, 1 << 16), "grad_accum": (_INT, 1, 1 << 16),
    "text_len": (_INT, 1, 1 << 20), "lr": (_NUM, 0.0, 10.0), "betas": ("betas",),
    "weight_decay": (_NUM, 0.0, 10.0), "schedule": (_STR, ("cosine", "wsd")), "warmup": (_INT, 0, 10**7),
    "min_lr_ratio": (_NUM, 0.0, 1.0), "decay_frac": (_NUM, 0.0, 1.0), "grad_clip": (_NUM, 0.0, 1e6),
    "activation_checkpointing": (_BOOL,), "holdout_every": (_INT, 0, 1 << 30), "eval_every": (_INT, 0, 10**7),
    "eval_batches": (_INT, 0, 1 << 20), "log_every": (_INT, 0, 10**7), "ckpt_every": (_INT, 1, 10**7),
    "stop_at": ("opt_int", 0, 10**7), "expert_parallel": (_INT, 1, 1 << 16),
}
_OFFLOAD = {"device": (_STR, ("cpu", "none")), "pin_memory": (_BOOL,)}
ZERO_SCHEMA: dict[str, tuple[Any, ...]] = {
    "stage": (_INT, 0, 3), "overlap_comm": (_BOOL,), "contiguous_gradients": (_BOOL,), "reduce_scatter": (_BOOL,),
    "allgather_partitions": (_BOOL,), "reduce_bucket_size": (_INT, 1, 1 << 40),
    "allgather_bucket_size": (_INT, 1, 1 << 40), "stage3_gather_16bit_weights_on_model_save": (_BOOL,),
    "stage3_prefetch_bucket_size": (_INT, 0, 1 << 40), "stage3_param_persistence_threshold": (_INT, 0, 1 << 40),
    "stage3_max_live_parameters": (_INT, 0, 1 << 40), "stage3_max_reuse_distance": (_INT, 0, 1 << 40),
    "sub_group_size": (_INT, 1, 1 << 40), "offload_optimizer": ("map", _OFFLOAD), "offload_param": ("map", _OFFLOAD),
}
DEEPSPEED_SCHEMA: dict[str, tuple[Any, ...]] = {
    "bf16": ("map", {"enabled": (_BOOL,)}), "bf16_on_cpu": (_BOOL,), "zero_force_ds_cpu_optimizer": (_BOOL,),
    "zero_optimization": ("map", ZERO_SCHEMA),
}
MODEL_INTS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "image_size",
              "image_channels", "patch_size", "vision_dim", "vision_layers", "vision_heads", "sample_rate", "n_fft",
              "hop_length", "n_mels", "audio_samples", "speech_dim", "speech_layers", "speech_heads")
MODEL_FLOATS = ("rope_theta", "norm_eps")
# Mixture-of-experts fields: 0 (or absent, in bundles older than them) means a dense decoder.
MOE_INTS = ("n_experts", "n_shared_experts", "moe_top_k", "moe_hidden", "moe_dense_layers")
MOE_FLOATS = ("moe_aux_loss_coef", "moe_bias_update_rate", "moe_capacity_factor")


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def validate(value: Any, schema: dict[str, tuple[Any, ...]], where: str) -> dict[str, Any]:
    """`value` checked against `schema`; PlanError names the first offending key."""
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected a mapping, found {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, v in value.items():
        rule = schema.get(key)
        if rule is None:
            raise PlanError(f"{where}.{key}: not a key replay accepts (allowed: {', '.join(sorted(schema))})")
        kind, *arg = rule
        ok = {
            _BOOL: lambda: isinstance(v, bool),
            _INT: lambda: _is_int(v) and arg[0] <= v <= arg[1],
            "opt_int": lambda: v is None or (_is_int(v) and arg[0] <= v <= arg[1]),
            _NUM: lambda: _is_num(v) and arg[0] <= v <= arg[1],
            _STR: lambda: isinstance(v, str) and v in arg[0],
            "betas": lambda: isinstance(v, list) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v),
            "map": lambda: True,
        }[kind]()
        if not ok:
            raise PlanError(f"{where}.{key} = {str(v)[:60]!r}: out of the accepted range or type {rule}")
        out[key] = validate(v, arg[0], f"{where}.{key}") if kind == "map" else v
    return out


def validate_model(model: Any, where: str = "genesis recipe.model") -> dict[str, Any]:
    required, optional = set(MODEL_INTS + MODEL_FLOATS), set(MOE_INTS + MOE_FLOATS)
    if not isinstance(model, dict) or not required <= set(model) <= required | optional:
        have = sorted(model) if isinstance(model, dict) else type(model).__name__
        raise PlanError(f"{where}: expected exactly the fields {sorted(required)} (and optionally "
                        f"{sorted(optional)}), found {have}")
    for k in MOE_INTS:
        if k in model and not (_is_int(model[k]) and 0 <= model[k] <= 1 << 24):
            raise PlanError(f"{where}.{k} = {str(model[k])[:40]!r}: expected a whole number in [0, 2^24]")
    for k in MOE_FLOATS:
        if k in model and not (_is_num(model[k]) and 0 <= model[k] <= 1e9):
            raise PlanError(f"{where}.{k} = {str(model[k])[:40]!r}: expected a number in [0, 1e9]")
    for k in MODEL_INTS:
        if not (_is_int(model[k]) and 1 <= model[k] <= 1 << 24):
            raise PlanError(f"{where}.{k} = {str(model[k])[:40]!r}: expected a whole number in [1, 2^24]")
    for k in MODEL_FLOATS:
        if not (_is_num(model[k]) and 0 < model[k] <= 1e9):
            raise PlanError(f"{where}.{k} = {str(model[k])[:40]!r}: expected a positive number")
    return dict(model)


# ---------------------------------------------------------------- bound files


def _bound_file(ctx: Context, e: Entry, name: str, what: str) -> str:
    """Absolute path of `name`, a subject of `e` whose file in the bundle has the signed sha256."""
    want = next((s["sha256"] for s in subjects_of(e) if s["name"] == name), None)
    if want is None:
        raise PlanError(f"{what} {name!r} is not a subject of {ctx.where(e)}")
    try:
        got = ctx.files.sha256(name)
        path = ctx.files.path(name)
    except UNREADABLE as ex:
        raise PlanError(f"{what} {name}: {ex}") from None
    if not hmac.compare_digest(str(want), got):
        raise PlanError(f"{what} {name}: sha256 {got[:16]}… differs from the signed {str(want)[:16]}…")
    return str(path.resolve())


def optimizer_files(opt: Any) -> list[str] | None:
    """The optimizer state files a checkpoint's `optimizer` record names (`files`, or one `file`)."""
    if not isinstance(opt, dict):
        return None
    names = opt.get("files") if "files" in opt else [opt.get("file")]
    return names if isinstance(names, list) and names and all(isinstance(n, str) for n in names) else None


def _bound_set(ctx: Context, e: Entry, names: list[str], want_root: Any, what: str) -> list[str]:
    """Absolute paths of one state split over `names`, each a signed subject of `e`, their canonical root `want_root`."""
    paths = [_bound_file(ctx, e, n, what) for n in names]
    try:
        if merkle_root(ctx.files.leaves(names)) != want_root:
            raise PlanError(f"{', '.join(names)[:200]}: canonical root differs from the signed {what} root")
    except UNREADABLE as ex:
        raise PlanError(f"{what}: {ex}") from None
    return paths


def _state(ctx: Context, e: Entry, with_optimizer: bool) -> dict[str, Any]:
    """The signed state of a genesis/checkpoint statement: its weights files (and optimizer files), roots checked."""
    p = e.predicate
    files = weights_files(e)
    if not files:
        raise PlanError(f"{ctx.where(e)} names no weights file")
    state: dict[str, Any] = {"step": p.get("step", 0) if e.kind == "checkpoint" else 0,
                             "weights": _bound_set(ctx, e, files, p.get("weights_root"), "weights"),
                             "weights_root": p.get("weights_root")}
    if with_optimizer:
        opt = as_dict(p.get("optimizer"))
        names, opt_step, root = optimizer_files(opt), opt.get("step"), opt.get("root")
        if not (names and _is_int(opt_step) and opt_step >= 0 and isinstance(root, str)):
            raise PlanError(f"{ctx.where(e)} (step {p.get('step')}) records no optimizer state {{files, step, root}}: "
                            "the segment cannot start from it or be closed at it")
        state["optimizer"] = _bound_set(ctx, e, names, root, "optimizer state")
        state["optimizer_step"], state["optimizer_root"] = opt_step, root
    return state


def _weight_bytes(ctx: Context, e: Entry) -> int:
    """Bytes of a statement's weights files as the bundle holds them (signed subjects; 0 when absent)."""
    total = 0
    for name in weights_files(e):
        try:
            total += ctx.files.path(name).stat().st_size
        except UNREADABLE:
            pass
    return total


# ---------------------------------------------------------------- the plan


def build_plan(ctx: Context, k: int, replay_world: int | None = None) -> dict[str, Any]:
    """The closed plan of segment k (0-based over the chain's checkpoints); PlanError when it cannot be built.

    `replay_world`: run on that many ranks instead of the recorded world size (tolerance mode). The
    rows of each optimizer step stay the same: grad_accum becomes world × grad_accum / replay_world."""
    ckpts = ctx.of_kind("checkpoint")
    gens, runs, toks = ctx.of_kind("genesis"), ctx.of_kind("run"), ctx.of_kind("tokenizer")
    if len(gens) != 1 or len(runs) != 1 or len(toks) != 1:
        raise PlanError(f"{len(runs)} run, {len(gens)} genesis, {len(toks)} tokenizer statements; replay needs one each")
    if "genesis" in ctx.failed:  # not the committed model, or above the policy's re-derivation budget
        raise PlanError("not replayed: the genesis check failed (genesis reports why)")
    target = ckpts[k]
    prev = ckpts[k - 1] if k > 0 else gens[0]
    tp = target.predicate
    consumed = as_dict(tp.get("data_consumed"))
    sampler = as_dict(consumed.get("sampler"))
    world = sampler.get("world_size")
    if not (_is_int(world) and 1 <= world <= 1 << 24):
        raise PlanError(f"{ctx.where(target)}: sampler.world_size {str(world)[:20]!r}: expected a whole number of ranks")
    ranks = world if replay_world is None else replay_world
    max_ranks = ctx.policy.limits["max_replay_ranks"]
    if not (_is_int(ranks) and 1 <= ranks <= max_ranks):
        raise ReplayUndecided(f"{ctx.where(target)}: replay on {str(ranks)[:20]} ranks: replay runs 1 to {max_ranks} "
                              "CPU processes here (policy limits.max_replay_ranks; raise it to replay this segment)")
    cfg = ctx.run_config
    train = validate(cfg.get("train"), TRAIN_SCHEMA, "run config train")
    missing = sorted(set(TRAIN_SCHEMA) - set(train) - {"stop_at", "expert_parallel"})
    if missing:
        raise PlanError(f"run config train: missing {missing}")
    deepspeed = validate(cfg.get("deepspeed"), DEEPSPEED_SCHEMA, "run config deepspeed")
    model = validate_model(as_dict(gens[0].predicate.get("recipe")).get("model"))
    seed = cfg.get("seed")
    if not _is_int(seed):
        raise PlanError(f"run config seed = {str(seed)[:40]!r}: expected an integer")

    # Every replay parameter comes from the signed run config; the checkpoint's record must agree.
    # The segment's own layout (world size, micro_batch, grad_accum) is what it recorded: a run resumed
    # on another world size keeps its global batch by changing grad_accum or micro_batch, and each
    # segment replays exactly at the layout it ran with. Absent from older records: the run config's.
    micro_batch = sampler.get("micro_batch")
    grad_accum = sampler.get("grad_accum", train["grad_accum"])
    for key, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if not (_is_int(v) and 1 <= v <= TRAIN_SCHEMA[key][2]):
            raise PlanError(f"{ctx.where(target)}: data_consumed sampler.{key} {str(v)[:20]!r}: expected a whole number "
                            f"in [1, {TRAIN_SCHEMA[key][2]}]")
    agree = {"sampler.seed": (sampler.get("seed"), seed),
             "holdout_every": (consumed.get("holdout_every"), train["holdout_every"])}
    want_start = as_dict(prev.predicate.get("data_consumed")).get("sampler", {}).get("position_end", 0) if k else 0
    agree["sampler.position_start"] = (sampler.get("position_start"), want_start)
    kind, mixture = run_sampler(cfg)
    agree["sampler.kind"] = (sampler.get("kind"), kind)
    agree["sampler.mixture"] = (sampler.get("mixture"), mixture)
    shards_cfg = [as_dict(s).get("name") for s in cfg.get("data_shards") or []]
    agree["shards"] = (consumed.get("shards"), shards_cfg)
    for field, (got, want) in agree.items():
        if got != want or isinstance(got, bool):
            raise PlanError(f"{ctx.where(target)}: data_consumed {field} {str(got)[:80]} differs from the signed "
                            f"run config / previous checkpoint ({str(want)[:80]})")
    step_end = tp.get("step")
    steps = (step_end if _is_int(step_end) else -1) - (prev.predicate.get("step", 0) if k else 0)
    if not 1 <= steps <= train["steps"]:
        raise PlanError(f"{ctx.where(target)}: the segment spans {steps} steps")
    want_end = sampler["position_start"] + steps * grad_accum * micro_batch * world
    if sampler.get("position_end") != want_end:
        raise PlanError(f"{ctx.where(target)}: sampler.position_end {str(sampler.get('position_end'))[:20]} is not "
                        f"position_start + steps × grad_accum × micro_batch × world = {want_end}")

    shard_index = shard_subjects(ctx)
    shards, shard_rows, shard_sources = [], [], []
    for name in shards_cfg:
        if not isinstance(name, str) or name not in shard_index:
            raise PlanError(f"training shard {str(name)[:80]!r} is not a subject of any data-shard statement")
        declared = ctx.entries[shard_index[name][0]]
        shards.append(_bound_file(ctx, declared, name, "training shard"))
        manifest = as_dict(declared.predicate.get("manifest"))
        shard_rows.append(manifest.get("rows"))
        shard_sources.append(as_dict(manifest.get("source")).get("name"))
    tok_name = cfg.get("tokenizer")
    tokenizer = _bound_file(ctx, toks[0], tok_name, "tokenizer") if isinstance(tok_name, str) else None
    if tokenizer is None:
        raise PlanError("run config names no tokenizer")

    # Expert parallelism: what the segment recorded (absent: 1; the trainer records it when above 1,
    # and a resumed segment may differ from the run config). A replay on another world size splits no experts.
    ep = sampler.get("expert_parallel", 1)
    n_experts = model.get("n_experts") or 0
    if not (_is_int(ep) and 1 <= ep <= world and world % ep == 0 and (ep == 1 or n_experts % ep == 0)):
        raise PlanError(f"{ctx.where(target)}: data_consumed sampler.expert_parallel {str(ep)[:20]!r}: expected a "
                        f"divisor of the world size {world} and of the model's {n_experts} experts")
    if ep > 1 and as_dict(deepspeed.get("zero_optimization")).get("stage") == 3:
        raise PlanError(f"{ctx.where(target)}: data_consumed sampler.expert_parallel {ep} with ZeRO-3: the trainer "
                        "refuses experts split over ranks under ZeRO-3")
    run_train = {**train, "micro_batch": micro_batch, "grad_accum": grad_accum,
                 "expert_parallel": ep if ranks == world else 1}
    if ranks != world:  # the same rows per optimizer step, split over other ranks and micro-steps
        rows_per_micro_step = world * grad_accum
        if rows_per_micro_step % ranks:
            raise ReplayUndecided(f"{ctx.where(target)}: recorded on {world} ranks × grad_accum {grad_accum}: "
                                  f"cannot keep each step's rows on {ranks} ranks (not a divisor of "
                                  f"{rows_per_micro_step}); tolerance mode needs other --replay-worlds")
        run_train["grad_accum"] = rows_per_micro_step // ranks
    det = as_dict(as_dict(tp.get("environment")).get("determinism"))
    threads = det.get("threads", 1)
    mode = det.get("mode", "exact")
    if mode not in DETERMINISM_MODES:
        raise PlanError(f"{ctx.where(target)}: environment.determinism.mode {str(mode)[:20]!r}: expected one of "
                        f"{', '.join(DETERMINISM_MODES)}")
    kernels = det.get("sdp_kernels")
    if not (_is_int(threads) and 1 <= threads <= MAX_THREADS):
        raise PlanError(f"{ctx.where(target)}: environment.determinism.threads {str(threads)[:20]!r}: expected a "
                        f"whole number in [1, {MAX_THREADS}]")
    cost = replay_cost({"train": run_train, "world_size": ranks, "target_step": int(tp["step"]),
                        "start_step": int(tp["step"]) - steps, "threads": threads},
                       _weight_bytes(ctx, prev), model)
    check_cost(ctx, cost, ctx.where(target))
    start = _state(ctx, prev, with_optimizer=k > 0)
    expect = _state(ctx, target, with_optimizer=True)
    losses = tp.get("step_losses")
    recorded_losses = losses if isinstance(losses, list) and len(losses) == steps and all(
        _is_num(x) for x in losses) else None
    routing = tp.get("routing")  # a mixture of experts' per-step, per-layer routing digests
    if routing is not None:
        from attest.statements import routing_problem

        why = routing_problem(routing)
        if why is None and len(routing["steps"]) != steps:
            why = f"routing has {len(routing['steps'])} steps, the segment {steps}"
        if why is not None:
            raise PlanError(f"{ctx.where(target)}: {why}")
    return {"segment": k, "world_size": ranks, "recorded_world": world, "seed": seed, "model": model,
            "threads": threads, "cost": cost,
            "determinism": {"mode": mode, "sdp_kernels": kernels if isinstance(kernels, str) else None},
            "train": run_train, "deepspeed": deepspeed,
            "shards": shards, "tokenizer": tokenizer, "holdout_every": train["holdout_every"],
            "sampler_kind": kind, "mixture": mixture,
            "shard_rows": shard_rows if all(_is_int(r) and r >= 0 for r in shard_rows) else None,
            "shard_sources": shard_sources if mixture is not None else None,
            "num_rows": sampler.get("num_rows"), "position_start": sampler["position_start"],
            "position_end": want_end, "start": start, "target_step": tp["step"],
            "start_step": start["step"], "step_losses": recorded_losses,
            "routing": {"layers": routing["layers"], "steps": routing["steps"]} if routing is not None else None,
            "moe": bool(model.get("n_experts")) and model["n_layers"] > model.get("moe_dense_layers", 0),
            "claimed": [*expect["weights"], *expect["optimizer"]],
            "expect": {"weights_root": expect["weights_root"], "optimizer_root": expect["optimizer_root"],
                       "optimizer_step": expect["optimizer_step"]}}


def run_sampler(cfg: dict[str, Any]) -> tuple[str | None, dict[str, int] | None]:
    """attest.sampling.run_sampler, its ValueError a PlanError."""
    from attest import sampling

    try:
        return sampling.run_sampler(cfg)
    except ValueError as e:
        raise PlanError(str(e)) from None


def plan_paths(plan: dict[str, Any]) -> list[Path]:
    """Every file a plan lets the plug-in read (for tests and the report)."""
    start = plan["start"]
    return [Path(p) for p in [*plan["shards"], plan["tokenizer"], *start["weights"], *start.get("optimizer", [])]]
