"""launch/: the shell scripts parse, build the torchrun/srun commands they document, and
launch/check_env.py passes a sane CPU node and names the port or node count that is wrong."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "demo.sh"]
sys.path.insert(0, str(LAUNCH))
import check_env as ce  # noqa: E402
from check_env import expand_nodelist  # noqa: E402
from conftest import free_port  # noqa: E402


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything a cluster or shell might have left set."""
    drop = ("NCCL_", "GLOO_", "SLURM_", "MASTER_", "NPROC", "NNODES", "RDZV_", "KAI_", "DS_ACCELERATOR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHON=sys.executable, **extra)
    return env


def check_env(**extra: str) -> subprocess.CompletedProcess[str]:
    """launch/check_env.py as the launch scripts run it (a fresh interpreter: ~5 s for torch)."""
    return subprocess.run([sys.executable, str(LAUNCH / "check_env.py")], env=clean_env(**extra),
                          capture_output=True, text=True, timeout=120)


def findings(**extra: str) -> list[str]:
    """The same checks in this process (torch is already imported here), as printed lines."""
    return [f.line() for f in ce.run_checks(clean_env(**extra))]


def bash(script: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=clean_env(**extra),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_script_parses_and_is_strict(script: str) -> None:
    p = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text
    assert text.splitlines()[1].startswith(("#", "#SBATCH")), "a usage header comment follows the shebang"


def test_check_env_passes_on_this_cpu_node_with_ds_accelerator_cpu() -> None:
    p = check_env(DS_ACCELERATOR="cpu", NPROC="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 error(s)" in p.stdout
    assert any(line.startswith("ok    torch:") for line in p.stdout.splitlines())
    assert "master-port" in p.stdout


def test_check_env_hints_at_ds_accelerator_cpu_when_there_is_no_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    lines = findings()
    assert not any(line.startswith("error") for line in lines), lines
    assert any(line.startswith("warn") and "DS_ACCELERATOR=cpu" in line for line in lines), lines


def test_check_env_reports_a_busy_master_port_by_number_and_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = check_env(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert p.returncode == 1, p.stdout
    bad = [line for line in p.stdout.splitlines() if line.startswith("error")]
    assert len(bad) == 1 and "master-port" in bad[0] and str(port) in bad[0] and "in use" in bad[0], p.stdout


def test_check_env_refuses_node_counts_that_disagree() -> None:
    lines = findings(DS_ACCELERATOR="cpu", NNODES="2", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[01-03]")
    assert [line for line in lines if line.startswith("error")] == [
        line for line in lines if line.startswith("error nodes:") and "SLURM_JOB_NODELIST=3" in line], lines
    assert not any(line.startswith("error") for line in findings(
        DS_ACCELERATOR="cpu", NNODES="3", SLURM_NNODES="3", SLURM_JOB_NODELIST="gpu[01-03]"))


def test_check_env_refuses_a_socket_interface_this_host_lacks() -> None:
    lines = findings(NCCL_SOCKET_IFNAME="kai-no-such-if0", NCCL_IB_DISABLE="1")
    assert any(line.startswith("error ifname:") and "kai-no-such-if0" in line for line in lines), lines
    assert any(line.startswith("warn") and "NCCL_IB_DISABLE=1" in line for line in lines), lines
    lo = sorted(n for _, n in socket.if_nameindex())[0]
    assert any(line.startswith("ok    ifname:") for line in findings(NCCL_SOCKET_IFNAME=lo)), lo


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("a-[9-11]-ib,b[1]", ["a-9-ib", "a-10-ib", "a-11-ib", "b1"]),
])
def test_slurm_nodelist_expands_like_scontrol_show_hostnames(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_sbatch_puts_the_rendezvous_on_the_first_node_and_passes_overrides() -> None:
    if shutil.which("scontrol"):
        pytest.skip("scontrol present: the script would ask it instead of the Python fallback")
    p = bash("slurm.sbatch", "model=7b", "train.lr=1e-4", KAI_DRY_RUN="1",
             SLURM_JOB_NODELIST="gpu-a[07-08,10]", SLURM_NNODES="3", SLURM_JOB_ID="42")
    assert p.returncode == 0, p.stderr
    assert "rendezvous gpu-a07:29500 id 42" in p.stdout
    assert "srun --nodes 3 --ntasks-per-node 1 --kill-on-bad-exit=1 bash launch/multi_node.sh model=7b train.lr=1e-4" in p.stdout


def test_multi_node_uses_c10d_rendezvous_at_master_addr() -> None:
    p = bash("multi_node.sh", "model=7b", KAI_DRY_RUN="1", NNODES="3", MASTER_ADDR="gpu-a07", NPROC="8", RDZV_ID="42")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["torchrun", "--nnodes", "3", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", "gpu-a07:29500", "--rdzv-id", "42", "-m", "kai_train.train",
                                "model=7b"]
    missing = bash("multi_node.sh", KAI_DRY_RUN="1", NPROC="8", MASTER_ADDR="gpu-a07")
    assert missing.returncode != 0 and "NNODES" in missing.stderr


def test_single_node_runs_standalone_with_nproc_ranks() -> None:
    p = bash("single_node.sh", "deepspeed=zero3", KAI_DRY_RUN="1", NPROC="2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "kai_train.train",
                                "deepspeed=zero3"]
