#!/usr/bin/env bash
# Builds the one pinned stack in a fresh venv: the Python minor version and every package
# version in launch/constraints.txt (what CPU CI runs; written by launch/lock.py), jax with
# the accelerator's extra, and this checkout installed editable.
#
#   bash launch/venv.sh tpu ~/venv        # TPU VM (libtpu)
#   bash launch/venv.sh cuda12 ~/venv     # NVIDIA GPUs (jax-cuda12-plugin)
#   bash launch/venv.sh cpu ~/venv
#
# uv brings its own Python when the host's is older (TPU VM images ship 3.10; jax 0.10 needs
# 3.11, and an unpinned `pip install jax[tpu]` there resolves to a years-old jax). The venv is
# rebuilt every time (--clear), so no stale package survives; uv's cache keeps that quick.
# Check the result with `python -m selectit_jax.verify` (launch/tpu_pod.sh verify does).
set -euo pipefail
if [[ $# -ne 2 ]]; then echo "usage: $0 tpu|cuda12|cpu VENV" >&2; exit 2; fi
ACCEL=$1 VENV=$2
REPO=$(cd "$(dirname "$0")/.." && pwd)
LOCK=$REPO/launch/constraints.txt
UV_VERSION=0.13.9
PYTHON=$(sed -n 's/^# python==//p' "$LOCK")
case $ACCEL in
  tpu | cuda12) JAX="jax[$ACCEL]" ;;
  cpu) JAX=jax ;;
  *) echo "$0: unknown accelerator $ACCEL (tpu, cuda12 or cpu)" >&2; exit 2 ;;
esac

if ! command -v uv >/dev/null; then
  python3 -m pip install --user -q "uv==$UV_VERSION"
  export PATH=$HOME/.local/bin:$PATH
fi
uv venv --clear --python "$PYTHON" "$VENV"
uv pip install --python "$VENV/bin/python" --constraint "$LOCK" "$JAX" -e "$REPO"
echo "venv.sh: $VENV has the stack pinned in $LOCK ($JAX, Python $PYTHON)"
