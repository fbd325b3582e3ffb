"""The "kai-init/v2" genesis recipe: numpy (kai_train.initspec, torch-free) and torch
(kai_train.init.init_slice) agree bit for bit on every preset's tensors and on any slice; the
torch-free parameter list equals the torch model's; statistics follow the rule; the deriver runs
without torch; the verifier fails a tampered genesis, refuses an over-budget one and does no
derivation work after a signature failure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
import torch
import yaml
from bundlefactory import make_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from attest.verify.checks.model import DERIVERS, check_genesis
from attest.digest import merkle_root
from attest.verify.policy import Policy
from attest.signing import keygen
from attest.verify import check_signatures, verify_bundle
from kai_train import init, initspec
from kai_train.genesis import recipe as genesis_recipe
from kai_train.init import build_genesis_model, init_slice, tensor_specs
from kai_train.model import ModelConfig
from kai_train.modelspec import param_count, param_specs
from kai_train.weights import state_dict_leaves

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "kai_train/conf/model").glob("*.yaml"))
BIG = {"3b", "7b", "13b", "moe-100b", "moe-236b", "moe-519b"}  # seconds each on 2 cores: in the full suite, not the quick tier
# The unit tests' config and two odd ones: GQA off, many encoder layers, widths not powers of two.
TEST_CONFIGS = {
    "default": ModelConfig(),
    "mha": ModelConfig(n_kv_heads=4, vision_layers=3, speech_layers=2, ffn_hidden=100),
    "odd": ModelConfig(vocab_size=97, dim=48, n_heads=6, n_kv_heads=3, vision_dim=36, vision_heads=3, speech_dim=40,
                       speech_heads=5, image_size=28, patch_size=7, n_mels=13, audio_samples=3000),
}


def preset(path: Path) -> ModelConfig:
    return ModelConfig.from_dict(yaml.safe_load(path.read_text()))


def np_slice(seed: int, name: str, shape: tuple[int, ...], rule: str, a: int, b: int, chunk: int = initspec.CHUNK) -> np.ndarray:
    parts = list(initspec.generate(seed, name, shape, rule, a, b, chunk=chunk))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def same_bits(x: np.ndarray, y: torch.Tensor) -> bool:
    return x.dtype == np.float32 and np.array_equal(x.view(np.uint32), y.cpu().numpy().view(np.uint32))


# ------------------------------------------------------------------ the parameter list


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in BIG else p for p in PRESETS],
                         ids=lambda p: p.stem)
def test_param_specs_equal_the_torch_model_for_every_preset(path: Path) -> None:
    cfg = preset(path)
    assert param_specs(cfg) == tensor_specs(cfg)


@pytest.mark.parametrize("name", sorted(TEST_CONFIGS))
def test_param_specs_equal_the_torch_model_for_test_configs(name: str) -> None:
    cfg = TEST_CONFIGS[name]
    assert param_specs(cfg) == tensor_specs(cfg)


def test_param_count_of_the_7b_preset_is_the_documented_one() -> None:
    assert param_count(preset(REPO / "kai_train/conf/model/7b.yaml")) == 8_484_998_656  # kai_train/conf/model/7b.yaml's header


# ------------------------------------------------------------------ numpy == torch, bit for bit


def slices_of(numel: int, chunk: int) -> list[tuple[int, int]]:
    """Small slices at the boundaries that matter: start, chunk edges, odd offsets, the end, empty."""
    out = [(0, min(numel, 257)), (numel - 1, numel), (numel, numel), (0, 0), (numel // 2, numel // 2)]
    if numel > chunk + 3:
        out += [(chunk - 3, chunk + 3), (chunk, chunk + 1), (chunk - 1, chunk)]
    if numel > 2 * chunk + 7:
        out += [(chunk - 5, 2 * chunk + 7)]  # spans two chunk edges
    if numel > 1000:
        out += [(333, 1000), (numel - 999, numel)]
    return out


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in BIG else p for p in PRESETS],
                         ids=lambda p: p.stem)
def test_numpy_and_torch_agree_on_every_tensor_of_every_preset(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks on both sides put chunk edges inside the slices without generating big tensors.
    monkeypatch.setattr(init, "SLICE_CHUNK_CPU", 64)
    cfg = preset(path)
    specs = param_specs(cfg)
    assert {r for _, _, r in specs} >= {"ones", "zeros", "normal:0.02"}
    # routed experts: the first, second and last of each layer (the others differ only by the id in
    # their name, which every tensor's stream already covers): thousands of tensors fewer at 519B
    edge = {0, 1, cfg.n_experts - 1}
    specs = [s for s in specs if ".mlp.experts." not in s[0] or int(s[0].split(".mlp.experts.")[1].split(".")[0]) in edge]
    for name, shape, rule in specs:
        numel = math.prod(shape)
        for a, b in slices_of(numel, 100):
            x = np_slice(11, name, shape, rule, a, b, chunk=100)
            assert x.shape == (b - a,), (name, a, b)
            assert same_bits(x, init_slice(11, name, shape, rule, a, b)), (path.stem, name, a, b)


def test_numpy_and_torch_agree_with_default_chunks_and_the_reference_formula() -> None:
    shape, rule = (1100, 1000), "normal:0.02"  # > initspec.CHUNK and > 16 torch CPU chunks
    x = np_slice(5, "w", shape, rule, 0, 1_100_000)
    assert same_bits(x, init_slice(5, "w", shape, rule))
    for i in (0, 1, 65535, 65536, initspec.CHUNK - 1, initspec.CHUNK, 1_099_999):
        assert x[i] == np.float32(initspec.element(5, "w", shape, rule, i)), i


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**63), name=st.text(min_size=1, max_size=12), rows=st.integers(1, 3000),
       cols=st.integers(1, 3000), std=st.floats(1e-6, 10.0), data=st.data())
def test_any_slice_is_the_same_in_numpy_torch_and_the_reference(seed: int, name: str, rows: int, cols: int, std: float,
                                                                  data: st.DataObject) -> None:
    shape, rule = (rows, cols), f"normal:{std!r}"
    numel = rows * cols
    a = data.draw(st.integers(0, numel))
    b = data.draw(st.integers(a, min(numel, a + 300)))
    chunk = data.draw(st.integers(1, 512))
    x = np_slice(seed, name, shape, rule, a, b, chunk=chunk)
    assert same_bits(x, init_slice(seed, name, shape, rule, a, b))
    # a slice is the same elements as in the whole tensor's stream, and each is the formula's value
    for i in range(a, b, max(1, (b - a) // 5)):
        assert x[i - a] == np.float32(initspec.element(seed, name, shape, rule, i))


def test_indices_beyond_2_to_the_32() -> None:
    shape, rule = (1 << 17, 1 << 16), "normal:0.01"  # 2^33 elements, never generated whole
    edge = 1 << 32
    for a, b in [(edge - 5, edge + 7), (edge, edge + 3), (edge - 1, edge), ((1 << 33) - 4, 1 << 33)]:
        x = np_slice(3, "big", shape, rule, a, b, chunk=4)
        assert same_bits(x, init_slice(3, "big", shape, rule, a, b)), (a, b)
        assert [float(v) for v in x] == [initspec.element(3, "big", shape, rule, i) for i in range(a, b)]
    # the high word changes the values: element 2^32 + i is not element i
    assert not np.array_equal(np_slice(3, "big", shape, rule, edge, edge + 64), np_slice(3, "big", shape, rule, 0, 64))


def test_the_generator_matches_pinned_values() -> None:
    """The specification's own numbers (docs/bundle-format.md): a change to the generator breaks
    every recorded v2 genesis, so it must fail here first."""
    assert initspec.mix32(0) == 0 and initspec.mix32(1) == 0xED345605
    assert initspec.tensor_key(0, "w", (2, 3), "normal:0.02") == (0x70A6504A, 0x4854BD6C)
    vals = np_slice(0, "w", (2, 3), "normal:0.02", 0, 6)
    assert [f"{v:.9g}" for v in vals] == PINNED


PINNED = ["-0.0186419673", "0.0124707036", "-0.0229736324", "-0.00281829829", "-0.00949279778", "-0.000708618143"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the slice API is also run on CPU above)")
def test_cuda_slices_equal_numpy() -> None:
    for shape, a, b in [((4096, 4096), 0, 1 << 24), ((1 << 17, 1 << 16), (1 << 32) - 1000, (1 << 32) + 1000)]:
        x = np_slice(9, "w", shape, "normal:0.02", a, b)
        assert same_bits(x, init_slice(9, "w", shape, "normal:0.02", a, b, device="cuda"))


def test_slice_bounds_and_rules_are_checked() -> None:
    with pytest.raises(ValueError, match="outside tensor 'w'"):
        list(initspec.generate(0, "w", (4,), "normal:0.02", 2, 5))
    with pytest.raises(ValueError, match="outside tensor 'w'"):
        init_slice(0, "w", (4,), "normal:0.02", 3, 2)
    for bad in ("uniform:0.1", "normal:abc", "normal:nan", "normal:-1"):
        with pytest.raises(ValueError, match="'w'"):
            list(initspec.generate(0, "w", (4,), bad))


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("rule, std", [("normal:0.02", 0.02), ("normal:0.0025", 0.0025)])
def test_v2_statistics_follow_the_rule(rule: str, std: float) -> None:
    x = np_slice(1, "w", (1024, 1024), rule, 0, 1 << 20).astype(np.float64)
    assert abs(x.mean()) < 4 * std / 1024  # 4 standard errors
    assert abs(x.std() / std - 1) < 0.01
    assert abs(((x / std) ** 4).mean() - 2.9) < 0.03  # Irwin-Hall(12): kurtosis 3 - 6/60
    assert np.abs(x).max() <= 6 * std
    # adjacent elements and the two halves of a row are uncorrelated
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.005
    assert np.unique(x).size > 100_000


def test_ones_zeros_and_different_names_or_seeds() -> None:
    assert np.all(np_slice(0, "n", (5, 7), "ones", 3, 30) == 1)
    assert np.all(np_slice(0, "b", (5, 7), "zeros", 0, 35) == 0)
    a = np_slice(0, "w", (64, 64), "normal:0.02", 0, 4096)
    for other in (np_slice(1, "w", (64, 64), "normal:0.02", 0, 4096), np_slice(0, "v", (64, 64), "normal:0.02", 0, 4096),
                  np_slice(0, "w", (32, 128), "normal:0.02", 0, 4096)):
        assert np.mean(a == other) < 0.01


# ------------------------------------------------------------------ model and deriver


def test_built_model_equals_the_numpy_derivation() -> None:
    cfg = ModelConfig()
    model, _ = build_genesis_model(cfg, 13)
    assert init.RECIPE == "kai-init/v2"
    assert dict(initspec.derive(genesis_recipe(cfg, 13))) == state_dict_leaves(model.state_dict())


DERIVE_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from attest.digest import merkle_root
from kai_train.initspec import derive
print(merkle_root(dict(derive(json.loads(sys.argv[1])))))
assert "torch" not in sys.modules or sys.modules["torch"] is None
"""


@pytest.mark.light
def test_deriver_runs_without_torch() -> None:
    cfg = ModelConfig()
    rec = genesis_recipe(cfg, 21)
    assert rec["deriver"] in DERIVERS
    p = subprocess.run([sys.executable, "-c", DERIVE_WITHOUT_TORCH, json.dumps(rec)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    model, _ = build_genesis_model(cfg, 21)
    assert p.stdout.strip() == merkle_root(state_dict_leaves(model.state_dict()))


def v2_bundle(tmp_path: Path, tamper: str | None = None) -> tuple[Path, Path]:
    """A synthetic bundle whose genesis statement is a kai-init/v2 genesis of the tiny model (seed 7,
    the run config's), optionally with one tensor's recorded digest (and the root) changed."""
    cfg = ModelConfig()

    def mutate(st: list[dict]) -> None:
        g = next(s for s in st if s["predicate"].get("recipe"))
        leaves = dict(initspec.derive(genesis_recipe(cfg, 7)))
        if tamper:
            leaves[tamper] = "0" * 64  # an insider's genesis: one tensor differs, the statement re-signed
        g["predicate"].update(recipe=genesis_recipe(cfg, 7), weights_root=merkle_root(leaves),
                              tensors={n: {"digest": d} for n, d in leaves.items()})

    return make_bundle(tmp_path / "b", steps=(2,), release=False, mutate=mutate)


def genesis_finding(root: Path, trust: Path, policy: Policy | None = None):
    report = verify_bundle(root, trust=[str(trust)], policy=policy, checks=[check_signatures, check_genesis])
    (g,) = [f for f in report.findings if f.check == "genesis"]
    return g


def test_verifier_accepts_a_v2_genesis_and_fails_one_tampered_tensor(tmp_path: Path) -> None:
    root, priv = v2_bundle(tmp_path / "honest")
    pub = priv.parent / "signing-key.pub.pem"
    g = genesis_finding(root, pub)
    assert g.ok and "re-derived" in g.detail, g
    root, priv = v2_bundle(tmp_path / "bad", tamper="text.layers.1.mlp.w2.weight")
    g = genesis_finding(root, priv.parent / "signing-key.pub.pem")
    assert not g.ok and not g.skipped
    assert "1 of" in g.detail and "text.layers.1.mlp.w2.weight" in g.detail


def test_verifier_refuses_a_genesis_above_the_policy_budget(tmp_path: Path) -> None:
    root, priv = v2_bundle(tmp_path)
    policy = Policy()
    policy.limits["max_genesis_params"] = 1000
    g = genesis_finding(root, priv.parent / "signing-key.pub.pem", policy)
    assert not g.ok and not g.skipped
    assert "max_genesis_params" in g.expected and f"{param_count(ModelConfig()):,}" == g.found


def test_no_derivation_after_a_signature_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = v2_bundle(tmp_path)
    keygen(tmp_path / "other")

    def no_derive(rec: dict) -> None:
        raise AssertionError("derivation ran although the signature check failed")

    monkeypatch.setattr(initspec, "derive", no_derive)
    g = genesis_finding(root, tmp_path / "other/signing-key.pub.pem")
    # held back with the other bulk checks; the verdict fails on the signature itself
    assert g.skipped and "signature failed" in g.detail and "unauthenticated input" in g.detail


def test_a_v1_bundle_still_re_derives_where_torch_exists(tmp_path: Path) -> None:
    cfg = ModelConfig()
    model, _ = build_genesis_model(cfg, 7, init.RECIPE_V1)
    leaves = state_dict_leaves(model.state_dict())
    rec = genesis_recipe(cfg, 7, init.RECIPE_V1)
    assert rec["deriver"] == "kai_train.genesis:derive"

    def mutate(st: list[dict]) -> None:
        g = next(s for s in st if s["predicate"].get("recipe"))
        g["predicate"].update(recipe=rec, weights_root=merkle_root(leaves), tensors={n: {"digest": d} for n, d in leaves.items()})

    root, priv = make_bundle(tmp_path / "b", steps=(2,), release=False, mutate=mutate)
    g = genesis_finding(root, priv.parent / "signing-key.pub.pem")
    assert g.ok, g
    assert leaves != state_dict_leaves(build_genesis_model(cfg, 7)[0].state_dict())  # v2 differs from v1



@pytest.mark.parametrize("change, why", [({"n_layers": 10**9}, "n_layers=1000000000 is outside"),
                                         ({"ffn_hidden": 1 << 24, "dim": 1 << 16}, "max_genesis_params"),
                                         ({"vocab_size": 10**12}, "vocab_size=1000000000000 is outside"),
                                         ({"vocab_size": -10**6, "ffn_hidden": 10**15}, "vocab_size=-1000000 is outside"),
                                         ({"n_heads": 0}, "n_heads=0 is outside"),
                                         ({"norm_eps": -1.0}, "must be a positive finite number"),
                                         ({"dim": "64"}, "must be a number")])
def test_a_hostile_model_config_fails_fast_with_one_line(tmp_path: Path, change: dict, why: str) -> None:
    root, priv = make_bundle(tmp_path / "b", steps=(2,), release=False, mutate=lambda st: next(
        s for s in st if s["predicate"].get("recipe"))["predicate"].update(
        recipe={**genesis_recipe(ModelConfig(), 7), "model": {**ModelConfig().to_dict(), **change}}))
    g = genesis_finding(root, priv.parent / "signing-key.pub.pem")
    assert not g.ok and why in g.expected + g.found + g.detail, g


def test_a_resumed_run_keeps_the_recipe_its_chain_records(tmp_path: Path) -> None:
    from kai_train.genesis import recorded_recipe

    for name in (init.RECIPE_V1, init.RECIPE_V2):
        root, _ = make_bundle(tmp_path / name.replace("/", "-"), steps=(), release=False, mutate=lambda st: next(
            s for s in st if s["predicate"].get("recipe"))["predicate"].update(recipe=genesis_recipe(ModelConfig(), 7, name)))
        assert recorded_recipe(root / "chain.jsonl") == name
    root, _ = make_bundle(tmp_path / "other", steps=(), release=False)  # the factory's own "test-init" recipe
    with pytest.raises(ValueError, match="chain.jsonl: genesis recipe 'test-init'"):
        recorded_recipe(root / "chain.jsonl")
