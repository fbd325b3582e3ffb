"""kai_train.determinism (the two modes and their record), the trainer's throughput and MFU figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")

from conftest import REPO, env
from kai_train.sizing import PEAK_TFLOPS, peak_tflops
from kai_train.tracking import Tracker

PROBE = """
import json, sys, torch
from kai_train import determinism as d
out = {}
out["exact"] = d.configure("exact")
out["exact_kernel"] = d.attention_kernel(2, 4, 64, 16)
out["fast"] = d.configure("fast")
out["fast_kernel"] = d.attention_kernel(2, 4, 64, 16)
out["replay_old"] = d.configure(recorded={"sdp_kernels": "math", "threads": 1})  # a record made before modes
out["replay_fast"] = d.configure(recorded={"mode": "fast"})
try:
    d.configure("quick")
except d.DeterminismError as e:
    out["bad"] = str(e)
print(json.dumps(out))
"""


def test_exact_pins_the_math_kernel_on_cpu_fast_frees_it_and_a_replay_follows_the_record() -> None:
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**env(), "DS_ACCELERATOR": "cpu"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    exact, fast = out["exact"], out["fast"]
    assert exact["mode"] == "exact" and exact["deterministic_algorithms"] and exact["sdp_kernels"] == "math"
    assert exact["cudnn_deterministic"] and not exact["cudnn_benchmark"] and exact["accelerator"] == "cpu"
    assert out["exact_kernel"] == "math"
    assert fast["mode"] == "fast" and not fast["deterministic_algorithms"] and fast["sdp_kernels"] != "math"
    assert out["fast_kernel"] in ("flash", "math")  # torch's choice for these shapes on a CPU
    # a replay configures itself from the checkpoint's record, whatever the default is
    assert out["replay_old"]["mode"] == "exact" and out["replay_old"]["sdp_kernels"] == "math"
    assert out["replay_fast"]["mode"] == "fast" and not out["replay_fast"]["deterministic_algorithms"]
    assert "exact, fast" in out["bad"] and "'quick'" in out["bad"]


def test_peak_table_matches_device_names_longest_key_first() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A10G") == 70.0 and peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", bf16=False) == PEAK_TFLOPS["A100"][1]
    assert peak_tflops(None) is None and peak_tflops("Intel Xeon") is None


def test_tracker_reports_tokens_per_device_and_mfu_only_where_a_peak_is_known(tmp_path) -> None:
    gpu = Tracker({"mode": "disabled"}, tmp_path, "r", {}, total_steps=10, start_step=0, world=4,
                  flops_per_step=2e12, peak_tflops=100.0)
    gpu.tokens, gpu.steps = 8000, 5
    t = gpu.throughput(elapsed=2.0)
    assert t["tokens_per_s"] == 4000 and t["tokens_per_s_per_device"] == 1000
    assert t["tflops_per_device"] == pytest.approx(5 * 2e12 / 2.0 / 1e12)
    assert t["mfu"] == pytest.approx(t["tflops_per_device"] / 100.0)
    cpu = Tracker({"mode": "disabled"}, tmp_path, "r", {}, total_steps=10, start_step=0, world=2,
                  flops_per_step=2e12, peak_tflops=None)
    cpu.tokens, cpu.steps = 8000, 5
    assert set(cpu.throughput(2.0)) == {"tokens_per_s", "tokens_per_s_per_device"}
