#!/usr/bin/env bash
# Train on one machine: torchrun --standalone starts one rank per GPU (or NPROC CPU ranks).
#
#   launch/single_node.sh model=1b deepspeed=zero2 run_dir=runs/1b     # every GPU of this node
#   NPROC=4 launch/single_node.sh model=1b run_dir=runs/1b              # 4 ranks
#   DS_ACCELERATOR=cpu NPROC=2 launch/single_node.sh run_dir=runs/demo  # CPU ranks over gloo
#
# Arguments are Hydra overrides for `python -m kai_train.train` (kai_train/conf/train.yaml). Run from the
# repo root with the venv active. Environment:
#   NPROC            ranks on this node (default: the GPUs `nvidia-smi -L` lists)
#   PYTHON           interpreter for launch/check_env.py (default: python)
#   KAI_SKIP_CHECKS  1: skip launch/check_env.py
#   KAI_DRY_RUN      1: print the torchrun command instead of running it
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}

if [[ -z "${NPROC:-}" ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "single_node.sh: nvidia-smi not found: set NPROC (with DS_ACCELERATOR=cpu for CPU ranks)" >&2
    exit 1
  fi
  NPROC=$(nvidia-smi -L | wc -l)
fi
export NPROC

cmd=(torchrun --standalone --nproc-per-node "$NPROC" -m kai_train.train "$@")
if [[ "${KAI_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if [[ "${KAI_SKIP_CHECKS:-0}" != 1 ]]; then
  # --standalone picks its own free rendezvous port: a MASTER_* left in the shell does not apply.
  env -u MASTER_ADDR -u MASTER_PORT -u NNODES "$PYTHON" "$HERE/check_env.py"
fi
exec "${cmd[@]}"
