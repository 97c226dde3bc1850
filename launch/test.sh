#!/usr/bin/env bash
# Creates the venv, installs tdjax with its test extras, and runs the test suite on 8 fake CPU
# devices.  Extra arguments go to pytest.  The default run leaves out the tests marked `slow`
# (end-to-end runs of several entry points, minutes each) so that CI stays inside 25 minutes on a
# 2-core machine: `bash launch/test.sh -m slow` runs only them, `bash launch/test.sh -m ""` all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SETUP_EXTRAS=test source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export XLA_FLAGS="--xla_force_host_platform_device_count=8"
t0=$(date +%s)
python -m pytest -n "${TDJAX_TEST_WORKERS:-2}" --durations=15 -m "not slow" "$@" tests
echo "[test] suite took $(( $(date +%s) - t0 )) s"
