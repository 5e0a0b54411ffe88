"""Run a qgraph .pt2 file (torch.export.save) with torch alone: torch.export.load(path).module().

A file written with keep_ops=True holds qgraph's ops; its check passes `--import-qgraph`, and qgraph is
imported before the load so that those ops deserialize. Without the flag this runner never imports qgraph.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from _protocol import serve

IMPORT_QGRAPH_FLAG = "--import-qgraph"


def load(path: str, extra: list[str]) -> torch.nn.Module:
    if IMPORT_QGRAPH_FLAG in extra:
        importlib.import_module("qgraph")  # registers qgraph's ops, which a keep_ops program calls
    return torch.export.load(path).module()


def run(program: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = program(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return logits.float().numpy()


if __name__ == "__main__":
    serve(load, run)
