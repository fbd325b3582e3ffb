"""kai-train and kai-data as Hydra apps: typed configs refuse bad keys with one line before any
work, multirun jobs get their own folders and each failure is reported, app help, the deepspeed
launcher's --local_rank, wandb online without a key, torchrun's error file, progress on stderr."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
pytest.importorskip("yaml", reason="the train extra; not on the evaluator's light install")
import yaml

from attest.chain import read_chain
from attest.progress import Progress
from bundlefactory import make_bundle
from conftest import REPO, free_port, kai_attest, must, prepared_data, run

TRAIN = [sys.executable, "-m", "kai_train.train"]
DATA = [sys.executable, "-m", "data_pipelines.build"]
TINY = REPO / "kai_train/conf/model/tiny.yaml"


def error_lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [s for s in p.stderr.splitlines() if s.strip()]


@pytest.mark.parametrize("override, key", [("seed=abc", "seed"), ("sed=1", "sed"), ("model.dim=wide", "model.dim")])
def test_a_mistyped_or_unknown_key_stops_kai_train_with_one_line_before_any_work(tmp_path: Path, override: str,
                                                                                  key: str) -> None:
    p = run([*TRAIN, f"run_dir={tmp_path / 'run'}", override])
    assert p.returncode == 2, p.stdout + p.stderr
    lines = error_lines(p)
    assert len(lines) == 1 and lines[0].startswith("kai-train: error: "), p.stderr
    assert override in lines[0] or f"Key '{key}' not in" in lines[0]  # the override, or the unknown key
    assert not (tmp_path / "run").exists()  # nothing made, nothing signed


def test_a_user_preset_with_a_misspelt_key_is_refused_naming_the_key(tmp_path: Path) -> None:
    preset = yaml.safe_load(TINY.read_text())
    preset["n_layer"] = preset.pop("n_layers")
    (tmp_path / "conf/model").mkdir(parents=True)
    (tmp_path / "conf/model/mine.yaml").write_text(yaml.safe_dump(preset))
    p = run([*TRAIN, "--config-dir", str(tmp_path / "conf"), "model=mine", f"run_dir={tmp_path / 'run'}"])
    assert p.returncode == 2 and len(error_lines(p)) == 1, p.stderr
    assert "n_layer" in p.stderr and "model/mine" in p.stderr


def test_kai_data_refuses_a_mistyped_stage_parameter_with_one_line(tmp_path: Path) -> None:
    p = run([*DATA, f"out_dir={tmp_path / 'out'}", "dedup.threshold=high"])
    assert p.returncode == 2 and len(error_lines(p)) == 1, p.stderr
    assert error_lines(p)[0].startswith("kai-data: error: ") and "dedup.threshold=high" in p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd, says, overrides", [
    (TRAIN, "kai-train: train a multimodal model", ["seed=", "deepspeed=zero2", "model=tiny", "-m KEY=A,B"]),
    (DATA, "kai-data: turn declared sources", ["out_dir=", "data=demo", "dedup.threshold=", "progress=auto"]),
])
def test_app_help_says_what_the_app_does_and_shows_the_common_overrides(cmd: list[str], says: str,
                                                                        overrides: list[str]) -> None:
    p = must(run([*cmd, "--help"]))
    assert p.stdout.startswith(says)
    for o in overrides:
        assert o in p.stdout, o
    assert "model: 125m, 13b, 1b, 350m, 3b, 7b, moe-100b, moe-236b, moe-519b, moe-cpu, tiny" in p.stdout  # the groups, listed by Hydra from the package


@pytest.mark.parametrize("flag", [["--local_rank=1"], ["--local_rank", "1"]])
def test_the_deepspeed_launchers_local_rank_is_accepted(flag: list[str], tmp_path: Path) -> None:
    p = must(run([*TRAIN, *flag, "--cfg", "job", f"run_dir={tmp_path}", "seed=5"]))
    cfg = yaml.safe_load(p.stdout)
    assert cfg["seed"] == 5 and "local_rank" not in p.stdout


def test_take_local_rank_sets_local_rank_only_when_the_launcher_has_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from kai_train.app import take_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert take_local_rank(["prog", "--local_rank", "3", "seed=1"]) == ["prog", "seed=1"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert take_local_rank(["prog", "--local_rank=5"]) == ["prog"] and os.environ["LOCAL_RANK"] == "0"


def test_wandb_online_without_a_key_fails_before_the_run_and_genesis_are_signed(data_run: Path, tmp_path: Path) -> None:
    run_dir = prepared_data(tmp_path / "run", data_run)
    before = (run_dir / "chain.jsonl").read_bytes()
    home = tmp_path / "home"
    home.mkdir()
    p = run([*TRAIN, f"run_dir={run_dir}", "wandb.mode=online"],
            extra_env={"HOME": str(home), "WANDB_API_KEY": "", "NETRC": str(home / ".netrc")})
    assert p.returncode == 1, p.stdout + p.stderr
    assert error_lines(p) == [ln for ln in error_lines(p) if "wandb.mode=online needs an API key" in ln] and error_lines(p)
    assert (run_dir / "chain.jsonl").read_bytes() == before  # no run, no genesis statement
    assert {e.kind for e in read_chain(run_dir / "chain.jsonl")[0]} <= {"data-shard", "tokenizer"}
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config").exists()


def test_a_netrc_entry_for_the_wandb_host_counts_as_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kai_train.tracking import has_wandb_key

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_key()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert has_wandb_key()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_key()  # the key is for another host


def test_kai_train_multirun_jobs_get_their_own_run_dirs_and_each_failure_is_reported(tmp_path: Path) -> None:
    p = run([*TRAIN, "-m", f"run_dir={tmp_path}", "seed=1,2"])
    assert p.returncode == 1, p.stdout + p.stderr
    for n in (0, 1):
        assert f"kai-train: error in job {n} " in p.stderr and f"no *.parquet shards in {tmp_path / str(n)}/data" in p.stderr
    assert "kai-train: error: 2 of 2 multirun jobs failed" in p.stderr


def test_kai_data_multirun_builds_each_job_in_its_own_folder_and_goes_on_after_a_failure(tmp_path: Path) -> None:
    must(kai_attest("keygen", str(tmp_path / "0/keys")))  # job 1's folder has no key: it fails, job 0 is built
    p = run([*DATA, "-m", f"out_dir={tmp_path}", "data.n_text=60", "data.n_image=6", "data.n_audio=6",
             "shards.rows=1000,2000", "progress=always"])
    assert p.returncode == 1, p.stdout + p.stderr
    kinds = [e.kind for e in read_chain(tmp_path / "0/chain.jsonl")[0]]
    assert "tokenizer" in kinds and kinds.count("data-shard") >= 6
    assert not (tmp_path / "1/chain.jsonl").exists()
    failed = [ln for ln in error_lines(p) if ln.startswith("kai-data: error in job")]
    assert len(failed) == 1 and "job 1 " in failed[0] and str(tmp_path / "1/keys") in failed[0], p.stderr
    assert "kai-data: error: 1 of 2 multirun jobs failed" in p.stderr
    assert "kai-data stages: 4/4 stages (100%)" in p.stderr and "kai-data stages" not in p.stdout


def test_plain_progress_lines_follow_the_mode() -> None:
    out = io.StringIO()
    with Progress("hashing", 4, "files", "always", out) as bar:
        for _ in range(4):
            bar.advance()
    assert out.getvalue().splitlines()[0] == "hashing: 1/4 files (25%)"
    assert out.getvalue().splitlines()[-1] == "hashing: 4/4 files (100%)"
    for mode in ("never", "auto"):  # auto: quiet for work that ends within a couple of seconds
        quiet = io.StringIO()
        with Progress("hashing", 4, "files", mode, quiet) as bar:
            bar.update(4)
        assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="progress must be one of"):
        Progress("x", 1, mode="sometimes")


def test_verify_prints_hashing_progress_on_stderr_and_keeps_json_stdout_clean(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "bundle")
    p = kai_attest("verify", str(root), "--trust", str(root / "keys/signing-key.pub.pem"), "--json", "--progress", "always")
    report = json.loads(p.stdout)  # nothing but the report on stdout
    assert report["findings"] and p.returncode in (0, 1), p.stderr
    hashed = [ln for ln in p.stderr.splitlines() if ln.startswith("hashing: ")]
    assert hashed and hashed[-1].endswith("bytes (100%)"), p.stderr
    quiet = kai_attest("verify", str(root), "--trust", str(root / "keys/signing-key.pub.pem"), "--json", "--progress", "never")
    assert "hashing" not in quiet.stderr and json.loads(quiet.stdout)["verdict"] == report["verdict"]


@pytest.mark.slow
def test_under_torchrun_a_config_error_is_one_line_per_rank_and_in_torchruns_error_summary(tmp_path: Path) -> None:
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "kai_train.train", f"run_dir={tmp_path / 'run'}", "seed=abc"], timeout=300)
    assert p.returncode != 0
    mine = [ln for ln in p.stderr.splitlines() if ln.startswith("kai-train: error: ")]
    assert len(mine) == 2 and all("seed=abc" in ln for ln in mine), p.stderr  # one line from each rank
    summary = p.stderr.split(mine[-1])[-1]  # torchrun's, read from the ranks' error files
    assert "error_file: <N/A>" not in summary and "AppError: Error merging override seed=abc" in summary, p.stderr
    assert not (tmp_path / "run").exists()
