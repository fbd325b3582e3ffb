#!/usr/bin/env bash
# Train on several machines: run this same command on every node; torchrun's c10d rendezvous at
# MASTER_ADDR:MASTER_PORT gathers the nodes and assigns ranks (no per-node rank to set).
#
#   NNODES=4 MASTER_ADDR=node01 RDZV_ID=run-7b launch/multi_node.sh model=7b deepspeed=zero3 run_dir=/shared/runs/7b
#
# Arguments are Hydra overrides for `python -m kai_train.train`. run_dir must be on a filesystem
# that every node sees (checkpoints are written by every rank). Environment:
#   NNODES       nodes in the job (required; MIN:MAX for an elastic job)
#   MASTER_ADDR  host of the rendezvous, as the other nodes reach it, usually the first node (required)
#   MASTER_PORT  rendezvous port, free on MASTER_ADDR (default 29500)
#   RDZV_ID      id shared by the job's nodes, unique per job (default kai-train)
#   NPROC        ranks per node (default: the GPUs `nvidia-smi -L` lists)
#   RDZV_CONF    extra rendezvous settings, e.g. join_timeout=1800 (seconds to wait for all nodes; 600)
#   PYTHON, KAI_SKIP_CHECKS, KAI_DRY_RUN   as in launch/single_node.sh
# launch/slurm.sbatch sets all of these from the SLURM allocation and runs this on each node.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
: "${NNODES:?multi_node.sh: set NNODES to the number of nodes in the job}"
: "${MASTER_ADDR:?multi_node.sh: set MASTER_ADDR to the rendezvous host (usually the first node)}"
export NNODES MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-kai-train}

if [[ -z "${NPROC:-}" ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "multi_node.sh: nvidia-smi not found on $(hostname): set NPROC (with DS_ACCELERATOR=cpu for CPU ranks)" >&2
    exit 1
  fi
  NPROC=$(nvidia-smi -L | wc -l)
fi
export NPROC

cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
     ${RDZV_CONF:+--rdzv-conf "$RDZV_CONF"} -m kai_train.train "$@")
if [[ "${KAI_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if [[ "${KAI_SKIP_CHECKS:-0}" != 1 ]]; then
  "$PYTHON" "$HERE/check_env.py"
fi
exec "${cmd[@]}"
