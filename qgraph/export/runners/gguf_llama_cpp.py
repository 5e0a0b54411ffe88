"""Runs a GGUF file in llama.cpp, through llama-cpp-python: what a llama.cpp user of the file gets.

Each row is evaluated alone on its real (unpadded, right-padded) tokens with every position's logits kept
(logits_all) and an f32 KV cache, so the only rounding left is llama.cpp's own: it quantizes activations to
8 bits before its Q4_0 matmuls, a few % of the logits' range. Padded positions are left at zero (the
check reads only real positions).
"""

from __future__ import annotations

import os

import numpy as np
from _protocol import serve

GGML_TYPE_F32 = 0  # ggml's type id for float32 (KV cache type_k / type_v)
CONTEXT = 512  # tokens: the check batches are far shorter


def load(path: str, extra: list[str]):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=CONTEXT, n_batch=CONTEXT, logits_all=True, type_k=GGML_TYPE_F32,
                 type_v=GGML_TYPE_F32, n_threads=os.cpu_count() or 1, seed=0, verbose=False)


def run(llm, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    batch, seq = input_ids.shape
    logits = np.zeros((batch, seq, llm.n_vocab()), dtype=np.float32)
    for row in range(batch):
        real = int(attention_mask[row].sum())
        llm.reset()  # the next eval starts at position 0 and drops the previous row's KV cache
        llm.eval([int(t) for t in input_ids[row, :real]])
        logits[row, :real] = llm.scores[:real]
    return logits


if __name__ == "__main__":
    serve(load, run)
