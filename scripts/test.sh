#!/usr/bin/env bash
# Install difflab with its test extras (CPU torch pinned first, so pip never fetches a CUDA
# build) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,data]"
python -m ruff check src tests bench
python -m pytest tests
