"""Insider attacks on segment replay, against a real two-rank DeepSpeed run: the key holder edits
files and re-signs every statement consistently; `--replay all` must fail, naming the check.

Replay starts only from the state the previous checkpoint statement signs (weights and AdamW
moments, found through its subjects), and must reproduce the next checkpoint's weights *and*
optimizer state, so every replayed segment is closed at both ends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attest.cli import main
from attest.digest import merkle_root, sha256_file
from attest.oms import sign_checkpoint_dir
from conftest import resign

pytestmark = pytest.mark.slow


def verify(capsys: pytest.CaptureFixture[str], b: Path, *extra: str) -> tuple[int, str]:
    rc = main(["verify", str(b), "--trust", str(b / "keys/signing-key.pub.pem"), "--replay", "all", *extra])
    return rc, capsys.readouterr().out


def fails(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL")]


def checkpoint(sts: list[dict], step: int) -> dict:
    return next(s for s in sts if s["predicate"]["kind"] == "checkpoint" and s["predicate"]["step"] == step)


def leaves_root(*paths: Path) -> str:
    from attest.digest import safetensors_leaves

    return merkle_root(safetensors_leaves(paths))


def perturbed(src: Path, dst: Path, scale: float) -> None:
    """A copy of a safetensors state with every tensor scaled (a made-up state of the same shape)."""
    from safetensors.torch import load_file

    from kai_train.weights import save_weights

    save_weights({k: v * scale for k, v in load_file(str(src)).items()}, dst)


# ---------------------------------------------------------------- 1. replay starts from what was signed


def test_signed_start_weights_elsewhere_than_the_usual_path_are_what_replay_starts_from(bundle, key, capsys) -> None:
    """The step-2 statement signs weights in another folder (nudged off the honest ones), while the
    usual path keeps the honest weights a path-guessing replay would have used: segment 2→4 fails."""
    src, moved = bundle / "checkpoints/step-000002", bundle / "checkpoints/moved-000002"
    moved.mkdir()
    for f in src.glob("*.safetensors"):
        if f.name.startswith("model"):
            perturbed(f, moved / f.name, 1.001)
        else:
            shutil.copy2(f, moved / f.name)
    sign_checkpoint_dir(moved, key)

    def move(sts: list[dict]) -> None:
        st = checkpoint(sts, 2)
        for s in st["subject"]:
            s["name"] = s["name"].replace("step-000002", "moved-000002")
            s["digest"]["sha256"] = sha256_file(bundle / s["name"])
        st["predicate"]["weights_root"] = leaves_root(*sorted(moved.glob("model*.safetensors")))
        opt = st["predicate"]["optimizer"]
        opt["files"] = [n.replace("step-000002", "moved-000002") for n in opt["files"]]
        checkpoint(sts, 4)["predicate"]["parent_root"] = st["predicate"]["weights_root"]

    resign(bundle, key, move)
    rc, out = verify(capsys, bundle)
    assert rc == 1
    replay = [x for x in fails(out) if x.split()[1] == "replay"]
    assert any("(step 2)" in x for x in replay) and any("(step 4)" in x for x in replay), out


def test_a_second_signed_copy_of_a_tensor_gives_replay_no_start(bundle, key, capsys) -> None:
    """The step-2 statement adds a shard holding other values of tensors its first shard already has:
    which copy a loader would take is ambiguous, so neither weights-digest nor replay accepts it."""
    first = sorted((bundle / "checkpoints/step-000002").glob("model*.safetensors"))[0]
    extra = first.with_name("model-extra.safetensors")
    perturbed(first, extra, 1.001)

    def add(sts: list[dict]) -> None:
        checkpoint(sts, 2)["subject"].append({"name": f"checkpoints/step-000002/{extra.name}",
                                              "digest": {"sha256": sha256_file(extra)}})

    resign(bundle, key, add)
    rc, out = verify(capsys, bundle)
    assert any(x.split()[1] == "weights-digest" and "more than one file" in x for x in fails(out)), out
    line = next(x for x in fails(out) if x.split()[1] == "replay" and "(step 4)" in x)
    assert "more than one file" in line


# ---------------------------------------------------------------- 2. optimizer state is verified


def optimizer_shard(bundle: Path) -> Path:
    return sorted((bundle / "checkpoints/step-000002").glob("optimizer*.safetensors"))[0]


def test_made_up_moments_signed_under_the_honest_root_fail_weights_digest(bundle, key, capsys) -> None:
    opt = optimizer_shard(bundle)
    perturbed(opt, opt, 3.0)
    sign_checkpoint_dir(opt.parent, key)

    def resha(sts: list[dict]) -> None:
        for s in checkpoint(sts, 2)["subject"]:
            s["digest"]["sha256"] = sha256_file(bundle / s["name"])

    resign(bundle, key, resha)
    rc, out = verify(capsys, bundle)
    assert any(x.split()[1] == "weights-digest" and "optimizer root" in x for x in fails(out)), out
    assert any(x.split()[1] == "replay" and "(step 4)" in x for x in fails(out)), out


def test_made_up_moments_signed_consistently_fail_replay_at_both_ends_of_the_segment(bundle, key, capsys) -> None:
    """Moments scaled and the optimizer root re-signed: every digest agrees, but segment 0→2 does not
    reach them and segment 2→4 started from them does not reach step 4."""
    opt = optimizer_shard(bundle)
    perturbed(opt, opt, 3.0)
    sign_checkpoint_dir(opt.parent, key)

    def resha(sts: list[dict]) -> None:
        st = checkpoint(sts, 2)
        for s in st["subject"]:
            s["digest"]["sha256"] = sha256_file(bundle / s["name"])
        st["predicate"]["optimizer"]["root"] = leaves_root(*sorted(opt.parent.glob("optimizer*.safetensors")))

    resign(bundle, key, resha)
    rc, out = verify(capsys, bundle)
    assert rc == 1 and {x.split()[1] for x in fails(out)} == {"replay"}, out
    step2 = next(x for x in fails(out) if "(step 2)" in x)
    assert "optimizer root" in step2 and "weights root" not in step2.split("found")[0]
    assert any("(step 4)" in x for x in fails(out))


def test_optimizer_state_named_outside_the_statement_fails(bundle, key, capsys) -> None:
    stray = bundle / "optimizer-elsewhere.safetensors"
    shutil.copy2(optimizer_shard(bundle), stray)
    resign(bundle, key, lambda sts: checkpoint(sts, 2)["predicate"]["optimizer"].update(files=[stray.name]))
    rc, out = verify(capsys, bundle)
    assert any(x.split()[1] == "weights-digest" and "optimizer.files" in x for x in fails(out)), out
    assert any(x.split()[1] == "replay" and "(step 4)" in x and "not a subject" in x for x in fails(out)), out


# ---------------------------------------------------------------- 7. the bundle's config never picks paths or code


def test_a_deepspeed_config_that_writes_files_is_refused_and_writes_nothing(bundle, key, capsys, tmp_path) -> None:
    target = tmp_path / "owned"

    def evil(sts: list[dict]) -> None:
        run = next(s for s in sts if s["predicate"]["kind"] == "run")
        run["predicate"]["config"]["deepspeed"]["tensorboard"] = {"enabled": True, "output_path": str(target)}

    resign(bundle, key, evil)
    rc, out = verify(capsys, bundle)
    assert any(x.split()[1] == "replay" and "deepspeed.tensorboard" in x for x in fails(out)), out
    assert not target.exists()


def test_a_sampler_record_that_disagrees_with_the_signed_config_is_not_replayed(bundle, key, capsys) -> None:
    resign(bundle, key, lambda sts: checkpoint(sts, 4)["predicate"]["data_consumed"]["sampler"].update(seed=99))
    rc, out = verify(capsys, bundle)
    line = next(x for x in fails(out) if x.split()[1] == "replay" and "(step 4)" in x)
    assert "sampler.seed" in line
