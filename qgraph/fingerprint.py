"""Fingerprints of a model's weights: what a saved training state records of the base model it was trained
on, so that it is loaded into that model only (qgraph.saved_state); taken at capture (qgraph.capture),
while the original weights are still there."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

# The weights digest reads this many evenly spaced elements of each tensor (plus every name, dtype and
# shape): cheap enough to take at every capture, even of a model on a GPU, and exact across devices
# (elements are gathered, not summed). Another checkpoint of the same shape differs almost everywhere
# and is caught; an edit confined to elements it does not read is not.
DIGEST_SAMPLES = 4096


def tensors_digest(named_tensors: Iterable[tuple[str, torch.Tensor]], samples: int = DIGEST_SAMPLES) -> str:
    """sha256 over each tensor's name, dtype, shape and `samples` evenly spaced elements, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_sampled_bytes(tensor.detach(), samples))
    return f"sha256:{digest.hexdigest()}"


def _sampled_bytes(tensor: torch.Tensor, samples: int) -> bytes:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return b""
    flat = tensor.reshape(-1)
    count = min(flat.numel(), samples)
    # integer positions: a float linspace loses exactness past 2^24 elements
    positions = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(count - 1, 1)
    picked = flat.index_select(0, positions.to(flat.device)).cpu().contiguous()
    return picked.view(torch.uint8).numpy().tobytes()


def weights_digest(model: nn.Module) -> str:
    """The digest of every tensor in `model.state_dict()`: what `CaptureInfo.weights_digest` records."""
    return tensors_digest(model.state_dict().items())
