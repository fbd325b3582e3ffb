"""How big a preset is and how much memory it needs per GPU under each ZeRO stage.

`python -m kai_train.sizing [--world-size N]` prints, for every `kai_train/conf/model/*.yaml`, the parameter
count per component and the GiB per GPU for ZeRO 1, 2, 3 and 3 with the optimizer offloaded; for
mixture-of-experts presets a second table: total and active parameters, GiB per GPU at an
expert-parallel size, the GPUs needed and the checkpoint bytes each rank writes.

Parameter counts come from `kai_train.modelspec.param_specs` (arithmetic on the config, equal to
the model built on the meta device by tests/test_genesis_v2.py), so they are exact and cost no
memory, even for a 500B-parameter preset. Memory follows the ZeRO paper's accounting (Rajbhandari et al.
2020) for mixed-precision Adam with Ψ parameters over N data-parallel ranks:

    params (bf16) 2Ψ, grads (bf16) 2Ψ, optimizer (fp32 master + Adam m + v) 12Ψ
    stage 1 shards the optimizer states (/N), stage 2 also the grads, stage 3 also the params;
    offload keeps the (sharded) optimizer states in CPU memory instead of on the GPU.

Mixture of experts with expert-parallel size E (DeepSpeed-MoE's layout): the routed experts Ψe are
split over E ranks and replicated over N / E, the rest Ψd over all N. So whole params and grads
cost 2(Ψd + Ψe/E) each, and every ZeRO stage shards what it shards over N in all (the dense part
over N, each expert slice over its N / E replicas).

Activations are a rough estimate (see `activation_bytes`), not a measurement. They follow the
attention kernel (`--attention`): `fused` (flash, cuDNN or memory-efficient: no s×s score matrix)
is what `determinism=exact` and `fast` run on a GPU (kai_train.determinism); `math` keeps the
scores and probabilities of every head, as the math kernel does (a CPU run, or a run whose record
says `sdp_kernels: math`). DeepSpeed's communication buckets, the CUDA context and allocator
fragmentation are left out; they add a few GiB per GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

from kai_train.modelspec import ModelConfig, _swiglu_hidden, param_specs

CONF_MODEL = Path(__file__).resolve().parent / "conf" / "model"
GiB = 1024**3
OPTIMIZER_BYTES = 12  # fp32 master weights + Adam m + Adam v, per parameter
# kai_train.train builds the float32 genesis model on the CPU of every rank before DeepSpeed
# shards it: host memory per rank at start (rank 0 briefly twice that, for the genesis digest).
GENESIS_HOST_BYTES = 4

# Top-level parameter name -> component. The "absent" vectors stand in for a missing modality,
# so they are counted with that modality's encoder.
COMPONENT_OF = {"text": "text", "vision": "vision", "absent_image": "vision",
                "speech": "speech", "absent_audio": "speech"}
COMPONENTS = ("text", "vision", "speech")


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component ('text', 'vision', 'speech') and their 'total'."""
    return dict(_param_counts(tuple(sorted(cfg.to_dict().items()))))


@functools.lru_cache(maxsize=64)
def _param_counts(fields: tuple[tuple[str, float], ...]) -> tuple[tuple[str, int], ...]:
    # Cached by field values: a 500B preset's list has ~36k tensors.
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, shape, _ in param_specs(ModelConfig(**dict(fields))):
        counts[COMPONENT_OF[name.split(".")[0]]] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return tuple(counts.items())


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts over all MoE blocks (what expert parallelism splits)."""
    return cfg.n_moe_layers * cfg.n_experts * 3 * cfg.dim * cfg.moe_hidden


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: all but the routed experts it is not sent to."""
    unused = cfg.n_moe_layers * (cfg.n_experts - cfg.moe_top_k) * 3 * cfg.dim * cfg.moe_hidden
    return param_counts(cfg)["total"] - unused


# ---------------------------------------------------------------------------------------------
# activations


def _block_bytes(rows: int, width: int, kv_width: int, hidden: int, a: int) -> int:
    """Bytes one transformer block keeps for backward, for `rows` positions of one sample.

    a = bytes per activation element (2 for bf16). Counted per position:
      2 RMSNorms:   fp32 normalized copy + cast output            2 (4 + a) w
      attention:    q, k, v, k/v repeated to all heads, sdpa out  a (4 w + 2 kv)
      RoPE:         fp32 copies of q and k                        4 (w + kv)
      SwiGLU:       w1 out, silu out, w3 out, their product       4 a hidden
    """
    per_row = 2 * (4 + a) * width + a * (4 * width + 2 * kv_width) + 4 * (width + kv_width) + 4 * a * hidden
    return rows * per_row


ATTENTION_KERNELS = ("fused", "math")


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool,
                     dtype_bytes: int = 2, attention: str = "fused") -> int:
    """Rough activation memory of one micro batch (per GPU; ZeRO does not shard activations).

    With checkpointing the decoder keeps only each block's input and recomputes one block at a
    time in backward (kai_train.model.TextDecoder); the encoders are never checkpointed. `attention`
    "math" adds each block's score and probability matrices (heads × rows × rows, twice).
    """
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    a = dtype_bytes
    rows = cfg.n_image_tokens + cfg.n_audio_tokens + seq_len  # decoder sequence: prefix + text
    kv = cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    dense = _block_bytes(rows, cfg.dim, kv, cfg.ffn_hidden, a)
    # An MoE block: its token runs k routed + the shared experts (their SwiGLU widths add up), plus
    # the (rows, k, dim) dispatch buffer and the float32 router scores.
    moe = _block_bytes(rows, cfg.dim, kv, (cfg.moe_top_k + cfg.n_shared_experts) * cfg.moe_hidden, a)
    moe += rows * (a * cfg.moe_top_k * cfg.dim + 8 * cfg.n_experts)
    if attention == "math":
        dense += 2 * a * cfg.n_heads * rows * rows
        moe += 2 * a * cfg.n_heads * rows * rows
    blocks = [moe if cfg.is_moe_layer(i) else dense for i in range(cfg.n_layers)]
    decoder = (cfg.n_layers * a * rows * cfg.dim + max(blocks, default=0)) if checkpointing else sum(blocks)
    logits = 2 * a * seq_len * cfg.vocab_size  # logits + log-softmax kept by cross-entropy
    vw, sw = cfg.vision_dim, cfg.speech_dim
    vision = cfg.vision_layers * _block_bytes(cfg.n_image_tokens, vw, vw, _swiglu_hidden(vw), a)
    speech = cfg.speech_layers * _block_bytes(cfg.n_audio_tokens, sw, sw, _swiglu_hidden(sw), a)
    if attention == "math":
        vision += cfg.vision_layers * 2 * a * cfg.vision_heads * cfg.n_image_tokens**2
        speech += cfg.speech_layers * 2 * a * cfg.speech_heads * cfg.n_audio_tokens**2
    speech += 4 * cfg.n_mels * cfg.n_audio_frames + 2 * a * sw * cfg.n_audio_tokens * 2  # log-mel, convs
    return micro_batch * (decoder + logits + vision + speech + a * rows * cfg.dim)


# ---------------------------------------------------------------------------------------------
# model states under ZeRO


def memory_per_gpu(cfg: ModelConfig, world_size: int, zero_stage: int, offload: bool = False,
                   dtype_bytes: int = 2, micro_batch: int = 1, seq_len: int | None = None,
                   activation_checkpointing: bool = True, expert_parallel: int = 1, attention: str = "fused"
                   ) -> dict[str, int]:
    """Bytes per GPU (and per rank in CPU memory when offloading) for one training rank.

    Keys: params, grads, optimizer (the GPU-resident parts), activations, gpu_total, and
    cpu_offload (the optimizer states held in host memory by this rank, 0 without offload).
    `expert_parallel` splits a mixture of experts' routed experts over that many ranks.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if offload and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    ep = expert_parallel
    if ep < 1 or world_size % ep or (cfg.n_experts and cfg.n_experts % ep) or (ep > 1 and not cfg.n_experts):
        raise ValueError(f"expert_parallel={ep} must divide world_size={world_size} and n_experts={cfg.n_experts}")
    n = world_size
    psi_e = expert_params(cfg)
    psi_d = param_counts(cfg)["total"] - psi_e

    def held(sharded: bool) -> float:
        return (psi_d + psi_e) / n if sharded else psi_d + psi_e / ep

    params = dtype_bytes * held(zero_stage >= 3)
    grads = dtype_bytes * held(zero_stage >= 2)
    optimizer = OPTIMIZER_BYTES * held(zero_stage >= 1)
    cpu = optimizer if offload else 0.0
    if offload:
        optimizer = 0.0
    acts = activation_bytes(cfg, micro_batch, cfg.max_seq_len if seq_len is None else seq_len,
                            activation_checkpointing, dtype_bytes, attention)
    out = {"params": params, "grads": grads, "optimizer": optimizer, "activations": acts, "cpu_offload": cpu}
    out["gpu_total"] = params + grads + optimizer + acts
    return {k: int(round(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU (the trainer's log, wandb and bench/train_throughput.py)

# Dense (no sparsity) tensor-core peaks per device in TFLOP/s: bf16/fp16, and tf32 (what fp32
# matmuls may use). Matched by substring of torch.cuda.get_device_name(), longest key first.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0), "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.0), "H800": (989.0, 494.0),
    "H20": (148.0, 74.0), "GH200": (989.0, 494.0), "B200": (2250.0, 1100.0), "GB200": (2500.0, 1250.0),
    "A100": (312.0, 156.0), "A800": (312.0, 156.0), "A10G": (70.0, 35.0), "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0), "L40": (181.0, 90.5), "L4": (121.0, 60.0), "RTX 4090": (165.0, 82.6),
    "MI300X": (1307.0, 654.0), "MI250X": (383.0, 95.7),
}


def peak_tflops(device_name: str | None, bf16: bool = True) -> float | None:
    """The device's dense peak TFLOP/s (bf16, else tf32) from PEAK_TFLOPS; None when unknown (a CPU)."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key][0 if bf16 else 1]
    return None



def flops_per_sample(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward = 3 x forward) for one sample of `seq_len` text tokens.

    Matmul FLOPs: 6 x (weights) x (positions they apply to) — the decoder blocks see the image and
    audio prefix too, the LM head only the text positions, each encoder its own tokens. Attention:
    12 x layers x width x positions^2 (the PaLM convention, causal masking not discounted).
    Embedding lookups, norms and the log-mel front end are left out.
    """
    n_img, n_aud = cfg.n_image_tokens, cfg.n_audio_tokens
    rows_dec = n_img + n_aud + seq_len
    conv1_rows = (cfg.n_audio_frames + 2 - 3) // 2 + 1
    total = 0
    for name, shape, _ in param_specs(cfg):
        if len(shape) < 2 or name.endswith(("tok_emb.weight", "pos_emb")):
            continue
        if name.startswith("text.lm_head"):
            rows = seq_len
        elif ".mlp.experts." in name:  # a routed expert sees top_k / n_experts of the rows, on average
            rows = rows_dec * cfg.moe_top_k / cfg.n_experts
        elif name.startswith("text."):
            rows = rows_dec
        elif name.startswith("vision."):
            rows = n_img
        elif name.startswith("speech.conv1"):
            rows = conv1_rows
        else:  # speech.*
            rows = n_aud
        total += 6 * math.prod(shape) * rows
    total += 12 * cfg.n_layers * cfg.dim * rows_dec**2
    total += 12 * cfg.vision_layers * cfg.vision_dim * n_img**2
    total += 12 * cfg.speech_layers * cfg.speech_dim * n_aud**2
    return int(total)


# ---------------------------------------------------------------------------------------------
# GPUs needed and checkpoint bytes


def checkpoint_bytes_per_rank(cfg: ModelConfig, world_size: int) -> int:
    """Bytes one rank writes per checkpoint: its ~1/world share of the float32 weights and the two
    AdamW moments (kai_train.checkpoint: whole tensors balanced over ranks, 12 bytes a parameter)."""
    return math.ceil(OPTIMIZER_BYTES * param_counts(cfg)["total"] / world_size)


def gpus_needed(cfg: ModelConfig, zero_stage: int, expert_parallel: int = 1, gpu_gib: float = 80.0,
                node: int = 8, headroom_gib: float = 4.0, **kw) -> int | None:
    """The fewest GPUs, in whole nodes of `node`, whose per-GPU total fits `gpu_gib` less headroom
    (DeepSpeed buffers, CUDA context); None if none up to 16,384 GPUs does."""
    n = max(node, expert_parallel)
    while n <= 16_384:
        if n % expert_parallel == 0:
            m = memory_per_gpu(cfg, n, zero_stage, expert_parallel=expert_parallel, **kw)
            if m["gpu_total"] <= (gpu_gib - headroom_gib) * GiB:
                return n
        n += node
    return None


# ---------------------------------------------------------------------------------------------
# presets and the CLI


def load_preset(name_or_path: str | Path) -> ModelConfig:
    """A model preset by name (kai_train/conf/model/NAME.yaml) or by path to a YAML file."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_MODEL / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(CONF_MODEL.glob("*.yaml")))
        raise SystemExit(f"kai-sizing: error: no model preset {str(name_or_path)!r} ({path}); known: {known}")
    return ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def presets() -> dict[str, ModelConfig]:
    """Every kai_train/conf/model/*.yaml, smallest first."""
    cfgs = {p.stem: load_preset(p) for p in CONF_MODEL.glob("*.yaml")}
    return dict(sorted(cfgs.items(), key=lambda kv: param_counts(kv[1])["total"]))


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def table(world_size: int, micro_batch: int, checkpointing: bool, seq_len: int | None = None,
          attention: str = "fused") -> str:
    """The Markdown table `python -m kai_train.sizing` prints."""
    head = ["preset", "text", "vision", "speech", "total", "seq", "act GiB",
            "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3+offload", "offload CPU GiB/rank", "genesis CPU GiB/rank"]
    rows = [head, ["---"] * len(head)]
    for name, cfg in presets().items():
        if cfg.n_experts:
            continue  # moe_table
        c = param_counts(cfg)
        seq = min(seq_len, cfg.max_seq_len) if seq_len else cfg.max_seq_len
        mem = {k: memory_per_gpu(cfg, world_size, stage, off, micro_batch=micro_batch, seq_len=seq,
                                 activation_checkpointing=checkpointing, attention=attention)
               for k, (stage, off) in {"z1": (1, False), "z2": (2, False), "z3": (3, False), "z3o": (3, True)}.items()}
        gib = {k: f"{m['gpu_total'] / GiB:.1f}" for k, m in mem.items()}
        rows.append([name, *(_fmt_params(c[k]) for k in (*COMPONENTS, "total")), str(seq),
                     f"{mem['z1']['activations'] / GiB:.1f}", gib["z1"], gib["z2"], gib["z3"], gib["z3o"],
                     f"{mem['z3o']['cpu_offload'] / GiB:.1f}", f"{GENESIS_HOST_BYTES * c['total'] / GiB:.1f}"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def moe_table(world_size: int, expert_parallel: int, micro_batch: int, checkpointing: bool,
              seq_len: int | None = None, gpu_gib: float = 80.0, attention: str = "fused") -> str:
    """The Markdown table of the mixture-of-experts presets `python -m kai_train.sizing` prints."""
    head = ["preset", "experts", "total", "active", "EP", "ZeRO-1 GiB", "ZeRO-3 GiB",
            f"GPUs ZeRO-1 ({gpu_gib:.0f} GiB)", f"GPUs ZeRO-3 ({gpu_gib:.0f} GiB)", "ckpt GiB/rank"]
    rows = [head, ["---"] * len(head)]
    for name, cfg in presets().items():
        if not cfg.n_experts or cfg.n_experts % expert_parallel or world_size % expert_parallel:
            continue
        seq = min(seq_len, cfg.max_seq_len) if seq_len else cfg.max_seq_len
        kw = dict(micro_batch=micro_batch, seq_len=seq, activation_checkpointing=checkpointing, attention=attention)
        mem = {z: memory_per_gpu(cfg, world_size, z, expert_parallel=expert_parallel, **kw)["gpu_total"] / GiB
               for z in (1, 3)}
        need = {z: gpus_needed(cfg, z, expert_parallel, gpu_gib, **kw) for z in (1, 3)}
        rows.append([name, f"{cfg.n_experts}+{cfg.n_shared_experts} top-{cfg.moe_top_k}",
                     _fmt_params(param_counts(cfg)["total"]), _fmt_params(active_params(cfg)), str(expert_parallel),
                     f"{mem[1]:.1f}", f"{mem[3]:.1f}", *(str(need[z] or "-") for z in (1, 3)),
                     f"{checkpoint_bytes_per_rank(cfg, world_size) / GiB:.1f}"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kai_train.sizing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, default=8, help="data-parallel ranks (GPUs in all) [8]")
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per GPU per micro step [1]")
    ap.add_argument("--seq-len", type=int, default=None, help="text tokens per sample [each preset's max_seq_len]")
    ap.add_argument("--no-activation-checkpointing", dest="checkpointing", action="store_false",
                    help="estimate activations without recomputation (train.activation_checkpointing=false)")
    ap.add_argument("--expert-parallel", type=int, default=8,
                    help="ranks the routed experts of a mixture-of-experts preset are split over [8: one node]")
    ap.add_argument("--attention", choices=ATTENTION_KERNELS, default="fused",
                    help="the attention kernel: fused (flash/cuDNN/memory-efficient, what a GPU run uses) or math "
                         "(s×s scores kept; a CPU run) [fused]")
    args = ap.parse_args(argv)
    if args.world_size < 1 or args.micro_batch < 1:
        ap.error("--world-size and --micro-batch must be >= 1")
    if args.expert_parallel < 1 or args.world_size % args.expert_parallel:
        ap.error("--expert-parallel must be >= 1 and divide --world-size")
    print(f"GiB per GPU: bf16 params and grads, fp32 Adam states; world size {args.world_size}, "
          f"micro batch {args.micro_batch}, activation checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{args.attention} attention; "
          "add ~2-4 GiB for DeepSpeed buffers and the CUDA context. Host memory: the offloaded optimizer "
          "shard, and at start the fp32 genesis model on every rank.\n")
    print(table(args.world_size, args.micro_batch, args.checkpointing, args.seq_len, args.attention))
    moe = moe_table(args.world_size, args.expert_parallel, args.micro_batch, args.checkpointing, args.seq_len,
                    attention=args.attention)
    if moe.count("\n") > 1:
        print(f"\nMixture-of-experts presets at world size {args.world_size}, expert-parallel size "
              f"{args.expert_parallel} (routed experts split over EP ranks, replicated over world / EP); "
              "GPUs needed in whole 8-GPU nodes, 4 GiB headroom; ckpt: 12 bytes a parameter over the ranks.\n")
        print(moe)


if __name__ == "__main__":
    main()
