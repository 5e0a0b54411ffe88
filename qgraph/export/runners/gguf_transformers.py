"""Runs a GGUF file with transformers' GGUF reader: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`.

transformers reads the metadata into a config, dequantizes every tensor (Q4_0 -> float32) and undoes
llama.cpp's per-family changes (q/k row order, Gemma's 1 + w norms): what a Python user of the file gets.
The file needs no tokenizer for this: the config comes from the architecture's keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _protocol import serve


def teach_gemma() -> None:
    """transformers reads GGUF gemma2 and gemma3 but not the first Gemma, which llama.cpp runs with the same
    tensors and keys: register it with gemma2's key map (less softcapping and sliding window, which Gemma
    lacks) and gemma2's tensor processor (norms stored as 1 + w)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.integrations import ggml

    if "gemma" in gguf_utils.GGUF_SUPPORTED_ARCHITECTURES:
        return
    keys = {key: name for key, name in ggml.GGUF_CONFIG_MAPPING["gemma2"].items()
            if key not in ("attention.sliding_window",)}
    ggml.GGUF_CONFIG_MAPPING["gemma"] = keys  # the same dict object the reader's table holds
    gguf_utils.GGUF_SUPPORTED_ARCHITECTURES.append("gemma")
    gguf_utils.TENSOR_PROCESSORS["gemma"] = gguf_utils.Gemma2TensorProcessor


def load(path: str, extra: list[str]):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    teach_gemma()
    file = Path(path)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    return model.eval()


def run(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return output.logits.float().numpy()


if __name__ == "__main__":
    serve(load, run)
