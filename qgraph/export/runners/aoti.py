"""Run a qgraph AOTInductor package with torch alone: torch._inductor.aoti_load_package(path)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from _protocol import serve


def load(path: str, extra: list[str]) -> Any:
    return torch._inductor.aoti_load_package(path)


def run(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return logits.float().numpy()


if __name__ == "__main__":
    serve(load, run)
