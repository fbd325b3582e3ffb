"""The mixture-of-experts decoder block: canonical per-expert names, routing and dispatch, the
balancing loss, the selection bias as zero-gradient training state, capacity, and the genesis of
every expert re-derived by name."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import yaml  # noqa: E402

from kai_train.init import build_genesis_model, tensor_specs  # noqa: E402
from kai_train.model import MoE  # noqa: E402
from kai_train.modelspec import ModelConfig, param_specs  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "kai_train/conf/model/moe-cpu.yaml"


def moe_cfg(**over: float) -> ModelConfig:
    return ModelConfig.from_dict({**yaml.safe_load(PRESET.read_text()), **over})


def test_every_routed_expert_is_named_by_layer_global_id_and_tensor() -> None:
    cfg = moe_cfg()
    names = {n for n, _, _ in param_specs(cfg)}
    for layer in range(cfg.moe_dense_layers, cfg.n_layers):
        for e in range(cfg.n_experts):
            for t in ("w1", "w2", "w3"):
                assert f"text.layers.{layer}.mlp.experts.{e}.{t}.weight" in names
        assert {f"text.layers.{layer}.mlp.router.weight", f"text.layers.{layer}.mlp.router.bias",
                f"text.layers.{layer}.mlp.shared.w1.weight"} <= names
    assert "text.layers.0.mlp.w1.weight" in names  # the dense first block
    assert param_specs(cfg) == tensor_specs(cfg)


def test_expert_down_projections_get_the_residual_init_and_the_bias_starts_at_zero() -> None:
    rules = {n: r for n, _, r in param_specs(moe_cfg())}
    assert rules["text.layers.1.mlp.experts.7.w2.weight"] == rules["text.layers.0.mlp.w2.weight"] != "normal:0.02"
    assert rules["text.layers.1.mlp.experts.7.w1.weight"] == "normal:0.02"
    assert rules["text.layers.1.mlp.router.bias"] == "zeros"


def test_dispatch_equals_the_per_token_sum_of_gated_experts() -> None:
    torch.manual_seed(0)
    cfg = moe_cfg()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, cfg.dim)
    y = moe(x)
    xf = x.reshape(-1, cfg.dim)
    _, idx, gates = moe.router(xf)
    want = torch.stack([
        sum(gates[t, s] * moe.experts[str(int(idx[t, s]))](xf[t:t + 1])[0] for s in range(cfg.moe_top_k))
        for t in range(xf.shape[0])]) + moe.shared(xf)
    torch.testing.assert_close(y.reshape(-1, cfg.dim), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(moe(x), y), "dispatch is deterministic"
    assert moe.load.sum() == xf.shape[0] * cfg.moe_top_k


def test_selection_bias_steers_routing_but_not_the_gates_and_gets_a_zero_gradient() -> None:
    torch.manual_seed(1)
    cfg = moe_cfg()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.02)
    x = torch.randn(8, cfg.dim)
    with torch.no_grad():
        moe.router.bias[3] = 10.0  # expert 3 is chosen for every token
    scores, idx, gates = moe.router(x)
    assert bool((idx == 3).any(-1).all())
    chosen = scores.gather(-1, idx)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    out = moe(x.view(1, 8, -1))
    (out.sum() + moe.aux_loss).backward()
    assert moe.router.bias.grad is not None and bool((moe.router.bias.grad == 0).all())
    assert moe.router.weight.grad is not None and bool(moe.router.weight.grad.abs().sum() > 0)


def test_balancing_loss_is_the_switch_form() -> None:
    torch.manual_seed(2)
    cfg = moe_cfg(moe_aux_loss_coef=0.5)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(1, 32, cfg.dim)
    moe(x)
    scores, idx, _ = moe.router(x.view(-1, cfg.dim))
    f = torch.bincount(idx.reshape(-1), minlength=cfg.n_experts).float() / idx.numel()
    want = 0.5 * cfg.n_experts * (f * scores.mean(0)).sum()
    torch.testing.assert_close(moe.aux_loss, want)


def test_capacity_drops_assignments_beyond_it_and_zero_is_dropless() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 64, 64)
    outs = {}
    for cf in (0.0, 0.25):
        torch.manual_seed(4)
        moe = MoE(moe_cfg(moe_capacity_factor=cf, n_shared_experts=0))
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.2)
        with torch.no_grad():
            moe.router.bias[0] = 10.0  # every token picks expert 0: over any capacity below 1
        outs[cf] = moe(x)
    assert not torch.equal(outs[0.0], outs[0.25])
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        moe_cfg(moe_capacity_factor=-1.0)
    with pytest.raises(ValueError, match="moe_top_k"):
        moe_cfg(moe_top_k=9)


def test_genesis_of_each_expert_is_derived_from_its_name_alone() -> None:
    """Experts are not copies of one another (an upcycled init would make them so): each has its own values."""
    cfg = moe_cfg()
    model, _ = build_genesis_model(cfg, seed=5)
    sd = model.state_dict()
    a, b = sd["text.layers.1.mlp.experts.0.w1.weight"], sd["text.layers.1.mlp.experts.1.w1.weight"]
    assert a.shape == b.shape and not torch.equal(a, b)
    again, _ = build_genesis_model(cfg, seed=5)
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in sd.items())
    assert not bool(sd["text.layers.2.mlp.router.bias"].any())


def test_routing_digest_is_sha256_of_each_rows_int32_choices_then_of_the_rows_in_position_order() -> None:
    """kai-routing/v1 recomputed here with hashlib and struct from the router's own choices."""
    import hashlib
    import struct

    from kai_train.routing import row_digests, step_digest

    torch.manual_seed(5)
    cfg = moe_cfg()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    B, S, k = 3, 7, cfg.moe_top_k
    x = torch.randn(B, S, cfg.dim)
    moe(x)
    _, idx, _ = moe.router(x.reshape(-1, cfg.dim))
    assert moe.routing is not None and torch.equal(moe.routing, idx) and moe.routing.shape == (B * S, k)
    rows = [hashlib.sha256(struct.pack(f"<{S * k}i", *idx.view(B, S * k)[b].tolist())).digest() for b in range(B)]
    got = row_digests(moe.routing, B)
    assert got.shape == (B, 32) and [bytes(r) for r in got] == rows
    assert step_digest(got) == hashlib.sha256(b"".join(rows)).hexdigest()
    assert step_digest(got[::-1]) != step_digest(got)  # the order of rows is part of the digest
    flipped = moe.routing.clone()
    flipped[S + 2, 1] = (flipped[S + 2, 1] + 1) % cfg.n_experts  # one choice of one token of row 1
    changed = row_digests(flipped, B)
    assert [bytes(a) == bytes(b) for a, b in zip(changed, got)] == [True, False, True]
    with pytest.raises(ValueError, match="do not split into 2 rows"):
        row_digests(moe.routing, 2)


def test_a_steps_routing_digest_does_not_depend_on_how_its_rows_were_split_into_micro_steps() -> None:
    from kai_train.routing import step_routing

    torch.manual_seed(6)
    layers, rows, seq, k = 2, 8, 5, 4
    choices = torch.randint(0, 16, (layers, rows, seq, k))  # the step's rows in sampler position order

    def split(micro: int) -> list[torch.Tensor]:
        return [choices[:, m:m + micro].reshape(layers, micro * seq, k) for m in range(0, rows, micro)]

    whole = step_routing(split(8), 8, 1, torch.device("cpu"))
    assert len(whole) == layers and whole[0] != whole[1]
    assert step_routing(split(4), 4, 1, torch.device("cpu")) == step_routing(split(2), 2, 1, torch.device("cpu")) == whole
    swapped = split(4)[::-1]  # the same rows in another order: another step
    assert step_routing(swapped, 4, 1, torch.device("cpu")) != whole


def test_the_routing_log_hashes_off_the_step_what_the_step_digest_gives_on_the_spot() -> None:
    from kai_train.routing import RoutingLog, step_routing

    torch.manual_seed(7)
    layers, micro, seq, k, accum = 2, 4, 5, 4, 2
    steps = [[torch.randint(0, 16, (layers, micro * seq, k), dtype=torch.int32) for _ in range(accum)]
             for _ in range(3)]
    log = RoutingLog(micro, 1, torch.device("cpu"))
    for s in steps[:2]:
        log.add(["a", "b"], s)
    names, first = log.segment()
    log.add(["a", "b"], steps[2])
    _, second = log.segment()
    assert log.segment() == (["a", "b"], [])  # a segment begins empty after each call
    log.close()
    want = [step_routing(s, micro, 1, torch.device("cpu")) for s in steps]
    assert names == ["a", "b"] and first == want[:2] and second == want[2:]
    assert first[0] != first[1]


def test_a_hashing_error_reaches_the_training_thread() -> None:
    from kai_train.routing import RoutingLog

    log = RoutingLog(3, 1, torch.device("cpu"))
    log.add(["a"], [torch.zeros(1, 4, 2, dtype=torch.int32)])  # 4 tokens do not split into 3 rows
    with pytest.raises(RuntimeError, match="do not split into 3 rows"):
        log.segment()
    log.close()


def test_a_segments_routing_gathered_a_few_steps_at_a_time_equals_one_gather(tmp_path: Path) -> None:
    """Two gloo ranks: the segment's row digests gathered step by step (GATHER_BYTES tiny) give the
    digests of one gather and of the on-the-spot step digest."""
    import subprocess
    import sys

    from conftest import env, free_port

    script = tmp_path / "gather.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "import kai_train.routing as R\n"
        "dist.init_process_group('gloo'); r = dist.get_rank()\n"
        "g = torch.Generator().manual_seed(r)\n"
        "steps = [[torch.randint(0, 16, (2, 20, 4), generator=g, dtype=torch.int32) for _ in range(2)] for _ in range(5)]\n"
        "def run():\n"
        "    log = R.RoutingLog(4, 2, torch.device('cpu'))\n"
        "    for s in steps: log.add(['a', 'b'], s)\n"
        "    out = log.segment(); log.close(); return out\n"
        "whole = run(); R.GATHER_BYTES = 1; chunked = run()\n"
        "ref = [R.step_routing(s, 4, 2, torch.device('cpu')) for s in steps]\n"
        "assert whole == chunked and whole[1] == ref and len(set(d for s in ref for d in s)) == 10, (whole, chunked)\n"
        "dist.barrier(); dist.destroy_process_group()\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script)], env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
