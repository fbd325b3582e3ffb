"""kai-data on datatrove (data_pipelines.engine): the same user corpus as tests/test_data_build.py,
plus Korean documents with planted near duplicates, built on datatrove's local executor with three
dedup tasks and two workers; verified and replayed by `kai-attest verify --replay-data`; killed in
a task and at a seal; and written as sbatch scripts for SLURM without submitting anything."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dill
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from attest.chain import read_chain
from attest.digest import sha256_file
from conftest import REPO, env, kai_attest, must, resign
from test_data_build import ARGS, PROVENANCE, data_statements, kai_data_user, make_corpus, write_config

LOCAL = ["executor.kind=local", "executor.tasks=3", "executor.workers=2"]
HANGUL = "가나다라마바사아자차카타파하거너더러머버서어저처커터퍼허고노도로모보소오조초코토포호"


def make_korean(path: Path, n: int = 60, near: int = 8) -> list[tuple[str, str]]:
    """`n` Korean documents and `near` edited copies (two syllables changed) as JSONL; returns the
    (original id, copy id) pairs."""
    rng = np.random.default_rng(11)
    words = ["".join(rng.choice(list(HANGUL), size=rng.integers(2, 5))) for _ in range(400)]
    docs = [" ".join(words[i] for i in rng.integers(len(words), size=80)) + "." for _ in range(n)]
    rows = [{"text": d} for d in docs]
    pairs = []
    for j in range(near):
        chars = list(docs[j * 3])
        chars[10], chars[40] = "한", "국"
        rows.append({"text": "".join(chars)})
        pairs.append((f"ko/ko.jsonl:{j * 3 + 1}", f"ko/ko.jsonl:{n + j + 1}"))  # ids: source/file:line
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return pairs


@pytest.fixture(scope="module")
def local_built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("engine")
    planted = make_corpus(root / "corpus")
    korean = make_korean(root / "corpus" / "ko.jsonl")
    write_config(root / "conf", root / "corpus")
    mine = root / "conf" / "data" / "mine.yaml"
    cfg = yaml.safe_load(mine.read_text())
    cfg["sources"].append({"name": "ko", "path": "ko.jsonl", "format": "jsonl", **PROVENANCE})
    mine.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    must(kai_attest("keygen", str(root / "out" / "keys")))
    must(kai_data_user(root / "conf", root / "out", *LOCAL))
    return root, planted, korean


def kai_data_killed(conf: Path, out: Path, point: str, *extra: str) -> int:
    """kai-data killed (SIGKILL) at the fail point; returns its exit code. Run in its own session,
    whose leftover processes (datatrove's manager, orphaned by the kill) are then ended."""
    cmd = [sys.executable, "-m", "data_pipelines.build", "--config-dir", str(conf), "data=mine", f"out_dir={out}",
           "run_id=mine", *ARGS, *extra]
    with open(out.parent / "killed.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env={**env(), "KAI_FAILPOINT": point}, stdout=log, stderr=log,
                             start_new_session=True)
        code = p.wait(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    return code


def _ids(out: Path, stage: str, source: str) -> set[str]:
    return {i for n, m in data_statements(out).items() if m["stage"] == stage and m["source"]["name"] == source
            for i in pq.read_table(out / n, columns=["id"]).column("id").to_pylist()}


def _record_ids(out: Path, source: str, files: list[str]) -> dict[str, str]:
    """file name → record id, from the ingest shards (ids carry the file path)."""
    ids = _ids(out, "ingest", source)
    return {f: next(i for i in ids if i.endswith(f)) for f in files}


def test_planted_korean_and_english_duplicates_are_removed_on_the_local_executor(local_built) -> None:
    root, planted, korean = local_built
    out = root / "out"
    kept_ko = _ids(out, "dedup", "ko")
    assert all((a in kept_ko) != (b in kept_ko) for a, b in korean), "one of each planted Korean pair survives"
    kept = _ids(out, "dedup", "texts")
    for kind in ("exact", "near"):
        for copy, rid in _record_ids(out, "texts", planted[kind]).items():
            original = rid.replace(copy, f"doc{(int(copy[-6:-4]) + (20 if kind == 'near' else 0)):04d}.txt")
            assert (rid in kept) != (original in kept), f"{kind} pair {copy}: exactly one copy survives"
    counts = {}
    for m in data_statements(out).values():
        if m["stage"] == "dedup":
            for k, v in m["counts"].items():
                counts[k] = counts.get(k, 0) + v
    assert counts["exact-duplicate"] >= len(planted["exact"]) + 1  # + the jsonl copy of a text file
    assert counts["near-duplicate"] >= len(planted["near"]) + len(korean)


def test_every_dedup_manifest_records_the_task_layout_and_banding(local_built) -> None:
    out = local_built[0] / "out"
    ingest = [n for n, m in data_statements(out).items() if m["stage"] == "ingest"]
    dedup = {n: m for n, m in data_statements(out).items() if m["stage"] == "dedup"}
    assert sorted(n.replace("data/dedup/", "data/ingest/") for n in dedup) == sorted(ingest)  # one per ingest shard
    assert {m["task"] for m in dedup.values()} == {0, 1, 2}
    params = {json.dumps(m["params"], sort_keys=True) for m in dedup.values()}
    assert len(params) == 1
    p = json.loads(params.pop())
    assert p["layout"] == {"tasks": 3, "groups": "contiguous"} and p["scheme"] == "datatrove-minhash/v1"
    assert (p["bands"], p["rows"]) == (9, 13)  # datasketch's banding for threshold 0.8, 128 permutations
    assert all(m["derived_from"] == [{"path": n.replace("data/dedup/", "data/ingest/"),
                                      "sha256": data_statements(out)[n.replace("data/dedup/", "data/ingest/")]["sha256"]}]
               for n, m in dedup.items())


def test_a_local_build_verifies_and_its_dedup_and_pack_replay_byte_identical(local_built) -> None:
    out = local_built[0] / "out"
    p = kai_attest("verify", str(out), "--trust", str(out / "keys/signing-key.pub.pem"), "--replay-data")
    lines = {line.split()[1]: line for line in p.stdout.splitlines() if line.startswith(("ok", "FAIL", "SKIP"))}
    assert lines["data-lineage"].startswith("ok"), p.stdout
    assert lines["data-replay"].startswith("ok") and "0 with equal rows" in lines["data-replay"], p.stdout


def test_replay_data_works_under_a_long_tmpdir(local_built, tmp_path: Path) -> None:
    """A macOS laptop's TMPDIR is 49+ characters: the data replay's worker sockets still fit."""
    from conftest import run

    out = local_built[0] / "out"
    long = Path("/tmp") / ("T" * 60)
    long.mkdir(exist_ok=True)
    try:
        p = run([sys.executable, "-m", "attest.cli", "verify", str(out), "--trust",
                 str(out / "keys/signing-key.pub.pem"), "--replay-data"], extra_env={"TMPDIR": str(long)})
    finally:
        shutil.rmtree(long, ignore_errors=True)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr[-3000:]
    assert any(line.startswith("ok    data-replay") for line in p.stdout.splitlines()), p.stdout[-3000:]


def test_replay_refuses_dedup_recorded_with_a_banding_the_threshold_does_not_give(local_built, tmp_path: Path) -> None:
    """An insider re-signs the build with `bands` 8 in every dedup manifest (statement and file alike):
    lineage still closes, but the replay will not run dedup with a banding other than the threshold's."""
    out = tmp_path / "out"
    shutil.copytree(local_built[0] / "out", out, ignore=shutil.ignore_patterns("work"))

    def rebanded(statements: list[dict]) -> None:
        for st in statements:
            m = st["predicate"].get("manifest", {})
            if m.get("stage") == "dedup":
                m["params"]["bands"] = 8
                sub = next(x for x in st["subject"] if x["name"].endswith(".manifest.json"))
                (out / sub["name"]).write_text(json.dumps(m, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
                sub["digest"]["sha256"] = sha256_file(out / sub["name"])

    resign(out, out / "keys/signing-key.pem", rebanded)
    p = kai_attest("verify", str(out), "--trust", str(out / "keys/signing-key.pub.pem"), "--replay-data")
    lines = {line.split()[1]: line for line in p.stdout.splitlines() if line.startswith(("ok", "FAIL", "SKIP"))}
    assert lines["data-lineage"].startswith("ok"), p.stdout
    assert lines["data-replay"].startswith("FAIL") and "8 bands" in lines["data-replay"], p.stdout


def test_a_killed_dedup_task_leaves_nothing_signed_and_the_rerun_gives_the_same_shards(local_built, tmp_path: Path) -> None:
    root = local_built[0]
    out = tmp_path / "out"
    must(kai_attest("keygen", str(out / "keys")))
    one_worker = [a for a in LOCAL if not a.startswith("executor.workers")] + ["executor.workers=1"]
    assert kai_data_killed(root / "conf", out, "task-shard-written@2", *one_worker) == -signal.SIGKILL
    stages = {m["stage"] for m in data_statements(out).values()}
    assert stages == {"ingest"}, "no dedup shard is signed before its task has finished"
    assert list((out / "data" / "dedup").glob("*.parquet")), "the killed task had written shards"
    must(kai_data_user(root / "conf", out, *one_worker))
    want = {n: m["sha256"] for n, m in data_statements(root / "out").items()}
    assert {n: m["sha256"] for n, m in data_statements(out).items()} == want


def test_the_seal_refuses_a_task_output_that_is_not_what_its_manifest_says(local_built, tmp_path: Path) -> None:
    root = local_built[0]
    out = tmp_path / "out"
    must(kai_attest("keygen", str(out / "keys")))
    assert kai_data_killed(root / "conf", out, "seal-dedup", *LOCAL) == -signal.SIGKILL
    before = (out / "chain.jsonl").read_bytes()
    victim = sorted((out / "data" / "dedup").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    p = kai_data_user(root / "conf", out, *LOCAL)
    assert p.returncode == 1
    err = [line for line in p.stderr.splitlines() if line.startswith("kai-data: error:")]
    assert len(err) == 1 and str(victim) in err[0] and "refused" in err[0], p.stderr[-2000:]
    assert (out / "chain.jsonl").read_bytes() == before  # nothing signed, nothing rewritten


def test_slurm_mode_writes_the_sbatch_scripts_and_submits_nothing(local_built, tmp_path: Path) -> None:
    root = local_built[0]
    out = tmp_path / "out"
    must(kai_attest("keygen", str(out / "keys")))
    env = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists())}
    p = kai_data_user(root / "conf", out, "executor.kind=slurm", "executor.tasks=5", "executor.slurm.partition=cpu-long",
                      "+executor.slurm.sbatch_args.account=kai", extra_env=env)
    must(p)
    submit = Path(p.stdout.split("bash ")[-1].strip())
    text = submit.read_text()
    stages = ["ingest", "seal-ingest", "exact-sigs", "exact-find", "near-sigs", "near-buckets", "near-cluster",
              "dedup", "seal-dedup", "pack", "seal-pack"]
    assert [line.split("/")[-2] for line in text.splitlines() if line.startswith("id=$(sbatch")] == stages
    # submit.sh against a recording sbatch (the cluster is not here): each stage waits for the one before
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$*" >> "$SBATCH_LOG"; echo $(( $(wc -l < "$SBATCH_LOG") + 100 ))\n')
    (bin_dir / "sbatch").chmod(0o755)
    subprocess.run(["bash", str(submit)], check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "log")})
    calls = (tmp_path / "log").read_text().splitlines()
    assert len(calls) == len(stages) and "--dependency" not in calls[0]
    assert all(f"--dependency=afterok:{100 + i} " in c for i, c in enumerate(calls[1:], 1))
    tasks = {"ingest": 5, "pack": 5, "exact-sigs": 5, "near-sigs": 5, "dedup": 5, "near-buckets": 9}  # 5 sources
    for stage in stages:
        script = (submit.parent / stage / "launch_script.slurm").read_text()
        n = tasks.get(stage, 1)
        assert f"#SBATCH --array=0-{n - 1}" in script and "#SBATCH --partition=cpu-long" in script
        assert "#SBATCH --account=kai" in script and "launch_pickled_pipeline" in script
        with open(submit.parent / stage / "executor.pik", "rb") as f:
            ex = dill.load(f)
        assert ex.world_size == n and json.loads((submit.parent / stage / "ranks_to_run.json").read_text()) == list(range(n))
    assert not (out / "chain.jsonl").exists() or not read_chain(out / "chain.jsonl")[0]  # nothing ran, nothing signed
