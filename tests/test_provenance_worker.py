"""Checkpoints recorded off the training loop: every rank's share written and hashed where it lives,
one statement over all shares, the background worker's order and its equivalence with recording in
the loop, a canonical root that does not depend on the world size, a worker failure that surfaces,
and the shape checks of the per-checkpoint fields (grad norm, RNG state digest, environment)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("model_signing", reason="model-signing is not installed")

from attest.chain import read_chain  # noqa: E402
from attest.digest import PARALLEL_BYTES, DigestError, hash_safetensors, safetensors_leaves, sha256_file  # noqa: E402
from attest.oms import cross_check  # noqa: E402
from attest.signing import PemSigner, PublicKeyVerifier, keygen  # noqa: E402
from attest.statements import validate_statement  # noqa: E402
from attest.layout import checkpoint_shard as shard_name  # noqa: E402
from kai_train.checkpoint import assign, write_share  # noqa: E402
from kai_train.provenance import Provenance, ProvenanceError, environment, rng_state_digest  # noqa: E402
from kai_train.weights import save_weights, state_dict_root  # noqa: E402

CONSUMED = {"shards": [], "holdout_every": 0,
            "sampler": {"seed": 1, "num_rows": 8, "world_size": 2, "micro_batch": 1, "epoch_start": 0, "epoch_end": 0,
                        "position_start": 0, "position_end": 2}}


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"tok.weight": torch.randn(96, 32, generator=g), "norm.weight": torch.rand(32, generator=g),
            "head.bias": torch.zeros(7, dtype=torch.bfloat16)}


def moments(seed: int) -> dict[str, torch.Tensor]:
    return {f"{k}/{n}": t.float() * (2 if k == "exp_avg" else 3) for n, t in weights(seed + 100).items()
            for k in ("exp_avg", "exp_avg_sq")}


@pytest.fixture
def key(tmp_path: Path) -> tuple[PemSigner, Path]:
    priv, pub = keygen(tmp_path / "keys")
    return PemSigner.from_file(priv), pub


def write_shares(run_dir: Path, step: int, world: int) -> None:
    """What each of `world` ranks writes for checkpoint `step`: its tensors and their moments (the
    genesis, step 0: weights only)."""
    w, m = weights(step), moments(step)
    owner = assign({n: t.numel() for n, t in w.items()}, world)
    for r in range(world):
        mine = [n for n in w if owner[n] == r]
        write_share(run_dir, step, r, world, {n: w[n] for n in mine},
                    {f"{k}/{n}": m[f"{k}/{n}"] for n in mine for k in ("exp_avg", "exp_avg_sq")}, step or None)


def record_genesis(prov: Provenance, run_dir: Path, world: int) -> str:
    write_shares(run_dir, 0, world)
    return prov.record_genesis(world, {"name": "test"}, {}, {n: tuple(t.shape) for n, t in weights(0).items()})


def record(run_dir: Path, signer: PemSigner, background: bool, steps: int = 5, world: int = 2) -> list[dict]:
    prov = Provenance(run_dir, signer, "t", background=background)
    record_genesis(prov, run_dir, world)
    extra = {"rng_state": {"sources": ["torch_cpu"], "ranks": [rng_state_digest()[1]] * world},
             "environment": environment(world)}
    for step in range(1, steps + 1):
        write_shares(run_dir, step, world)
        prov.record_checkpoint(step, world, CONSUMED, {"loss": 1.0 / step, "grad_norm": 0.5}, True, extra)
    prov.record_release()
    prov.close()
    return [e.statement for e in read_chain(run_dir / "chain.jsonl")[0]]


def comparable(st: dict) -> dict:
    """A statement less what ECDSA's randomized signatures change: `previous`, model.sig's digest and
    the model card's (it names the chain head, a signed line's digest)."""
    return {**st, "predicate": {**st["predicate"], "previous": None},
            "subject": [s for s in st["subject"] if not s["name"].endswith((".sig", "export/README.md"))]}


def test_one_pass_hash_equals_file_sha256_and_tensor_leaves(tmp_path: Path) -> None:
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    save_weights(weights(1), small)
    save_weights({"a": torch.arange(PARALLEL_BYTES // 4 + 5, dtype=torch.float32), "b": torch.ones(3)}, big)
    assert big.stat().st_size > PARALLEL_BYTES  # the file sha256 runs on its own thread
    for f in (small, big):
        assert hash_safetensors(f) == (sha256_file(f), safetensors_leaves([f]))
    data = big.read_bytes()
    big.write_bytes(data[: len(data) - 100])  # the last tensor is cut short
    with pytest.raises(DigestError, match="big.safetensors"):
        hash_safetensors(big)


def test_background_worker_records_what_the_loop_would_in_order(tmp_path: Path, key: tuple[PemSigner, Path]) -> None:
    signer, pub = key
    bg = record(tmp_path / "bg", signer, background=True)
    inline = record(tmp_path / "inline", signer, background=False)
    assert [comparable(s) for s in bg] == [comparable(s) for s in inline]  # the same statements, in the same order
    assert [s["predicate"]["kind"] for s in bg] == ["genesis"] + ["checkpoint"] * 5 + ["release"]
    root = bg[0]["predicate"]["weights_root"]
    for step, st in enumerate(bg[1:6], start=1):
        pred = st["predicate"]
        assert pred["step"] == step and pred["parent_root"] == root and validate_statement(st) is None
        assert pred["weights_root"] == state_dict_root(weights(step))
        assert pred["optimizer"]["root"] == state_dict_root(moments(step)) and pred["optimizer"]["step"] == step
        folder = tmp_path / "bg" / f"checkpoints/step-{step:06d}"
        subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
        assert set(subjects) == {shard_name(step, k, r, 2) for k in ("model", "optimizer") for r in (0, 1)} | {
            f"checkpoints/step-{step:06d}/model.sig"}
        for name, sha in subjects.items():
            assert sha256_file(tmp_path / "bg" / name) == sha
        assert [f.ok for f in cross_check(folder / "model.sig", folder, [PublicKeyVerifier.from_file(pub)])] == [True]
        root = pred["weights_root"]
    assert bg[-1]["predicate"]["weights_root"] == root


def test_a_worker_failure_stops_recording_and_reaches_the_training_loop(tmp_path: Path, key: tuple[PemSigner, Path]) -> None:
    prov = Provenance(tmp_path, key[0], "t", background=True)
    record_genesis(prov, tmp_path, 1)
    chain = tmp_path / "chain.jsonl"
    kept = chain.read_bytes()
    chain.unlink()
    chain.mkdir()  # the next append cannot write the chain
    write_shares(tmp_path, 1, 1)
    prov.record_checkpoint(1, 1, CONSUMED, {"loss": 1.0})
    with pytest.raises(ProvenanceError, match="checkpoint at step 1 not recorded: IsADirectoryError"):
        prov.flush()
    chain.rmdir()
    chain.write_bytes(kept)
    with pytest.raises(ProvenanceError):  # nothing more is recorded after a failure
        prov.record_checkpoint(2, 1, CONSUMED, {"loss": 1.0})
    assert [e.kind for e in read_chain(chain)[0]] == ["genesis"]


@pytest.mark.parametrize("world", [1, 3])
def test_the_canonical_roots_do_not_depend_on_how_many_ranks_wrote_the_shares(tmp_path: Path, world: int,
                                                                              key: tuple[PemSigner, Path]) -> None:
    two = record(tmp_path / "two", key[0], background=False, steps=2)
    other = record(tmp_path / "other", key[0], background=False, steps=2, world=world)
    for a, b in zip(two[1:3], other[1:3]):
        assert a["predicate"]["weights_root"] == b["predicate"]["weights_root"]
        assert a["predicate"]["optimizer"]["root"] == b["predicate"]["optimizer"]["root"]
    names = {s["name"].rsplit("/", 1)[1] for s in other[1]["subject"]}
    assert sum(n.startswith("model-") for n in names) == world


def test_each_rank_holds_about_its_share_of_the_bytes() -> None:
    sizes = {f"layers.{i}.w": (i % 7 + 1) * 1000 for i in range(64)}
    for world in (2, 4, 8):
        owner = assign(sizes, world)
        load = [sum(sizes[n] for n in sizes if owner[n] == r) for r in range(world)]
        assert max(load) <= sum(sizes.values()) / world * 1.1 and owner == assign(dict(reversed(sizes.items())), world)


def test_rng_state_digest_follows_the_generators() -> None:
    torch.manual_seed(3)
    sources, first = rng_state_digest()
    torch.manual_seed(3)
    assert rng_state_digest() == (sources, first) and sources[0] == "torch_cpu" and "python" in sources
    torch.rand(1)  # a draw, e.g. dropout
    assert rng_state_digest()[1] != first


def test_checkpoint_fields_are_optional_but_checked_when_present(tmp_path: Path, key: tuple[PemSigner, Path]) -> None:
    st = record(tmp_path, key[0], background=False, steps=1)[1]
    assert validate_statement(st) is None
    old = copy.deepcopy(st)  # a statement from before these fields existed
    for f in ("rng_state", "environment"):
        del old["predicate"][f]
    del old["predicate"]["metrics"]["grad_norm"]
    assert validate_statement(old) is None
    bad = {
        "grad_norm": lambda p: p["metrics"].update(grad_norm=-1.0),
        "rng_state has 1 rank digests": lambda p: p["rng_state"]["ranks"].pop(),
        "rng_state must be": lambda p: p["rng_state"].update(ranks=["not a digest", "x"]),
        "environment must be": lambda p: p.update(environment={"versions": {"torch": 2}, "hardware": {}}),
    }
    for problem, mutate in bad.items():
        broken = copy.deepcopy(st)
        mutate(broken["predicate"])
        assert problem in (validate_statement(broken) or ""), problem
