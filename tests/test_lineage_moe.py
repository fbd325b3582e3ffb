"""Lineage for mixture-of-experts models: a block's experts are pooled into its FFN roles, so a
release whose experts are upcycled from a foreign dense FFN (sliced, noised, experts permuted) is
judged dependent on that model, naming the blocks, and an independently initialised MoE is not."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import yaml  # noqa: E402

from attest.lineage import lineage  # noqa: E402
from attest.lineage.names import map_names  # noqa: E402
from kai_train.init import build_genesis_model  # noqa: E402
from kai_train.modelspec import ModelConfig  # noqa: E402
from kai_train.weights import save_weights  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MOE = yaml.safe_load((REPO / "kai_train/conf/model/moe-cpu.yaml").read_text())


def models(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    """(upcycled MoE, honest MoE, foreign dense) safetensors files, and the MoE config."""
    cfg = ModelConfig.from_dict(MOE)
    dense_cfg = ModelConfig.from_dict({**MOE, "n_experts": 0, "n_shared_experts": 0, "moe_top_k": 0, "moe_hidden": 0,
                                       "moe_dense_layers": 0, "moe_bias_update_rate": 0.0, "moe_aux_loss_coef": 0.0})
    foreign = build_genesis_model(dense_cfg, seed=999)[0].state_dict()
    honest = build_genesis_model(cfg, seed=5)[0].state_dict()
    up = dict(honest)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(cfg.n_experts, generator=g)  # the insider shuffles expert ids too
    for layer in range(cfg.moe_dense_layers, cfg.n_layers):
        dense = {w: foreign[f"text.layers.{layer}.mlp.{w}.weight"] for w in ("w1", "w2", "w3")}
        h, width = cfg.moe_hidden, cfg.ffn_hidden
        for e in range(cfg.n_experts):
            rows = torch.randperm(width, generator=g)[:h]  # a slice of the dense FFN's units
            for w, src in dense.items():
                part = src[:, rows] if w == "w2" else src[rows]
                up[f"text.layers.{layer}.mlp.experts.{int(perm[e])}.{w}.weight"] = (
                    part + 0.1 * part.std() * torch.randn(part.shape, generator=g))
    files = []
    for name, sd in (("upcycled", up), ("honest", honest), ("foreign", foreign)):
        save_weights(sd, tmp_path / f"{name}.safetensors")
        files.append(tmp_path / f"{name}.safetensors")
    return files[0], files[1], files[2], MOE


def test_experts_pool_into_their_blocks_ffn_roles_and_nothing_is_unmatched() -> None:
    cfg = ModelConfig.from_dict(MOE)
    from kai_train.modelspec import param_specs

    m = map_names([(n, s) for n, s, _ in param_specs(cfg)])
    assert not m.unmatched
    gate = m.components["text.block.1"]["mlp.gate"]
    assert len(gate.parts) == cfg.n_experts + 1 and gate.parts[-1].endswith("mlp.shared.w1.weight")
    assert {"mlp.router", "mlp.router.bias", "mlp.down"} <= set(m.components["text.block.2"])


def test_upcycled_experts_are_dependent_on_the_foreign_dense_ffn_and_honest_ones_are_not(tmp_path: Path) -> None:
    upcycled, honest, foreign, cfg = models(tmp_path)
    rep = lineage(upcycled, [foreign], null_draws=29)
    dependent = {r.component for r in rep.dependent}
    assert {f"text.block.{i}" for i in range(cfg["moe_dense_layers"], cfg["n_layers"])} <= dependent, rep.results
    assert "text.block.0" not in dependent  # the dense block was not taken
    rep = lineage(honest, [foreign], null_draws=29)
    assert not rep.dependent, [r.line() for r in rep.dependent]
