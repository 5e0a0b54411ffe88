"""`qgraph demo`: the real model trains with a progress bar, is scored, finalized, exported and scored again."""

import math

import pytest
from rich.console import Console

from qgraph.demo import run_demo

pytestmark = pytest.mark.slow


def test_the_main_job_trains_finalizes_and_scores_the_onnx_export_on_the_real_model(tmp_path):
    console = Console(record=True, width=200, force_terminal=False)
    results = run_demo("lrqat-w4", {}, eval_blocks=1, block_len=64, steps=2, batch_size=2, console=console,
                       out_dir=tmp_path)
    onnx_row = next(name for name in results if name.startswith("ONNX Runtime"))
    assert list(results) == ["original (fp32)", "lrqat-w4 (step 0, = RTN int4)", "lrqat-w4 after 2 steps",
                             "lrqat-w4 finalized", onnx_row]
    assert all(math.isfinite(p) and p > 1 for p in results.values())
    assert results["lrqat-w4 finalized"] == results["lrqat-w4 after 2 steps"]  # the fold is exact
    assert results[onnx_row] == pytest.approx(results["lrqat-w4 finalized"], rel=1e-3)
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.is_file()) == [".gguf", ".onnx"]
    out = console.export_text()
    assert "training lrqat-w4" in out and "2/2" in out  # the progress bar reached the last step
    assert "gguf file written" in out


def test_qst_demo_trains_scores_and_samples_on_the_real_model():
    console = Console(record=True, width=200, force_terminal=False)
    results = run_demo("qst-nf4", {}, eval_blocks=1, block_len=64, steps=3, batch_size=2, console=console,
                       formats=())
    assert list(results) == ["original (fp32)", "qst-nf4 (step 0)", "qst-nf4 after 3 steps", "qst-nf4 finalized"]
    assert all(math.isfinite(p) and p > 1 for p in results.values())
    assert results["qst-nf4 after 3 steps"] != results["qst-nf4 (step 0)"]  # the side network moved the output
    out = console.export_text()
    assert "training qst-nf4" in out and "3/3" in out
    assert "sample (greedy, side network in the loop)" in out
