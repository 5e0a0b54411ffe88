"""`qgraph demo --plan qst-nf4`: the real model trains with a progress bar, is scored, and decodes."""

import math

import pytest
from rich.console import Console

from qgraph.demo import run_demo

pytestmark = pytest.mark.slow


def test_qst_demo_trains_scores_and_samples_on_the_real_model():
    console = Console(record=True, width=200, force_terminal=False)
    results = run_demo("qst-nf4", {}, eval_blocks=1, block_len=64, steps=3, batch_size=2, console=console)
    assert list(results) == ["original (fp32)", "qst-nf4", "qst-nf4 after 3 steps"]
    assert all(math.isfinite(p) and p > 1 for p in results.values())
    assert results["qst-nf4 after 3 steps"] != results["qst-nf4"]  # the side network moved the output
    out = console.export_text()
    assert "training qst-nf4" in out and "3/3" in out  # the progress bar reached the last step
    assert "sample (greedy, side network in the loop)" in out
