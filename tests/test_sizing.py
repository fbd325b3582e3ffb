"""kai_train.sizing: preset parameter counts, the ZeRO memory accounting, the CLI table."""

from __future__ import annotations

import pytest
pytest.importorskip("omegaconf", reason="the train extra; not on the evaluator's light install")
from omegaconf import OmegaConf

from kai_train.model import ModelConfig
from kai_train.sizing import CONF_MODEL, activation_bytes, main, memory_per_gpu, param_counts, presets

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
    assert list(presets())[-len(PRESET_TOTALS):] == list(PRESET_TOTALS)


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


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        memory_per_gpu(ModelConfig(), 2, 4)
    with pytest.raises(ValueError, match="offload"):
        memory_per_gpu(ModelConfig(), 2, 0, offload=True)


def test_cli_prints_a_row_per_preset(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--world-size", "16"])  # what `python -m kai_train.sizing --world-size 16` runs
    out = capsys.readouterr().out
    assert "world size 16" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["tiny", *PRESET_TOTALS]
