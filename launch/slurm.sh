#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one process per GPU, all running the same entry point.
#
#   sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=12 \
#     launch/slurm.sh tdjax.train --config configs/detailflow_ar.py:size=L,codes=/shared/codes.npz \
#     --workdir /shared/runs/gpt_l
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh tdjax.sample \
#     --workdir /shared/runs/gpt_l --out /shared/samples/gpt_l.npz --classes all --num 50 --batch_size 125
#
# jax.distributed.initialize() (`--config.distributed=True`) reads SLURM_* variables for the
# coordinator, process count and id; each process sees its own GPU (CUDA_VISIBLE_DEVICES from
# SLURM's --gpus-per-task binding or the local rank below).  --workdir must be on a filesystem all
# nodes share (or gs://).  The environment is the repo's .venv with the CUDA jax wheel:
#   pip install -e . 'jax[cuda12]'
#SBATCH --job-name=tdjax
#SBATCH --output=slurm-%j.out
set -euo pipefail
ROOT="${TDJAX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
MODULE="$1"; shift
# the multi-process switch of the entry point: training's config flag, or the sampler's --multihost
case "$MODULE" in
  tdjax.sample) DIST="--multihost" ;;
  *) DIST="--config.distributed=True" ;;
esac
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# cuDNN flash attention for the ViT/GPT stacks: --config.model.attention_impl=cudnn (bf16 runs)
srun --kill-on-bad-exit=1 bash -c "export CUDA_VISIBLE_DEVICES=\${SLURM_LOCALID}; \
  exec '$ROOT/.venv/bin/python' -m $MODULE $(printf ' %q' "$@") $DIST"
