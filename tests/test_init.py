"""Tests for kai_train.init and kai_train.weights: seeded init is a pure function of
(seed, name, shape, rule), genesis re-derivation matches the built model, and in-memory digests
match the digests of saved safetensors files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
import torch

from attest.digest import merkle_root, safetensors_root, tensor_digest
from kai_train.init import (
    apply_init, build_genesis_model, genesis_tensors, init_rules, init_tensor, tensor_specs,
)
from kai_train.model import ModelConfig, MultimodalLM, VisionEncoder
from kai_train.weights import save_weights, state_dict_leaves, state_dict_root

CFG = ModelConfig()


def genesis_root(seed: int) -> str:
    return state_dict_root(build_genesis_model(CFG, seed)[0].state_dict())


def test_same_seed_gives_identical_root_in_two_constructions() -> None:
    assert genesis_root(7) == genesis_root(7)


def test_different_seed_changes_root_and_every_normal_tensor() -> None:
    a, rules = build_genesis_model(CFG, 1)
    b, _ = build_genesis_model(CFG, 2)
    assert state_dict_root(a.state_dict()) != state_dict_root(b.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    normal = [n for n, r in rules.items() if r.startswith("normal:")]
    assert len(normal) > 10
    for n in normal:
        assert not torch.equal(sa[n], sb[n]), n


def test_init_ignores_global_rng_state() -> None:
    torch.manual_seed(0)
    a = genesis_root(3)
    torch.manual_seed(12345)
    torch.randn(1000)
    assert genesis_root(3) == a


def test_init_ignores_construction_and_registration_order() -> None:
    ref = build_genesis_model(CFG, 4)[0]
    # Build another model, then rebuild its image encoder: different global-RNG consumption and
    # a different named_parameters() order (vision now comes after text).
    torch.manual_seed(99)
    other = MultimodalLM(CFG)
    del other.vision
    other.vision = VisionEncoder(CFG)
    order = [n for n, _ in other.named_parameters()]
    assert order != [n for n, _ in ref.named_parameters()] and order[-1].startswith("vision.")
    apply_init(other, 4)
    assert state_dict_leaves(other.state_dict()) == state_dict_leaves(ref.state_dict())


def test_apply_init_writes_through_any_param_dtype() -> None:
    ref = build_genesis_model(CFG, 5)[0]
    m = MultimodalLM(CFG).to(torch.bfloat16)
    apply_init(m, 5)
    sd_ref = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    assert state_dict_root(m.state_dict()) == state_dict_root(sd_ref)


@pytest.mark.parametrize("dtype, torch_dtype", [("F32", torch.float32), ("BF16", torch.bfloat16)])
def test_genesis_tensors_root_equals_built_model_root(dtype: str, torch_dtype: torch.dtype) -> None:
    leaves = {
        name: tensor_digest(name, dt, shape, [data])
        for name, dt, shape, data in genesis_tensors(CFG, 6, dtype)
    }
    model = build_genesis_model(CFG, 6)[0]
    sd = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
    assert merkle_root(leaves) == state_dict_root(sd)


def test_tensor_specs_match_the_real_model() -> None:
    model = MultimodalLM(CFG)
    specs = tensor_specs(CFG)
    assert [(n, s) for n, s, _ in specs] == sorted(
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    )
    assert {n: r for n, _, r in specs} == init_rules(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_root_equals_safetensors_root_of_saved_file(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {k: v.to(dtype) for k, v in build_genesis_model(CFG, 8)[0].state_dict().items()}
    sd["step"] = torch.tensor(41, dtype=torch.int64)  # 0-dim and integer tensors digest too
    path = tmp_path / "w.safetensors"
    save_weights(sd, path)
    assert safetensors_root([path]) == state_dict_root(sd)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_state_dict_root_sees_a_single_flipped_value() -> None:
    sd = build_genesis_model(CFG, 9)[0].state_dict()
    root = state_dict_root(sd)
    sd["text.norm.weight"][3] = 1.0000001
    assert state_dict_root(sd) != root


def test_norm_gains_are_exactly_one_and_biases_zero() -> None:
    model, rules = build_genesis_model(CFG, 10)
    params = dict(model.named_parameters())
    norms = [n for n in params if n.endswith("norm.weight")]
    biases = [n for n in params if n.endswith(".bias")]
    assert norms and biases
    for n in norms:
        assert rules[n] == "ones" and bool((params[n] == 1).all()), n
    for n in biases:
        assert rules[n] == "zeros" and bool((params[n] == 0).all()), n


def test_residual_output_projections_are_scaled_by_stack_depth() -> None:
    rules = init_rules(MultimodalLM(CFG))
    assert rules["text.layers.1.attn.wo.weight"] == "normal:0.01"  # 0.02 / sqrt(2 * 2)
    assert rules["text.layers.0.mlp.w2.weight"] == "normal:0.01"
    assert rules["vision.layers.0.attn.wo.weight"] == f"normal:{0.02 / 2**0.5!r}"  # 1 layer
    assert rules["text.layers.0.attn.wq.weight"] == "normal:0.02"
    assert rules["absent_image"] == rules["speech.pos_emb"] == rules["speech.conv1.weight"] == "normal:0.02"


def test_init_tensor_std_follows_the_rule() -> None:
    x = init_tensor(0, "w", (256, 256), "normal:0.01")
    assert x.dtype == torch.float32 and abs(x.std().item() - 0.01) < 0.0005
    assert torch.equal(x, init_tensor(0, "w", (256, 256), "normal:0.01"))
    assert not torch.equal(x, init_tensor(0, "v", (256, 256), "normal:0.01"))  # name is in the seed


def test_init_tensor_bits_do_not_depend_on_cpu_vector_kernels() -> None:
    # float32 randn takes an AVX2 path whose bits differ from the scalar one; a verifier on
    # another CPU must still re-derive genesis, so compare against scalar kernels in a subprocess.
    code = (
        "import hashlib; from kai_train.init import init_tensor; "
        "print(hashlib.sha256(init_tensor(3, 'w', (64, 64), 'normal:0.02').numpy().tobytes()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(init_tensor(3, "w", (64, 64), "normal:0.02").numpy().tobytes()).hexdigest()
    assert out.stdout.strip() == here


def test_unknown_rule_raises() -> None:
    with pytest.raises(ValueError, match="unknown init rule"):
        init_tensor(0, "w", (2, 2), "uniform:0.1")
    with pytest.raises(ValueError, match="not a number"):
        init_tensor(0, "w", (2, 2), "normal:abc")
