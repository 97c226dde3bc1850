#!/usr/bin/env bash
# Set-up shared by the demo and the tests: a virtual environment with tdjax installed, and the
# Fashion-MNIST files from the Debian package `dataset-fashion-mnist` (installed when missing and
# permitted: as root, or with passwordless sudo).  Usage: [SETUP_EXTRAS=test] source launch/setup_env.sh
# (extras come from SETUP_EXTRAS, never from positional arguments: a sourcing script's own
# arguments would otherwise be taken for pip extras)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TDJAX_VENV:-$ROOT/.venv}"
EXTRAS="${SETUP_EXTRAS:-}"
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "tdjax needs Python 3.11+, found " + sys.version.split()[0]'
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.tdjax-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.cfg" -nt "$STAMP" ]; then
  echo "[setup] installing tdjax${EXTRAS:+[$EXTRAS]} into $VENV"
  t0=$(date +%s)
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  echo "[setup] installed in $(( $(date +%s) - t0 )) s"
  touch "$STAMP"
fi

FMNIST_DIR="${TDJAX_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "[setup] Fashion-MNIST is missing from $FMNIST_DIR and this user cannot install it;" \
           "run: sudo apt-get install dataset-fashion-mnist" >&2
      exit 1
    fi
  fi
  echo "[setup] installing the Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=3
