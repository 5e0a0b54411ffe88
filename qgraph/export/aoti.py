"""The aoti target: the pt2 target's aten program compiled ahead of time by AOTInductor.

`torch._inductor.aoti_compile_and_package` turns the program (qgraph ops decomposed into aten, weights
still packed: qgraph.export.aten) into a shared library of C++ kernels packaged in a .pt2 archive; Python
custom ops could not run there at all, which is why the decomposition is not optional for this target.
Running it needs torch only:

    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # before the first load in the process: see below
    model = torch._inductor.aoti_load_package("model_aoti.pt2")
    logits = model(input_ids=ids, attention_mask=mask)

An AOTInductor package checks its inputs' sizes, strides and dtypes only when AOTI_RUNTIME_CHECK_INPUTS=1
is set (read once per process). Without it, inputs the pt2 program would take or refuse run unchecked and
give wrong logits, silently: a slice of a longer batch (non-contiguous), an int32 or bool mask, a mask with
fewer rows, a decode past of other strides or lengths (measured on a tiny llama: off by up to 0.97 in a logit
range of 1.3). qgraph's runner sets it, so every parity check is a checked run. Packages are compiled with
`aot_inductor.check_lowerbound` off, so that the checks take batch 1 and one-token steps (export's dynamic
dimensions have a lower bound of 2 otherwise).

decode=True compiles the KV-cache signature instead (see the pt2 target; runners/_decoding.py is the loop).
A .pt2 suffix means the pt2 target unless asked: `qgraph.export(module, "model_aoti.pt2", format="aoti")`.
Compiling takes a while (tens of seconds for a tiny model on two CPU cores); the report gives the time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qgraph.decode import CacheShape
from qgraph.errors import ExportError
from qgraph.export.aten import op_mapping
from qgraph.export.program import DECODE_NOTE, decode_unsupported
from qgraph.export.pt2 import decode_program, exported_program
from qgraph.export.target import Artifact, ExportTarget
from qgraph.module import QGraphModule

if TYPE_CHECKING:
    from qgraph.export import ExportJob

PACKAGE_SUFFIX = ".pt2"  # aoti_compile_and_package writes nothing else
# the runner's: layers,heads,head_dim,dtype of each stack of a decode package's KV cache (the model's, then a
# QST side network's), joined by ";"
CACHE_FLAG = "--cache"
# batch 1 and one-token decode steps pass the runtime input checks (AOTI_RUNTIME_CHECK_INPUTS=1), which would
# otherwise hold export's dynamic dimensions to a lower bound of 2
INDUCTOR_CONFIGS = {"aot_inductor.check_lowerbound": False}
# what a package's user must set: see the module docstring
CHECK_INPUTS_NOTE = ("load it with AOTI_RUNTIME_CHECK_INPUTS=1 set in the environment: without it the package "
                     "checks nothing about its inputs (a non-contiguous, int32 or bool input gives wrong logits)")


@dataclass(frozen=True)
class AotiOptions:
    """decode: compile the pt2 target's KV-cache signature program (qgraph.decode) instead."""

    decode: bool = False


def unsupported(module: QGraphModule, options: AotiOptions) -> str | None:
    """Every plan fits: the program is the pt2 target's, aten only."""
    return decode_unsupported(module) if options.decode else None


def cache_flag(caches: Sequence[CacheShape]) -> str:
    """CACHE_FLAG's value: each stack's layers,heads,head_dim,dtype, joined by ";"."""
    return ";".join(f"{c.layers},{c.heads},{c.head_dim},{str(c.dtype).removeprefix('torch.')}" for c in caches)


def write(job: ExportJob) -> Artifact:
    """Compile the aten program and package it at job.path."""
    if job.path.suffix != PACKAGE_SUFFIX:
        raise ExportError(f"AOTInductor packages are {PACKAGE_SUFFIX} files, got {job.path.name!r}; name it "
                          f"e.g. {job.path.stem}{PACKAGE_SUFFIX}")
    decode = job.options.decode
    program = decode_program(job.module) if decode else exported_program(job.module, job.example_inputs)
    start = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(job.path), inductor_configs=INDUCTOR_CONFIGS)
    seconds = time.perf_counter() - start
    notes = [f"AOTInductor compile: {seconds:.1f}s", CHECK_INPUTS_NOTE]
    runner_args = []
    if decode:  # a package does not show its inputs' shapes: the runner is told the cache's
        notes.append(DECODE_NOTE)
        runner_args = [CACHE_FLAG, cache_flag(job.module.decode_graph.caches)]
    return Artifact(op_mapping=op_mapping(job.module.graph_module.graph), notes=notes, runner_args=runner_args)


TARGET = ExportTarget(
    name="aoti",
    suffixes=(PACKAGE_SUFFIX,),
    description="AOTInductor package of the aten program (torch._inductor.aoti_load_package(path))",
    options_type=AotiOptions,
    unsupported=unsupported,
    write=write,
    runner="aoti.py",
    # inductor's generated kernels fuse and vectorise the reductions (norms, softmax, matmul accumulation) in
    # another order than eager aten: ~1e-6 on tiny models, growing with depth; 1e-3 still fails any wrong
    # weight or mask, which moves logits by far more
    tolerance=1e-3,
)
