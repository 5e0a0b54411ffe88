"""Runs a GGUF file in llama.cpp, through llama-cpp-python: what a llama.cpp user of the file gets.

Each row is evaluated alone on its real (unpadded, right-padded) tokens with every position's logits kept
(logits_all) and an f32 KV cache, so the only rounding left is llama.cpp's own: it quantizes activations to
8 bits before its Q4_0 matmuls, a few % of the logits' range. Padded positions are left at zero (the
check reads only real positions).

The model loads without llama.cpp's extra CPU buffer types (`use_extra_bufts=False`): those repack the
weights for AMX / AVX-512 kernels, and llama.cpp 0.3.x's AMX matmul (`ggml_backend_amx_mul_mat`) segfaults
on the first decode on CPUs that report AMX inside a VM (seen on this project's CI machines). The plain
kernels compute the same Q4_0 dot products, a little slower.
"""

from __future__ import annotations

import os

import numpy as np
from _protocol import serve

GGML_TYPE_F32 = 0  # ggml's type id for float32 (KV cache type_k / type_v)
CONTEXT = 512  # tokens: the check batches are far shorter


def _without_extra_buffer_types() -> None:
    # Llama builds its model parameters from the low-level module's defaults and offers no argument for the field.
    import llama_cpp.llama_cpp as low_level

    defaults = low_level.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = False
        return chosen

    low_level.llama_model_default_params = params


def load(path: str, extra: list[str]):
    from llama_cpp import Llama

    _without_extra_buffer_types()
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
