"""The contract between `qgraph.export` and a runner script, shared by every runner.

A runner is run as `python RUNNER.py ARTIFACT INPUTS.npz OUTPUTS.npz [EXTRA ...]` in a fresh process. INPUTS
holds `input_ids_<i>` and `attention_mask_<i>` (int64, [batch, seq]) for each check case i; the runner
writes `logits_<i>` (float32, [batch, seq, vocab]) and the seconds it took to load the artifact and to
run each case. It imports its runtime and numpy, never qgraph: this is how a deployed model is run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Load = Callable[[str, list[str]], Any]
Run = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]


def serve(load: Load, run: Run) -> None:
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
    np.savez(outputs_path, **outputs)
