#!/usr/bin/env bash
# One TPU worker's side of launch/tpu_pod.sh (run there over ssh, in the tdjax checkout):
#
#   bash launch/pod_worker.sh COMMIT PYTHON -m tdjax.MODULE ARGS...   checks, starts, follows
#   bash launch/pod_worker.sh --attach                                follows a job already started
#
# Refuses to start when the checkout is not at COMMIT or PYTHON is older than 3.11.  The job runs
# in a session of its own (setsid, nohup), so it outlives a dropped ssh connection; this script
# follows its log (TDJAX_LOG_DIR/tdjax_WORKER.log, default /tmp) and exits with the job's status,
# which the job writes beside its log (.exit) when it ends.
set -uo pipefail
WORKER="${TPU_WORKER_ID:-$(hostname)}"
LOG="${TDJAX_LOG_DIR:-/tmp}/tdjax_$WORKER.log"
STATUS="$LOG.exit"

follow() {   # the log until the job's status file appears, then that status
  tail -n +1 -F "$LOG" 2>/dev/null & local tailer=$!
  while [ ! -s "$STATUS" ]; do
    sleep 1
    if [ ! -s "$STATUS" ] && ! kill -0 "$(cat "$LOG.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
      sleep 1
      [ -s "$STATUS" ] || { kill $tailer; echo "worker $WORKER: the job ended without a status (killed?); see $LOG" >&2; exit 1; }
    fi
  done
  sleep 1; kill $tailer 2>/dev/null
  exit "$(cat "$STATUS")"
}

if [ "${1:-}" = "--attach" ]; then
  [ -e "$LOG.pid" ] || { echo "worker $WORKER: no job started from $LOG" >&2; exit 2; }
  follow
fi
COMMIT="${1:?usage: pod_worker.sh COMMIT PYTHON -m MODULE ARGS...}"; PY="${2:?}"; shift 2
HEAD=$(git rev-parse HEAD 2>/dev/null || echo "no git checkout")
if [ "$HEAD" != "$COMMIT" ]; then
  echo "worker $WORKER: $(pwd) is at $HEAD, the job runs $COMMIT; run launch/tpu_pod.sh with SETUP=1 to check it out on every worker" >&2
  exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "worker $WORKER: tdjax needs Python 3.11+, $PY is $("$PY" --version 2>&1 || echo missing)" >&2
  exit 2
fi
mkdir -p "$(dirname "$LOG")"
rm -f "$STATUS" "$LOG.pid"
: > "$LOG"
export LOG STATUS
setsid nohup bash -c 'echo $$ >"$LOG.pid"; "$@" >>"$LOG" 2>&1; echo $? >"$STATUS"' job "$PY" "$@" \
  </dev/null >/dev/null 2>&1 &
for _ in $(seq 100); do [ -s "$LOG.pid" ] && break; sleep 0.1; done
follow
