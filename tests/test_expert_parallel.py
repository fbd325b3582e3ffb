"""Expert parallelism's layout rules (kai_train.expert_parallel) and checkpoint ownership: which
ranks hold which experts, which layouts are refused and why, and that a checkpoint's owner of each
expert tensor is a rank that holds it. The trained runs are in tests/test_moe_training.py."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed", reason="the train extra; not on the evaluator's light install")

from kai_train import expert_parallel as xp
from kai_train.checkpoint import assign
from kai_train.engine import canonical_shapes
from kai_train.sizing import load_preset


def test_ranks_hold_contiguous_expert_slices_in_deepspeeds_group_order() -> None:
    cfg = load_preset("moe-cpu")  # 16 experts
    assert xp.held(cfg, 1, 3) is None
    assert [xp.held(cfg, 2, r) for r in range(4)] == [range(0, 8), range(8, 16), range(0, 8), range(8, 16)]
    assert xp.held(cfg, 4, 6) == range(8, 12)
    assert xp.holders("text.layers.1.mlp.experts.9.w1.weight", cfg, 2, 4) == [1, 3]
    assert xp.holders("text.layers.1.mlp.router.weight", cfg, 2, 4) == [0, 1, 2, 3]
    assert xp.holders("text.layers.1.mlp.shared.w1.weight", cfg, 2, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(("ep", "world", "zero", "words"), [
    (3, 3, 2, "does not divide model.n_experts=16"),
    (4, 2, 2, "does not divide the world size 2"),
    (2, 2, 3, "ZeRO-3"),
    (0, 2, 2, "expected a whole number"),
])
def test_layouts_that_cannot_split_the_experts_are_refused_by_name(ep: int, world: int, zero: int, words: str) -> None:
    why = xp.problem(load_preset("moe-cpu"), ep, world, zero)
    assert why is not None and f"train.expert_parallel={ep}" in why and words in why


def test_a_dense_model_cannot_split_experts() -> None:
    assert "no routed experts" in (xp.problem(load_preset("tiny"), 2, 2, 2) or "")
    assert xp.problem(load_preset("tiny"), 1, 2, 3) is None


@pytest.mark.parametrize(("ep", "world"), [(2, 2), (2, 4), (4, 4)])
def test_every_expert_tensor_is_owned_by_a_rank_that_holds_it(ep: int, world: int) -> None:
    import math

    cfg = load_preset("moe-cpu")
    sizes = {n: math.prod(s) for n, s in canonical_shapes(cfg).items()}
    owner = assign(sizes, world, {n: xp.holders(n, cfg, ep, world) for n in sizes})
    assert set(owner) == set(sizes)
    experts = [n for n in sizes if ".experts." in n]
    assert len(experts) == 2 * 16 * 3  # two MoE layers, 16 experts, w1/w2/w3
    for n in experts:
        assert owner[n] in xp.holders(n, cfg, ep, world), n
    load = [sum(sizes[n] for n in owner if owner[n] == r) for r in range(world)]
    assert max(load) < 1.5 * min(load)  # still balanced by bytes
    assert assign(sizes, world) == assign(sizes, world, {n: list(range(world)) for n in sizes})
