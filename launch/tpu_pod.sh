#!/usr/bin/env bash
# Run one tdjax entry point on every worker of a Cloud TPU pod slice (v4/v5e/v5p).
#
#   TPU=my-v5p-512 ZONE=us-east5-a WORKDIR=gs://bucket/runs/df_tok SETUP=1 \
#   bash launch/tpu_pod.sh tdjax.train --config configs/detailflow_tokenizer.py:size=full,tokens=128
#   bash launch/tpu_pod.sh tdjax.sample --out /mnt/shared/df.npz --classes all --num 50   # WORKDIR = the run
#   ATTACH=1 bash launch/tpu_pod.sh     # after a dropped connection: follow the job, get its status
#
# Every worker runs the same command (SPMD) and joins the job before any other JAX call (the
# entry point's --config.distributed=True or --multihost, added here); JAX reads the pod topology
# from the TPU metadata (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, when set
# on the workers, override it).  Each host reads its own part of every global batch (tdjax.data),
# and all hosts share one --workdir on GCS (Orbax writes the checkpoints collectively; the first
# worker's metrics.jsonl, pictures and TensorBoard events are kept in a local mirror and copied
# there after each checkpoint save).
#   * One commit: the workers run COMMIT (default: this checkout's HEAD, which must be on REPO);
#     SETUP=1 clones REPO on every worker (or fetches), checks COMMIT out and installs it with the
#     TPU jax wheel and gcsfs (the `gcs` extra); a worker on another commit refuses to start.
#   * Detached: on each worker the job runs in its own session (launch/pod_worker.sh), so a
#     dropped ssh connection does not stop it; its log is /tmp/tdjax_WORKER.log there.
#   * Status: the command fails when any worker's job fails (gcloud returns a failing worker's
#     status); a worker without Python 3.11+ says so and fails.
#   * Multislice (several slices over DCN): the mesh puts the data axis across slices
#     (tdjax.parallel.make_mesh; --config.mesh.data a multiple of the slice count).
set -euo pipefail
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="${REPO:-https://github.com/tdjax/tdjax.git}"
DIR="${REMOTE_DIR:-\$HOME/tdjax}"
PY="${REMOTE_PYTHON:-.venv/bin/python}"       # on the workers, relative to DIR
LOGS="${REMOTE_LOG_DIR:-/tmp}"
ssh() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
if [ "${ATTACH:-0}" = 1 ]; then
  ssh "cd $DIR && TDJAX_LOG_DIR=$LOGS bash launch/pod_worker.sh --attach"
  exit
fi
MODULE="${1:?usage: launch/tpu_pod.sh tdjax.MODULE [flags...]}"; shift
COMMIT="${COMMIT:-$(git -C "$ROOT" rev-parse HEAD)}"
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "launch/tpu_pod.sh: this checkout has uncommitted changes; the workers run $COMMIT without them" >&2
fi
if [ "${SETUP:-0}" = 1 ]; then
  ssh "set -e; python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
         echo \"worker \$(hostname): tdjax needs Python 3.11+, python3 is \$(python3 --version 2>&1)\" >&2; exit 2; }
       [ -d $DIR/.git ] || git clone -q $REPO $DIR; cd $DIR; git fetch -q origin || true
       git checkout -q --detach $COMMIT || { echo \"worker \$(hostname): commit $COMMIT is not in $REPO: push it\" >&2; exit 2; }
       [ -x .venv/bin/python ] || python3 -m venv .venv
       .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi
ARGS=$(printf ' %q' "$@")
case "$MODULE" in
  # the sampler, codes, evaluation: outputs on a filesystem every worker mounts (NFS, gcsfuse)
  tdjax.sample) EXTRA="--workdir ${WORKDIR:?set WORKDIR (the run)} --multihost" ;;
  tdjax.data.codes|tdjax.data.latents|tdjax.evaluate|tdjax.ablate) EXTRA="--multihost" ;;
  tdjax.train) EXTRA="--workdir ${WORKDIR:?set WORKDIR (gs://...)} --config.distributed=True --config.compilation_cache=$WORKDIR/xla_cache" ;;
  *) echo "launch/tpu_pod.sh: $MODULE does not run on several processes (tdjax.train, tdjax.sample," \
          "tdjax.data.codes, tdjax.data.latents, tdjax.evaluate, tdjax.ablate do)" >&2; exit 2 ;;
esac
ssh "cd $DIR && TDJAX_LOG_DIR=$LOGS bash launch/pod_worker.sh $COMMIT $PY -m $MODULE $ARGS $EXTRA"
