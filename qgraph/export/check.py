"""Run an artifact in its own runtime, in a fresh process, and compare its logits with PyTorch's.

An artifact nobody ran is not exported: every target's file is loaded by a runner script (see
runners/_protocol.py) in a new Python process in which qgraph cannot be imported, fed the same check
batches as the PyTorch module, and its logits compared at every real (unpadded) position.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qgraph.errors import ExportError
from qgraph.module import QGraphModule

# (batch, sequence length, right padding of the last row): two shapes, one padded, so an artifact whose
# batch or sequence axis was frozen at export, or that lets padding reach real tokens, fails the check
CHECK_SHAPES = ((2, 12, 5), (1, 7, 0))
FIRST_ORDINARY_ID = 3  # below: the special ids (pad, bos, eos) of most vocabularies

# Imports of qgraph (and its passes) fail in the runner's process: the artifact must stand on its own.
_BOOTSTRAP = """
import runpy, sys
class _NoQGraph:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("qgraph", "passes"):
            raise ModuleNotFoundError(f"{{name}} is not importable here: the artifact must run without qgraph")
        return None
if {block}:
    sys.meta_path.insert(0, _NoQGraph())
runner = sys.argv[1]
sys.path.append({runners!r})  # last: a runner named like a package (onnx.py) must not shadow that package
sys.argv = sys.argv[1:]
runpy.run_path(runner, run_name="__main__")
"""


@dataclass(frozen=True)
class CheckCase:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class RuntimeResult:
    logits: list[np.ndarray]
    load_seconds: float
    run_seconds: list[float]
    tokens: list[np.ndarray] = field(default_factory=list)  # greedy tokens per case, when asked (--generate N)


# A runtime computing the same model in its own (correct) float arithmetic may differ from PyTorch by this
# many times the module's rounding floor (see `rounding_floor`); a wrong program lands far above it
FLOOR_FACTOR = 2.0
FLOOR_TRIALS = 3


@dataclass(frozen=True)
class Parity:
    """How the runtime's logits compare with PyTorch's at every real position of every check case."""

    max_abs_diff: float
    logits_range: float  # max - min of the PyTorch logits: what a relative tolerance is relative to
    top1_agreement: float  # fraction of real positions whose argmax token agrees
    positions: int
    # how far the PyTorch module's own logits move when its float tensors move by one ulp (`rounding_floor`)
    rounding_floor: float = 0.0

    def allowed(self, tolerance: float, relative_tolerance: float = 0.0) -> float:
        """The largest difference accepted: the absolute tolerance, a fraction of the logits' range, or
        FLOOR_FACTOR times the module's rounding floor, whichever is largest."""
        return max(tolerance, relative_tolerance * self.logits_range, FLOOR_FACTOR * self.rounding_floor)

    def within(self, tolerance: float, relative_tolerance: float = 0.0) -> bool:
        return self.max_abs_diff <= self.allowed(tolerance, relative_tolerance)


def check_cases(vocab_size: int, *, seed: int = 0) -> list[CheckCase]:
    """The check batches: CHECK_SHAPES of random ordinary token ids, padded rows right-padded with id 0."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, seq, padding in CHECK_SHAPES:
        low = min(FIRST_ORDINARY_ID, vocab_size - 1)
        input_ids = torch.randint(low, vocab_size, (batch, seq), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if padding:
            attention_mask[-1, seq - padding:] = 0
            input_ids[-1, seq - padding:] = 0
        cases.append(CheckCase(input_ids, attention_mask))
    return cases


def reference_logits(module: QGraphModule, cases: list[CheckCase]) -> list[np.ndarray]:
    """The PyTorch module's logits for each case, in float32."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return [module(input_ids=c.input_ids, attention_mask=c.attention_mask).logits.float().numpy()
                    for c in cases]
    finally:
        module.train(was_training)


def rounding_floor(module: QGraphModule, cases: list[CheckCase], expected: list[np.ndarray],
                   trials: int = FLOOR_TRIALS) -> float:
    """The largest logits difference between the module and itself with every float tensor moved one ulp in a
    random direction (the worst of `trials` draws): the difference any float arithmetic other than PyTorch's
    may cause.

    For most models this is ~1e-6 of the logits' range and no tolerance notices it. A model that rounds its
    activations (lrqat-w4a8's int8 inputs to 210 linears) is discontinuous: one ulp flips an int8 code here and
    there, and the flip grows through the layers. SmolLM2-135M lrqat-w4a8 (10 steps) moves by 1.81 of its
    logits' range of ~40; ExecuTorch's XNNPACK differs from it by 1.79, no more."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    originals = [t.detach().clone() for t in tensors]
    generator = torch.Generator().manual_seed(0)
    floor = 0.0
    try:
        with torch.no_grad():
            for _ in range(trials):
                for tensor, original in zip(tensors, originals, strict=True):
                    up = torch.rand(original.shape, generator=generator) < 0.5
                    toward = torch.where(up, torch.inf, -torch.inf).to(original.device, original.dtype)
                    tensor.copy_(torch.nextafter(original, toward))
                floor = max(floor, compare(expected, reference_logits(module, cases), cases).max_abs_diff)
    finally:
        with torch.no_grad():
            for tensor, original in zip(tensors, originals, strict=True):
                tensor.copy_(original)
    return floor


def compare(expected: list[np.ndarray], actual: list[np.ndarray], cases: list[CheckCase],
            rounding_floor: float = 0.0) -> Parity:
    diffs, agree, positions, low, high = [], 0, 0, np.inf, -np.inf
    for want, got, case in zip(expected, actual, cases, strict=True):
        if got.shape != want.shape:
            raise ExportError(f"the runtime returned logits of shape {got.shape} for input_ids of shape "
                              f"{tuple(case.input_ids.shape)}; expected {want.shape}")
        real = case.attention_mask.numpy().astype(bool)
        want, got = want[real], got[real]
        diffs.append(float(np.abs(want - got).max()))
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        positions += int(real.sum())
        low, high = min(low, float(want.min())), max(high, float(want.max()))
    return Parity(max(diffs), high - low, agree / positions, positions, rounding_floor)


def run_in_runtime(runner: Path, artifact: Path, cases: list[CheckCase], *, extra_args: list[str] = (),
                   allow_qgraph: bool = False, timeout: float = 900.0) -> RuntimeResult:
    """Run `runner` on `artifact` in a fresh Python process (qgraph blocked unless allowed) over `cases`."""
    with tempfile.TemporaryDirectory(prefix="qgraph-check-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.npz", Path(scratch) / "outputs.npz"
        arrays = {}
        for i, case in enumerate(cases):
            arrays[f"input_ids_{i}"] = case.input_ids.numpy()
            arrays[f"attention_mask_{i}"] = case.attention_mask.numpy()
        np.savez(inputs, **arrays)
        bootstrap = _BOOTSTRAP.format(block=not allow_qgraph, runners=str(runner.parent))
        command = [sys.executable, "-c", bootstrap, str(runner), str(artifact.absolute()), str(inputs), str(outputs),
                   *extra_args]
        # run from the scratch directory: the repository's own packages are not on the runner's path
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONNOUSERSITE": "1"})
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise ExportError(f"{runner.stem} could not run {artifact.name} in a fresh process "
                              f"(exit {done.returncode}):\n{tail}")
        with np.load(outputs) as data:
            logits = [data[f"logits_{i}"] for i in range(len(cases))]
            tokens = [data[f"tokens_{i}"] for i in range(len(cases))] if "tokens_0" in data.files else []
            return RuntimeResult(logits, float(data["load_seconds"]), [float(s) for s in data["run_seconds"]],
                                 tokens)


def load_runner(runner: Path) -> tuple:
    """A runner's (load, run) functions, for running an artifact in this process (the demo scores a model
    through them): the same runtime calls the export check makes, without a second process."""
    import runpy

    sys.path.append(str(runner.parent))  # last, as in the fresh process: runners must not shadow packages
    try:
        namespace = runpy.run_path(str(runner), run_name=f"qgraph_runner_{runner.stem}")
    finally:
        sys.path.remove(str(runner.parent))
    return namespace["load"], namespace["run"]
