"""The contract between `qgraph.export` and a runner script, shared by every runner.

A runner is run as `python RUNNER.py ARTIFACT INPUTS.npz OUTPUTS.npz [EXTRA ...]` in a fresh process. INPUTS
holds `input_ids_<i>` and `attention_mask_<i>` (int64, [batch, seq]) for each check case i; the runner
writes `logits_<i>` (float32, [batch, seq, vocab]) and the seconds it took to load the artifact and to
run each case. It imports its runtime and numpy, never qgraph: this is how a deployed model is run.

`--generate N` among EXTRA (a runner that can decode: an artifact with the KV-cache signature) also writes
`tokens_<i>`, N greedy tokens after each case, and `generate_seconds`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Load = Callable[[str, list[str]], Any]
Run = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]
Generate = Callable[[Any, np.ndarray, np.ndarray, int], np.ndarray]
GENERATE_FLAG = "--generate"


def generate_count(extra: list[str]) -> int:
    """N of `--generate N` among a runner's extra arguments, 0 without it."""
    return int(extra[extra.index(GENERATE_FLAG) + 1]) if GENERATE_FLAG in extra else 0


def serve(load: Load, run: Run, generate: Generate | None = None) -> None:
    artifact, inputs_path, outputs_path, *extra = sys.argv[1:]
    with np.load(inputs_path) as data:
        cases = [(data[f"input_ids_{i}"], data[f"attention_mask_{i}"]) for i in range(len(data.files) // 2)]
    start = time.perf_counter()
    session = load(artifact, extra)
    outputs: dict[str, np.ndarray] = {"load_seconds": np.float64(time.perf_counter() - start)}
    seconds = []
    for i, (input_ids, attention_mask) in enumerate(cases):
        start = time.perf_counter()
        outputs[f"logits_{i}"] = np.asarray(run(session, input_ids, attention_mask), dtype=np.float32)
        seconds.append(time.perf_counter() - start)
    outputs["run_seconds"] = np.asarray(seconds)
    count = generate_count(extra)
    if count:
        if generate is None:
            raise SystemExit(f"this runner cannot decode ({GENERATE_FLAG} {count}): its artifact has no KV cache")
        start = time.perf_counter()
        for i, (input_ids, attention_mask) in enumerate(cases):
            outputs[f"tokens_{i}"] = np.asarray(generate(session, input_ids, attention_mask, count), dtype=np.int64)
        outputs["generate_seconds"] = np.float64(time.perf_counter() - start)
    np.savez(outputs_path, **outputs)
