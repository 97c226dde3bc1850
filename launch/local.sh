#!/usr/bin/env bash
# The same entry points on this machine: all local accelerators (or CPU) in one process.
#
#   bash launch/local.sh tdjax.train --config configs/detailflow_tokenizer.py:size=demo --workdir runs/tok
#   FAKE_DEVICES=8 bash launch/local.sh tdjax.train ... --config.mesh.fsdp=8   # 8 CPU devices
#   bash launch/local.sh tdjax.aot --config configs/next_detail.py:size=L --devices 256 \
#       --mesh data=1,fsdp=256,tensor=1 --batch 256                            # pod readiness
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
if [ -n "${FAKE_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$FAKE_DEVICES"
fi
MODULE="$1"; shift
exec python -m "$MODULE" "$@"
