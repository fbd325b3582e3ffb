"""The mixture-of-experts preset trained for real: 2 CPU ranks under torchrun with DeepSpeed ZeRO-2 and
the experts split over both (expert parallelism 2), resumed on 1 rank (every expert on it), bundled
and verified with every segment replayed (routing digests included); its tensor names and genesis
root independent of the layout (expert parallelism 1 and 2, world 1, 2 and 4); an insider who upcycles a foreign dense FFN
into the experts is caught by genesis; one who re-signs a step's routing digest is named by step and
layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="the train extra; not on the evaluator's light install")

from attest.chain import read_chain
from attest.cli import main
from conftest import TRAIN_ARGS, built_once, kai_attest, must, prepared_data, resign, torchrun, verify_trusted

pytestmark = pytest.mark.slow

MOE = ["model=moe-cpu", "wandb.mode=disabled"]


def predicates(run_dir: Path, kind: str) -> list[dict]:
    entries, _ = read_chain(run_dir / "chain.jsonl")
    return [e.predicate for e in entries if e.kind == kind]


@pytest.fixture(scope="module")
def moe_run(data_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """moe-cpu: steps 1-2 on 2 ranks (ZeRO-2, experts split over both), steps 3-4 resumed on 1 rank; bundled."""
    def train(folder: Path) -> None:
        run_dir = prepared_data(folder / "run", data_run)
        must(torchrun(run_dir, 2, "deepspeed=zero2", *TRAIN_ARGS, *MOE, "train.expert_parallel=2", "train.stop_at=2"))
        p = must(torchrun(run_dir, 1, "deepspeed=zero2", *TRAIN_ARGS, *MOE))
        assert "resumed at step 2" in p.stdout
        must(kai_attest("bundle", str(run_dir)))

    return built_once(tmp_path_factory, "moe", train) / "run"


def test_moe_run_on_two_ranks_resumed_on_one_verifies_with_every_segment_replayed(moe_run: Path) -> None:
    p = verify_trusted(moe_run / "bundle", "--replay", "all")
    assert p.returncode == 0, p.stdout + p.stderr
    assert sum(line.startswith("ok    replay") for line in p.stdout.splitlines()) == 2, p.stdout
    for check in ("genesis", "trajectory", "release", "weights-digest"):
        assert any(line.startswith("ok") and check in line for line in p.stdout.splitlines()), p.stdout
    ckpts = predicates(moe_run, "checkpoint")
    assert [c["data_consumed"]["sampler"]["world_size"] for c in ckpts] == [2, 1]
    assert [c["data_consumed"]["sampler"].get("expert_parallel") for c in ckpts] == [2, None]
    assert "experts split over 2 ranks" in next(x for x in p.stdout.splitlines() if "segment 0 reproduced" in x)
    # each statement signs, per step of its segment, one routing digest per MoE layer, and replay reproduced them
    for c in ckpts:
        r = c["routing"]
        assert r["algorithm"] == "kai-routing/v1" and r["layers"] == ["text.layers.1.mlp", "text.layers.2.mlp"]
        assert len(r["steps"]) == len(c["step_losses"]) == 2 and all(len(s) == 2 for s in r["steps"])
    digests = [d for c in ckpts for s in c["routing"]["steps"] for d in s]
    assert len(set(digests)) == len(digests)  # other rows, other weights: no two steps or layers route alike
    replayed = [line for line in p.stdout.splitlines() if line.startswith("ok    replay")]
    assert all("routing per MoE layer" in line for line in replayed), replayed


def test_router_selection_bias_is_signed_training_state_that_moves(moe_run: Path) -> None:
    from kai_train.checkpoint import SignedTensors

    for step in (2, 4):
        w = SignedTensors(sorted((moe_run / f"checkpoints/step-{step:06d}").glob("model-*.safetensors")))
        bias = w["text.layers.1.mlp.router.bias"]
        assert bool(bias.any()), "auxiliary-loss-free balancing moved the bias"
        # each step moves every entry by a multiple of the rate (sign of the load error, or 0)
        assert float(bias.abs().max()) <= step * 0.001 + 1e-6
    assert "text.layers.1.mlp.router.bias" in predicates(moe_run, "genesis")[0]["tensors"]


def test_each_expert_parallel_rank_writes_and_hashes_only_the_experts_it_holds(moe_run: Path) -> None:
    import re

    from safetensors import safe_open

    for step in (0, 2):  # the genesis and the checkpoint written with the experts split over 2 ranks
        for rank, held in ((0, range(0, 8)), (1, range(8, 16))):
            for kind in ("model", "optimizer") if step else ("model",):
                with safe_open(str(moe_run / f"checkpoints/step-{step:06d}/{kind}-{rank:05d}-of-00002.safetensors"),
                               "pt") as f:
                    names = list(f.keys())
                experts = {int(m.group(1)) for n in names if (m := re.search(r"\.experts\.(\d+)\.", n))}
                assert experts and experts <= set(held), (step, rank, kind, sorted(experts))


@pytest.mark.parametrize(("world", "zero", "ep"), [(1, "zero3", 1), (2, "zero3", 1), (4, "zero1", 2)])
def test_tensor_names_and_genesis_root_do_not_depend_on_world_size_zero_stage_or_expert_parallelism(
        world: int, zero: str, ep: int, moe_run: Path, data_run: Path, tmp_path: Path) -> None:
    from kai_train.checkpoint import SignedTensors

    other = prepared_data(tmp_path / "other", data_run)
    must(torchrun(other, world, f"deepspeed={zero}", "train.steps=2", "train.ckpt_every=2", "train.micro_batch=2",
                  "train.eval_every=2", f"train.expert_parallel={ep}", *MOE))
    (g1,), (g2,) = predicates(moe_run, "genesis"), predicates(other, "genesis")
    assert g1["weights_root"] == g2["weights_root"] and g1["tensors"] == g2["tensors"]
    names = [set(SignedTensors(sorted((r / "checkpoints/step-000002").glob("model-*.safetensors"))))
             for r in (moe_run, other)]  # one shard per rank
    assert names[0] == names[1] == set(g1["tensors"])
    assert {f"text.layers.2.mlp.experts.{e}.w2.weight" for e in range(16)} <= names[0]
    if world * 2 == 2 * 4:  # the same 8 rows per step as moe_run (2 ranks x micro_batch 4), split 4 x 2
        (first, *_), (other_first, *_) = (predicates(r, "checkpoint")[0]["routing"]["steps"] for r in (moe_run, other))
        assert first == other_first, "step 1's routing digests do not depend on the rows' split over ranks"


def test_insider_upcycles_a_foreign_dense_ffn_into_the_experts_and_genesis_names_them(
        moe_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sparse upcycling: every expert starts as a slice of another model's trained dense FFN, noised;
    the insider rewrites genesis and re-signs the whole chain with the real key."""
    import torch
    from safetensors import safe_open

    from attest.digest import sha256_file
    from attest.oms import sign_checkpoint_dir
    from kai_train.checkpoint import SignedTensors
    from kai_train.weights import save_weights, state_dict_root, state_dict_leaves

    b = Path(shutil.copytree(moe_run / "bundle", tmp_path / "bundle"))
    key = moe_run / "keys/signing-key.pem"
    files = sorted((b / "checkpoints/step-000000").glob("model*.safetensors"))
    w0 = dict(SignedTensors(files))
    foreign = {n: t for n, t in SignedTensors(sorted((b / "checkpoints/step-000004").glob("model-*"))).items()}
    dense = {t: foreign[f"text.layers.0.mlp.{t}.weight"] for t in ("w1", "w2", "w3")}  # (172, 64), (64, 172)
    g = torch.Generator().manual_seed(0)
    upcycled = []
    for name in w0:
        if ".mlp.experts." not in name:
            continue
        e, t = int(name.split(".experts.")[1].split(".")[0]), name.split(".")[-2]
        h = w0[name].shape[1] if t == "w2" else w0[name].shape[0]
        rows = torch.arange(e * h, (e + 1) * h) % dense[t].shape[1 if t == "w2" else 0]
        src = dense[t][:, rows] if t == "w2" else dense[t][rows]
        w0[name] = src + 1e-3 * torch.randn(src.shape, generator=g)
        upcycled.append(name)
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
        save_weights({n: w0[n] for n in keys}, f)
    sign_checkpoint_dir(b / "checkpoints/step-000000", key)
    root, leaves = state_dict_root(w0), state_dict_leaves(w0)

    def upcycle(sts: list[dict]) -> None:
        gen = next(s for s in sts if s["predicate"]["kind"] == "genesis")
        for s in gen["subject"]:
            s["digest"]["sha256"] = sha256_file(b / s["name"])
        gen["predicate"]["weights_root"] = root
        for n, t in gen["predicate"]["tensors"].items():
            t["digest"] = leaves[n]
        next(s for s in sts if s["predicate"]["kind"] == "checkpoint")["predicate"]["parent_root"] = root

    resign(b, key, upcycle)
    rc = main(["verify", str(b), "--trust", str(b / "keys/signing-key.pub.pem")])
    out = capsys.readouterr().out
    assert rc == 1, out
    line = next(x for x in out.splitlines() if x.startswith("FAIL  genesis"))
    assert f"{len(upcycled)} of {len(w0)} tensors differ" in line, line
    assert "vision." not in line and "speech." not in line


def test_insider_re_signs_one_steps_routing_digest_of_one_layer_and_replay_names_that_step_and_layer(
        moe_run: Path, tmp_path: Path) -> None:
    """The weights are honest; only the signed routing of step 3 (the first of the last segment) in the
    second MoE layer is replaced. Exact replay reproduces the whole state, so the false commitment
    fails the segment (not undecided) and the finding names step 3, layer 2."""
    import random

    b = Path(shutil.copytree(moe_run / "bundle", tmp_path / "bundle"))

    def reroute(sts: list[dict]) -> None:
        last = [s for s in sts if s["predicate"]["kind"] == "checkpoint"][-1]["predicate"]
        assert last["step"] == 4 and last["routing"]["layers"][1] == "text.layers.2.mlp"
        last["routing"]["steps"][0][1] = "0" * 64

    resign(b, moe_run / "keys/signing-key.pem", reroute)
    # a draw of the last segment only (the last one is always replayed): one replay, not two
    seed = next(s for s in range(100) if random.Random(s).sample(range(2), 1) == [1])
    p = verify_trusted(b, "--replay", "1", "--replay-seed", str(seed))
    assert p.returncode == 1, p.stdout + p.stderr
    fails = [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL  replay"), p.stdout
    assert "segment 1: routing differs first at step 3, layer 2 (text.layers.2.mlp)" in fails[0], fails[0]


def test_moe_export_loads_with_transformers_and_generates_what_kai_train_does(moe_run: Path) -> None:
    import torch
    import transformers

    from kai_train.generate import generate, load_export

    export = moe_run / "export"
    assert not (export / "llama").exists()  # experts have no Llama form: the release records text_export null
    model = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    kai, sp = load_export(export)
    assert kai.cfg.n_experts == 16 and len(kai.moe_layers()) == 2
    ids = torch.tensor([[sp.bos_id(), *sp.encode("a red square")]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, kai(ids))
    out = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    want = generate(kai, sp, "a red square", max_new_tokens=8)
    assert [t for t in out if t != sp.eos_id()][:len(want)] == want
