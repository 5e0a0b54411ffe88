"""Run a qgraph .onnx file in ONNX Runtime on CPU: `python onnx.py MODEL.onnx INPUTS.npz OUTPUTS.npz`.

Standalone (onnxruntime and numpy only): this is how the exported model is deployed. The demo imports
`load` and `run` to score a model in-process (qgraph.export.check.load_runner).
"""

from __future__ import annotations

import numpy as np
import onnxruntime


def load(path: str, extra: list[str]) -> onnxruntime.InferenceSession:
    # ORT finds an external `<model>.onnx.data` beside the model by the relative name the model records
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def run(session: onnxruntime.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
             "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
    (logits,) = session.run(["logits"], feeds)
    return logits


if __name__ == "__main__":
    from _protocol import serve

    serve(load, run)
