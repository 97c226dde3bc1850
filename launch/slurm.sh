#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one process per GPU, all running the same entry point.
#
#   sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=12 \
#     launch/slurm.sh tdjax.train --config configs/next_detail.py:size=L,codes=/shared/codes.npz \
#     --workdir /shared/runs/gpt_l
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh tdjax.sample \
#     --workdir /shared/runs/gpt_l --out /shared/samples/gpt_l.npz --classes all --num 50 --batch_size 125
#   sbatch ... launch/slurm.sh tdjax.data.codes --tokenizer_workdir /shared/runs/tok --out /shared/codes
#
# Each task joins the job before any other JAX call (the entry point's --config.distributed=True
# or --multihost, added here): JAX reads the coordinator, the process count and the process id
# from SLURM_* (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID override them).
# GPUs: with --gpus-per-node every task sees the node's GPUs and JAX gives task SLURM_LOCALID
# GPU number SLURM_LOCALID; with --gpus-per-task SLURM binds each task's own GPUs, which are all
# it sees, so it uses those (JAX_LOCAL_DEVICE_IDS=0..n-1).  --workdir must be on a filesystem all
# nodes share (or gs://).  A re-submitted job resumes from --workdir.
# The environment is the repo's .venv (or TDJAX_VENV) with the CUDA jax wheel:
#   pip install -e . 'jax[cuda12]'
#SBATCH --job-name=tdjax
#SBATCH --output=slurm-%j.out
set -euo pipefail
ROOT="${TDJAX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PY="${TDJAX_VENV:-$ROOT/.venv}/bin/python"
MODULE="${1:?usage: launch/slurm.sh tdjax.MODULE [flags...]}"; shift
[ -x "$PY" ] || { echo "launch/slurm.sh: no Python at $PY (create the venv, or set TDJAX_VENV)" >&2; exit 2; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "launch/slurm.sh: tdjax needs Python 3.11+, $PY is $("$PY" --version 2>&1)" >&2; exit 2; }
# the multi-process switch of the entry point: training's config flag, the others' --multihost
case "$MODULE" in
  tdjax.train) DIST="--config.distributed=True" ;;
  tdjax.sample|tdjax.data.codes|tdjax.data.latents|tdjax.evaluate|tdjax.ablate) DIST="--multihost" ;;
  *) echo "launch/slurm.sh: $MODULE does not run on several processes (tdjax.train, tdjax.sample," \
          "tdjax.data.codes, tdjax.data.latents, tdjax.evaluate, tdjax.ablate do)" >&2; exit 2 ;;
esac
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# cuDNN flash attention for the ViT/GPT stacks: --config.model.attention_impl=cudnn (bf16 runs)
srun --kill-on-bad-exit=1 bash -c '
  if [ -n "${SLURM_GPUS_PER_TASK:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
    n=$(echo "$CUDA_VISIBLE_DEVICES" | tr "," "\n" | grep -c .)
    export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((n - 1)))
  fi
  exec "$0" -m "$@"' "$PY" "$MODULE" "$@" $DIST
