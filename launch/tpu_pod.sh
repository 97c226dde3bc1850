#!/usr/bin/env bash
# Run one tdjax entry point on every worker of a Cloud TPU pod slice (v4/v5e/v5p).
#
#   TPU=my-v5p-512 ZONE=us-east5-a WORKDIR=gs://bucket/runs/df_tok \
#   bash launch/tpu_pod.sh tdjax.train --config configs/detailflow_tokenizer.py:size=full,tokens=128
#   bash launch/tpu_pod.sh tdjax.sample --out /mnt/shared/df.npz --classes all --num 50   # WORKDIR = the run
#
# Every worker runs the same command (SPMD): `--config.distributed=True` makes each process call
# jax.distributed.initialize(), which reads the pod topology from the TPU metadata; each host
# reads its own slice of every global batch (tdjax.data), and all hosts share one --workdir on
# GCS (Orbax writes the checkpoints collectively; the first worker's metrics.jsonl, pictures and
# TensorBoard events are kept in a local mirror and copied there after each checkpoint save).
# Set-up (first run): SETUP=1 installs the repo on every worker from REPO (a git URL or a gs://
# tarball) with the TPU jax wheel and gcsfs (the `gcs` extra).
set -euo pipefail
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
MODULE="$1"; shift
REPO="${REPO:-https://github.com/tdjax/tdjax.git}"
DIR="${REMOTE_DIR:-\$HOME/tdjax}"
ssh() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
if [ "${SETUP:-0}" = 1 ]; then
  ssh "set -e; [ -d $DIR ] || git clone $REPO $DIR; cd $DIR && python3 -m venv .venv && \
       .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi
ARGS=$(printf ' %q' "$@")
case "$MODULE" in   # the sampler: --out on a filesystem every worker mounts (NFS, gcsfuse), not gs://
  tdjax.sample) EXTRA="--workdir $WORKDIR --multihost" ;;
  *) EXTRA="--workdir $WORKDIR --config.distributed=True --config.compilation_cache=$WORKDIR/xla_cache" ;;
esac
# one log per worker in /tmp (the first worker also prints to this terminal)
ssh "cd $DIR && .venv/bin/python -m $MODULE $ARGS $EXTRA 2>&1 | tee /tmp/tdjax_\$(hostname).log"
