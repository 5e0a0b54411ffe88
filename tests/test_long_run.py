"""A long training run holds resident memory flat: nothing (graphs, caches, saved tensors) is kept per step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

STEPS, SETTLED_AFTER, MAX_GROWTH = 300, 20, 0.05

# Run in a fresh process: this one's resident set carries whatever earlier tests allocated.
SCRIPT = textwrap.dedent(f"""
    import torch
    import qgraph
    from qgraph.train import default_optimizer
    from tests.conftest import make_llama, random_ids

    def rss_bytes():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    torch.manual_seed(0)
    qm = qgraph.transform(make_llama(), "lrqat-w4")
    optimizer = default_optimizer(qm)
    qm.train()
    samples = {{}}
    for step in range(1, {STEPS} + 1):
        ids = random_ids((2, 16), seed=step)
        loss = qm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in ({SETTLED_AFTER}, {STEPS}):
            samples[step] = rss_bytes()
    print(samples[{SETTLED_AFTER}], samples[{STEPS}])
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc/self/status")
def test_resident_memory_stays_flat_over_300_lrqat_steps():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    settled, last = map(int, done.stdout.split()[-2:])
    growth = last / settled - 1
    assert growth < MAX_GROWTH, f"resident memory grew {growth:.1%} from step {SETTLED_AFTER} to {STEPS}"
