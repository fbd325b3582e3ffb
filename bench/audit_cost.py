"""What an audit costs the evaluator: light bundle and packs against the full bundle, and replay time
against training time, with the tolerance-mode noise floor against the segment's own update.

    python bench/audit_cost.py                   # the demo model and a ~100M-parameter model
    python bench/audit_cost.py --models demo     # one of them

For each model it trains on 2 CPU ranks (DeepSpeed ZeRO-1, gloo, grad_accum 2 so that a replay on
one rank sums in another order), with `--segments` checkpoints, then measures in the same run:

* sizes: the full bundle, the light bundle (`kai-attest bundle --light`) and one segment's pack;
* the verifier's CPU time (its own and its children's) for the light bundle alone, and per
  challenged segment answered by packs in exact mode and in tolerance mode (two replays on 1 and
  2 ranks), each as a fraction of the segment's training time (training CPU time / segments);
* the tolerance floor: ||floor|| / ||segment update|| per segment, its margin, and the drift a
  claimed state could hide per segment (K × floor).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

MODELS = {
    "demo": [],
    # ~100M parameters: GPT-2-small width with 8 layers; small image and audio inputs (the text model dominates)
    "100m": ["model=125m", "model.n_layers=8", "model.vision_layers=1", "model.speech_layers=1",
             "model.image_size=32", "model.patch_size=8", "model.audio_samples=8000"],
}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """(process, wall seconds, CPU seconds of it and its children)."""
    t0, c0 = time.perf_counter(), children_cpu()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return p, time.perf_counter() - t0, children_cpu() - c0


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def must(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if p.returncode not in (0,):
        sys.exit(f"failed (exit {p.returncode}): {' '.join(p.args[:6])}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def run_model(name: str, overrides: list[str], segments: int, tmp: Path, env: dict[str, str]) -> dict:
    from conftest import free_port, prepared_data

    run = prepared_data(tmp / name / "run", tmp / "data" if (tmp / "data").exists() else None)
    if not (tmp / "data").exists():
        shutil.copytree(run, tmp / "data")
    steps = 2 * segments
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "kai_train.train", f"run_dir={run}", "deepspeed=zero1", f"train.steps={steps}", "train.ckpt_every=2",
             "train.micro_batch=2", "train.grad_accum=2", "train.eval_every=0", "train.log_every=1", *overrides]
    p, train_wall, train_cpu = timed(train, env)
    must(p)
    params = next((line for line in p.stdout.splitlines() + p.stderr.splitlines() if "parameters" in line), "")
    attest = [sys.executable, "-m", "attest.cli"]
    must(subprocess.run([*attest, "bundle", str(run)], env=env, capture_output=True, text=True))
    must(subprocess.run([*attest, "bundle", str(run), "--light", "--out", str(run / "light")], env=env,
                        capture_output=True, text=True))
    key = str(run / "bundle/keys/signing-key.pub.pem")
    out: dict = {"model": name, "parameters": params.split("(")[-1].split(" parameters")[0] if params else "?",
                 "segments": segments, "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
                 "full_bundle_bytes": size(run / "bundle"), "light_bundle_bytes": size(run / "light")}
    seg_cpu = train_cpu / segments
    p, wall, cpu = timed([*attest, "verify", str(run / "light"), "--trust", key, "--light", "--json"], env)
    out["verify_light_cpu_s"] = round(cpu, 2)
    ch = run / "challenge.json"
    must(subprocess.run([*attest, "challenge", str(run / "light"), "--segments", "1", "--seed", "1", "--out", str(ch)],
                        env=env, capture_output=True, text=True))
    must(subprocess.run([*attest, "respond", str(run), str(ch), "--out", str(run / "packs")], env=env,
                        capture_output=True, text=True))
    out["pack_bytes_per_segment"] = size(run / "packs")
    for mode in ("exact", "tolerance"):
        p, wall, cpu = timed([*attest, "verify", str(run / "light"), "--trust", key, "--packs", str(run / "packs"),
                              "--challenge", str(ch), "--replay-mode", mode, "--json"], env)
        rep = json.loads(p.stdout) if p.stdout.strip() else {}
        if p.returncode != 0:
            sys.exit(f"verify --replay-mode {mode} exit {p.returncode}: "
                     f"{[f for f in rep.get('findings', []) if not f['ok'] and not f['skipped']]}{p.stderr[-2000:]}")
        per = cpu - out["verify_light_cpu_s"]
        out[f"{mode}_verify_cpu_s_per_segment"] = round(per, 1)
        out[f"{mode}_cost_vs_training"] = round(per / seg_cpu, 2)
        if mode == "tolerance":
            tol = rep["facts"]["replay"][0]["tolerance"]
            out["tolerance"] = {k: tol[k] for k in ("floor_ratio", "median_floor_ratio", "margin", "drift_budget", "k")}
    # the floor of every segment (all replayed from the full bundle): the smallest update decides
    p = subprocess.run([*attest, "verify", str(run / "bundle"), "--trust", key, "--replay", "all", "--replay-mode",
                        "tolerance", "--json"], env=env, capture_output=True, text=True)
    facts = json.loads(p.stdout)["facts"]["replay"]
    out["floor_ratio_per_segment"] = [f["tolerance"]["floor_ratio"] for f in facts]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    a = ap.parse_args()
    if a.smoke:
        a.models, a.segments = ["demo"], 1

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kai-audit-") as t:
        for name in a.models:
            r = run_model(name, MODELS[name], a.segments, Path(t), env)
            rows.append(r)
            print(json.dumps(r, indent=1), flush=True)
    print("\nmodel | params | full bundle | light | light/full | pack/segment | exact verify/segment | "
          "tolerance verify/segment | floor/update (max over segments) | drift budget")
    for r in rows:
        print(f"{r['model']} | {r['parameters']} | {r['full_bundle_bytes'] / 2**20:.1f} MiB | "
              f"{r['light_bundle_bytes'] / 2**20:.1f} MiB | {r['light_bundle_bytes'] / r['full_bundle_bytes']:.3f} | "
              f"{r['pack_bytes_per_segment'] / 2**20:.1f} MiB | {r['exact_cost_vs_training']}x training | "
              f"{r['tolerance_cost_vs_training']}x training | {max(r['floor_ratio_per_segment']):.2g} | "
              f"{r['tolerance']['drift_budget']:.2g}")


if __name__ == "__main__":
    main()
