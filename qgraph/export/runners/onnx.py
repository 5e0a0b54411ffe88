"""Run a qgraph .onnx file in ONNX Runtime on CPU: `python onnx.py MODEL.onnx INPUTS.npz OUTPUTS.npz`.

Standalone (onnxruntime and numpy only): this is how the exported model is deployed. The demo imports
`load` and `run` to score a model in-process (qgraph.export.check.load_runner).

A file written with decode=True holds the KV-cache signature (qgraph.decode): its logits come from the prompt
with an empty past, and `--generate N` decodes N greedy tokens through it (_decoding.greedy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnxruntime

from _decoding import greedy, prefill_logits

PAST_INPUT = re.compile(r"past_\d+")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class Program:
    session: onnxruntime.InferenceSession
    past_names: list[str]
    past_shapes: list[tuple[int, int, np.dtype]]  # (heads, head_dim, dtype) per past input; empty: no KV cache

    def step(self, input_ids, attention_mask, past_attention_mask, position_ids, past):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "past_attention_mask": past_attention_mask, "position_ids": position_ids}
        feeds |= dict(zip(self.past_names, past))
        logits, *present = self.session.run(None, feeds)
        return logits, present


def load(path: str, extra: list[str]) -> Program:
    # ORT finds an external `<model>.onnx.data` beside the model by the relative name the model records
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if PAST_INPUT.fullmatch(i.name)]
    return Program(session, [i.name for i in past], [(int(i.shape[1]), int(i.shape[3]), ORT_TYPES[i.type]) for i in past])


def run(program: Program, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    input_ids, attention_mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
    if program.past_shapes:
        return prefill_logits(program.step, program.past_shapes, input_ids, attention_mask)
    (logits,) = program.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
    return logits


def generate(program: Program, input_ids: np.ndarray, attention_mask: np.ndarray, count: int) -> np.ndarray:
    return greedy(program.step, program.past_shapes, input_ids, attention_mask, count)


if __name__ == "__main__":
    from _protocol import serve

    serve(load, run, generate)
