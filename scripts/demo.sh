#!/usr/bin/env bash
# Install difflab and run the main job: `difflab demo` (about 13 minutes on 2 CPU cores:
# 10 of training, ~3 fitting the 10-step sampler to the trained network).
# Arguments are passed to `difflab demo` (e.g. --max-minutes 3 --out my-demo; --set
# train.fit_steps=[] skips the fit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data
difflab demo "$@"
