#!/usr/bin/env bash
# Install difflab with its test extras and run the test suite (CI runs exactly this).
# The CPU build of torch 2.13.0 is pinned first, so pip never fetches a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,data]"
# Fashion-MNIST (60k/10k, MIT) ships as a Debian package; the data tests read it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -m ruff check src tests bench
python -m pytest tests
