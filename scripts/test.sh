#!/usr/bin/env bash
# Install difflab with its test extras and run the test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,data,text,control,diffusers
python -m ruff check src tests bench
python -m pytest tests
