"""kai_train.sizing: preset parameter counts, the ZeRO memory accounting, the CLI table."""

from __future__ import annotations

import pytest
pytest.importorskip("omegaconf", reason="the train extra; not on the evaluator's light install")
from omegaconf import OmegaConf

from kai_train.model import ModelConfig
from kai_train.sizing import (
    CONF_MODEL, active_params, activation_bytes, checkpoint_bytes_per_rank, expert_params, gpus_needed, main,
    memory_per_gpu, param_counts, presets,
)

# Advertised total sizes (text decoder + both encoders), from the counts in each preset's header.
PRESET_TOTALS = {
    "125m": (0.20e9, 0.26e9),
    "350m": (0.48e9, 0.58e9),
    "1b": (1.3e9, 1.6e9),
    "3b": (3.5e9, 4.2e9),
    "7b": (7.8e9, 9.0e9),
    "13b": (12.0e9, 14.0e9),
}
# The text decoder alone is what the preset is named after.
PRESET_DECODERS = {
    "125m": (0.11e9, 0.14e9),
    "350m": (0.32e9, 0.38e9),
    "1b": (1.1e9, 1.35e9),
    "3b": (3.0e9, 3.4e9),
    "7b": (7.0e9, 8.0e9),
    "13b": (11.0e9, 13.5e9),
}
TINY_PARAMS = 306_752  # kai_train/conf/model/tiny.yaml header


def load(name: str) -> ModelConfig:
    return ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml")))


@pytest.mark.parametrize("name", PRESET_TOTALS)
def test_every_preset_loads_with_every_field_and_has_its_advertised_size(name: str) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
    assert set(raw) == set(ModelConfig().to_dict()), "a preset lists every ModelConfig field"
    counts = param_counts(load(name))
    lo, hi = PRESET_TOTALS[name]
    assert lo <= counts["total"] <= hi, counts
    lo, hi = PRESET_DECODERS[name]
    assert lo <= counts["text"] <= hi, counts
    # the header states the exact total
    header = (CONF_MODEL / f"{name}.yaml").read_text().split("\n\n")[0]
    assert f"total {counts['total'] / 1e9:.2f}B" in header or f"total {counts['total'] / 1e6:.1f}M" in header
    assert f"({counts['total']:,})" in header


def test_presets_grow_strictly_from_125m_to_13b() -> None:
    totals = [param_counts(load(n))["total"] for n in PRESET_TOTALS]
    decoders = [param_counts(load(n))["text"] for n in PRESET_TOTALS]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert decoders == sorted(decoders) and len(set(decoders)) == len(decoders)
    dense = [name for name, cfg in presets().items() if not cfg.n_experts]
    assert dense[-len(PRESET_TOTALS):] == list(PRESET_TOTALS)


def test_components_add_up_to_the_model_parameter_count() -> None:
    cfg = ModelConfig()
    counts = param_counts(cfg)
    assert counts["total"] == counts["text"] + counts["vision"] + counts["speech"] == TINY_PARAMS


def test_zero2_memory_matches_hand_computation() -> None:
    # Ψ = 306,752, 4 ranks, ZeRO-2: bf16 params whole (2Ψ), bf16 grads sharded (2Ψ/4),
    # fp32 master + Adam m, v sharded (12Ψ/4).
    m = memory_per_gpu(ModelConfig(), world_size=4, zero_stage=2, offload=False)
    assert m["params"] == 613_504
    assert m["grads"] == 153_376
    assert m["optimizer"] == 920_256
    assert m["cpu_offload"] == 0
    assert m["gpu_total"] == 613_504 + 153_376 + 920_256 + m["activations"]


def test_offload_moves_the_optimizer_shard_to_cpu() -> None:
    cfg = ModelConfig()
    on, off = (memory_per_gpu(cfg, 4, 3, offload=o) for o in (True, False))
    assert on["optimizer"] == 0 and on["cpu_offload"] == off["optimizer"] == 12 * TINY_PARAMS // 4
    assert on["gpu_total"] < off["gpu_total"]


def test_each_zero_stage_needs_less_per_gpu_than_the_one_before() -> None:
    cfg = load("7b")
    totals = [memory_per_gpu(cfg, 8, stage)["gpu_total"] for stage in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_zero3_memory_per_gpu_falls_with_world_size() -> None:
    cfg = load("7b")
    states = [memory_per_gpu(cfg, n, 3)["gpu_total"] for n in (1, 2, 8, 64)]
    assert all(a > b for a, b in zip(states, states[1:])), states
    # ZeRO-1 keeps whole params and grads on every GPU: it stops falling below 4 bytes/param
    assert memory_per_gpu(cfg, 10**6, 1)["gpu_total"] > 4 * param_counts(cfg)["total"]


def test_activation_checkpointing_cuts_activation_memory() -> None:
    cfg = load("1b")
    full = activation_bytes(cfg, micro_batch=2, seq_len=4096, checkpointing=False)
    ckpt = activation_bytes(cfg, micro_batch=2, seq_len=4096, checkpointing=True)
    assert ckpt < full / 3
    assert activation_bytes(cfg, 4, 4096, True) == 2 * activation_bytes(cfg, 2, 4096, True)


def test_math_attention_keeps_the_score_matrices_that_a_fused_kernel_does_not() -> None:
    cfg = load("1b")
    rows = cfg.n_image_tokens + cfg.n_audio_tokens + 4096
    for ckpt in (False, True):
        fused = activation_bytes(cfg, 1, 4096, ckpt)
        math = activation_bytes(cfg, 1, 4096, ckpt, attention="math")
        # the decoder's scores and probabilities, heads x rows x rows in bf16, for every block without
        # checkpointing and for the one block recomputed at a time with it
        blocks = 1 if ckpt else cfg.n_layers
        enc = cfg.vision_layers * 4 * cfg.vision_heads * cfg.n_image_tokens**2 + \
            cfg.speech_layers * 4 * cfg.speech_heads * cfg.n_audio_tokens**2
        assert math - fused == blocks * 4 * cfg.n_heads * rows * rows + enc
    # quadratic in the sequence: at 32k the math kernel's activations dwarf the fused kernel's
    long = dict(micro_batch=1, seq_len=32768, checkpointing=True)
    assert activation_bytes(cfg, **long, attention="math") > 4 * activation_bytes(cfg, **long)
    with pytest.raises(ValueError, match="attention"):
        activation_bytes(cfg, 1, 128, True, attention="flashy")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        memory_per_gpu(ModelConfig(), 2, 4)
    with pytest.raises(ValueError, match="offload"):
        memory_per_gpu(ModelConfig(), 2, 0, offload=True)


def test_cli_prints_a_row_per_preset(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--world-size", "16"])  # what `python -m kai_train.sizing --world-size 16` runs
    out = capsys.readouterr().out
    assert "world size 16" in out
    dense_table = out.split("Mixture-of-experts")[0]
    rows = [line for line in dense_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["tiny", *PRESET_TOTALS]
    moe_rows = [line for line in out.split("Mixture-of-experts")[1].splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in moe_rows[2:]] == list(MOE_PRESETS)


# Published layouts the sized presets are shaped like: (total, active) parameter ranges, routed + shared, top-k.
MOE_PRESETS = {
    "moe-cpu": ((0.5e6, 0.7e6), (0.3e6, 0.45e6), 16, 1, 4),
    "moe-100b": ((95e9, 106e9), (11e9, 13e9), 128, 1, 8),
    "moe-236b": ((225e9, 245e9), (21e9, 26e9), 128, 1, 8),
    "moe-519b": ((500e9, 540e9), (31e9, 37e9), 192, 1, 8),
}


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_moe_presets_have_the_published_shape_and_their_advertised_size(name: str) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
    assert set(raw) == set(ModelConfig().to_dict()), "a preset lists every ModelConfig field"
    cfg = load(name)
    (tlo, thi), (alo, ahi), routed, shared, k = MOE_PRESETS[name]
    assert (cfg.n_experts, cfg.n_shared_experts, cfg.moe_top_k) == (routed, shared, k)
    total, active = param_counts(cfg)["total"], active_params(cfg)
    assert tlo <= total <= thi and alo <= active <= ahi, (total, active)
    if name != "moe-cpu":
        header = (CONF_MODEL / f"{name}.yaml").read_text().split("\n\n")[0]
        assert f"total {total / 1e9:.2f}B ({total:,})" in header and f"active per token {active / 1e9:.2f}B" in header


def test_expert_parallelism_divides_only_the_routed_experts() -> None:
    cfg = load("moe-236b")
    psi, psi_e = param_counts(cfg)["total"], expert_params(cfg)
    psi_d = psi - psi_e
    for ep in (1, 2, 8):
        m = memory_per_gpu(cfg, 64, 1, expert_parallel=ep)
        assert m["params"] == round(2 * (psi_d + psi_e / ep))  # whole dense part, 1/EP of the experts
        assert m["optimizer"] == round(12 * psi / 64)  # ZeRO shards every optimizer state over all 64 ranks
    # ZeRO-3 shards everything over the world whatever the EP size
    assert memory_per_gpu(cfg, 64, 3, expert_parallel=8)["params"] == memory_per_gpu(cfg, 64, 3)["params"]
    with pytest.raises(ValueError, match="expert_parallel"):
        memory_per_gpu(cfg, 64, 1, expert_parallel=3)


def test_gpus_needed_fit_an_80_gib_gpu_in_whole_nodes() -> None:
    cfg = load("moe-519b")
    n = gpus_needed(cfg, 3, expert_parallel=8)
    assert n is not None and n % 8 == 0
    assert memory_per_gpu(cfg, n, 3, expert_parallel=8)["gpu_total"] <= 76 * 1024**3
    assert memory_per_gpu(cfg, n - 8, 3, expert_parallel=8)["gpu_total"] > 76 * 1024**3
    assert checkpoint_bytes_per_rank(cfg, n) * n >= 12 * param_counts(cfg)["total"]
