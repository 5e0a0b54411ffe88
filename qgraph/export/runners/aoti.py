"""Run a qgraph AOTInductor package with torch alone: torch._inductor.aoti_load_package(path).

A decode package (KV-cache signature, qgraph.decode) comes with `--cache layers,heads,head_dim,dtype`, one such
group per stack of keys and values joined by ";" (the model's, then a QST side network's): its logits come from
the prompt with an empty past, and `--generate N` decodes N greedy tokens through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from _decoding import greedy, prefill_logits
from _protocol import serve
from _torch_program import torch_step

CACHE_FLAG = "--cache"
# the package checks its inputs' sizes, strides and dtypes only with this set (read at the first load): a run
# with an input it cannot take is refused, not silently wrong
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"


@dataclass
class Program:
    model: Any
    past_shapes: list[tuple[int, int, np.dtype]]  # (heads, head_dim, dtype) per past input; empty: no KV cache

    @property
    def step(self):
        return torch_step(self.model)


def past_shapes(extra: list[str]) -> list[tuple[int, int, np.dtype]]:
    if CACHE_FLAG not in extra:
        return []
    shapes = []
    for stack in extra[extra.index(CACHE_FLAG) + 1].split(";"):  # the model's, then a QST side network's
        layers, heads, head_dim, dtype = stack.split(",")
        numpy_dtype = torch.empty(0, dtype=getattr(torch, dtype)).numpy().dtype
        shapes += [(int(heads), int(head_dim), numpy_dtype)] * (2 * int(layers))
    return shapes


def load(path: str, extra: list[str]) -> Program:
    return Program(torch._inductor.aoti_load_package(path), past_shapes(extra))


def run(program: Program, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        if program.past_shapes:
            return prefill_logits(program.step, program.past_shapes, input_ids, attention_mask)
        logits = program.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return logits.float().numpy()


def generate(program: Program, input_ids: np.ndarray, attention_mask: np.ndarray, count: int) -> np.ndarray:
    with torch.no_grad():
        return greedy(program.step, program.past_shapes, input_ids, attention_mask, count)


if __name__ == "__main__":
    serve(load, run, generate)
