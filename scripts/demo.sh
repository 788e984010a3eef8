#!/usr/bin/env bash
# Install difflab and run the main job: `difflab demo` (about 10 minutes on 2 CPU cores).
# Arguments are passed to `difflab demo` (e.g. --max-minutes 3 --out my-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data
difflab demo "$@"
