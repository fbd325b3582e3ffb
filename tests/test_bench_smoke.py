"""Every script in bench/ runs at its `--smoke` size and prints figures, so no bench rots unnoticed
when the formats it builds change. Nothing here asserts a speed: the figures are the bench's to
report (bench/RESULTS.md), the test only that the bench still works."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, env

BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))
# benches that train (torchrun/DeepSpeed, about a minute each): `make bench-smoke`, outside `make test`
HEAVY = {"audit_cost.py", "provenance_overhead.py", "scale_provenance.py", "train_throughput.py", "moe.py",
         "determinism_cost.py"}


def test_every_bench_has_a_smoke_size() -> None:
    missing = [b for b in BENCHES if "--smoke" not in (REPO / "bench" / b).read_text()]
    assert not missing, f"bench scripts without --smoke: {missing}"


@pytest.mark.parametrize("bench", [pytest.param(b, marks=[pytest.mark.slow, pytest.mark.bench] if b in HEAVY else [])
                                   for b in BENCHES])
def test_bench_runs_at_its_smoke_size_and_prints_figures(bench: str) -> None:
    pytest.importorskip("torch", reason="the benches measure the training stack too")
    p = subprocess.Popen([sys.executable, str(REPO / "bench" / bench), "--smoke"], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, out[-3000:]
    assert re.search(r"\d", out), out[-1000:]
