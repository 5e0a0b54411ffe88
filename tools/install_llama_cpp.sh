#!/usr/bin/env bash
# Install llama-cpp-python into ./.venv, so that GGUF exports can be checked in llama.cpp itself
# (qgraph.export(..., runtime="llama.cpp") and the llama.cpp test in tests/export/test_gguf.py).
#
# llama-cpp-python ships no CPU wheel on PyPI: pip compiles llama.cpp from source, about 9 minutes on
# 2 cores (a C++ compiler needed; pip's build isolation brings cmake), once per pip cache. Idempotent: does nothing when installed.
# CMAKE_ARGS passes through, e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF" for a portable build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
if "$python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python is already installed: $("$python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    exit 0
fi
command -v c++ >/dev/null || { echo "llama-cpp-python compiles llama.cpp and needs a C++ compiler (c++) on PATH" >&2; exit 1; }
jobs="$(nproc 2>/dev/null || echo 2)"
echo "compiling llama.cpp for llama-cpp-python with $jobs jobs (about 9 minutes on 2 cores)..."
CMAKE_BUILD_PARALLEL_LEVEL="$jobs" "$python" -m pip install --disable-pip-version-check llama-cpp-python
"$python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
