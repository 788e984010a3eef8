#!/usr/bin/env bash
# Set up difflab on a fresh machine: the CPU build of torch 2.13.0 first (so pip never fetches a
# multi-GB CUDA build), then difflab with the extras named in $1 (default "data"), then the
# Fashion-MNIST data set (Debian package, MIT) when apt-get is available.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data}"
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extras}]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
    || echo "note: could not install dataset-fashion-mnist; the demo falls back to MNIST-5k" >&2
fi
