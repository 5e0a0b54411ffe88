"""Run a qgraph .pt2 file (torch.export.save) with torch alone: torch.export.load(path).module().

A file written with keep_ops=True holds qgraph's ops; its check passes `--import-qgraph`, and qgraph is
imported before the load so that those ops deserialize. Without the flag this runner never imports qgraph.

A file written with decode=True holds the KV-cache signature (qgraph.decode): its logits come from the prompt
with an empty past, and `--generate N` decodes N greedy tokens through it (_decoding.greedy).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import numpy as np
import torch

from _decoding import greedy, prefill_logits
from _protocol import serve
from _torch_program import torch_step

IMPORT_QGRAPH_FLAG = "--import-qgraph"
PAST_INPUT = re.compile(r"past_\d+")  # past_0, past_1, ...: the keys and values (past_attention_mask is not one)


@dataclass
class Program:
    module: torch.nn.Module
    past_shapes: list[tuple[int, int, np.dtype]]  # (heads, head_dim, dtype) per past input; empty: no KV cache

    @property
    def step(self):
        return torch_step(self.module)


def past_shapes(exported: torch.export.ExportedProgram) -> list[tuple[int, int, np.dtype]]:
    """The (heads, head_dim, dtype) of each past key/value input, read off the program's placeholders."""
    user_inputs = set(exported.graph_signature.user_inputs)
    shapes = []
    for node in exported.graph.find_nodes(op="placeholder"):
        if node.name in user_inputs and PAST_INPUT.fullmatch(node.name):
            value = node.meta["val"]
            shapes.append((int(value.shape[1]), int(value.shape[3]), torch.empty(0, dtype=value.dtype).numpy().dtype))
    return shapes


def load(path: str, extra: list[str]) -> Program:
    if IMPORT_QGRAPH_FLAG in extra:
        importlib.import_module("qgraph")  # registers qgraph's ops, which a keep_ops program calls
    exported = torch.export.load(path)
    return Program(exported.module(), past_shapes(exported))


def run(program: Program, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        if program.past_shapes:
            return prefill_logits(program.step, program.past_shapes, input_ids, attention_mask)
        logits = program.module(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return logits.float().numpy()


def generate(program: Program, input_ids: np.ndarray, attention_mask: np.ndarray, count: int) -> np.ndarray:
    with torch.no_grad():
        return greedy(program.step, program.past_shapes, input_ids, attention_mask, count)


if __name__ == "__main__":
    serve(load, run, generate)
