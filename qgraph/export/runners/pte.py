"""Run a qgraph .pte file with ExecuTorch's runtime alone (its Python bindings), as a device would.

    method = Runtime.get().load_program(path).load_method("forward")
    (logits,) = method.execute([input_ids, attention_mask])
"""

from __future__ import annotations

import numpy as np
import torch
from executorch.runtime import Runtime

from _protocol import serve


def load(path: str, extra: list[str]):
    return Runtime.get().load_program(path).load_method("forward")


def run(method, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    outputs = method.execute([torch.from_numpy(np.ascontiguousarray(input_ids)),
                              torch.from_numpy(np.ascontiguousarray(attention_mask))])
    return outputs[0].float().numpy()


if __name__ == "__main__":
    serve(load, run)
