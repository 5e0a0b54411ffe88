"""The decode step of a torch program with qgraph's KV-cache signature, numpy in and out (_decoding.Step):
shared by the pt2 and aoti runners, which need torch anyway."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def torch_step(program: Callable) -> Callable:
    def step(input_ids, attention_mask, past_attention_mask, position_ids, past):
        # copies with every stride canonical: an AOTInductor package run checked compares strides exactly, also
        # of size-1 dimensions, which np.ascontiguousarray leaves as they are (a (B, 1) token column has stride 0)
        tensors = [torch.from_numpy(np.array(a, order="C", copy=True))
                   for a in (input_ids, attention_mask, past_attention_mask, position_ids)]
        logits, *present = program(*tensors, [torch.from_numpy(p) for p in past])
        return logits.float().numpy(), [p.numpy() for p in present]

    return step
