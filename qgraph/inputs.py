"""Checks of what users hand to qgraph: the model before it is captured, the arguments of each call.

Each check raises before anything changes, with a message that names the argument, what is wrong with it
and the fix; what would otherwise surface is a raw PyTorch error from deep inside a kernel or an export
guard, or (for a NaN weight) no error at all. The call checks read shapes and dtypes, plus one min/max of
the token ids and one of the labels: host-side work once per call, outside any compiled region.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qgraph.errors import QGraphError
from qgraph.loss import IGNORE_INDEX


def is_int(value: object) -> bool:
    """A Python integer, and not a bool: what an integer option takes (True == 1 is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def scalar(value: object) -> object:
    """A numpy scalar or a one-element tensor as its Python number; anything else as it is."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    return value


def holds_integers(tensor: torch.Tensor) -> bool:
    """An integer dtype (not float, complex or bool): what token ids and class labels are."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def value_range(tensor: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor, read back in one host sync."""
    low, high = torch.stack(torch.aminmax(tensor)).tolist()
    return low, high


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose tensors are on the meta device (loaded with device_map / offloading, or built there)."""
    unmaterialized = [name for name, tensor in _named_tensors(model) if tensor.device.type == "meta"]
    if unmaterialized:
        raise QGraphError(
            f"{len(unmaterialized)} tensor(s) of the model are on the meta device (not materialized), e.g. "
            f"{', '.join(unmaterialized[:3])}; materialize the model first (model.to_empty(device='cpu') and "
            "load its weights, or load it without device_map / offloading) and transform it then")


def check_model(model: nn.Module) -> None:
    """Refuse a model whose tensors are not materialized, or whose weights hold NaN or inf."""
    check_materialized(model)
    for name, tensor in _named_tensors(model):
        if tensor.is_floating_point():
            bad = int(tensor.numel() - torch.isfinite(tensor).sum())
            if bad:
                layer = name.rpartition(".")[0] or name
                raise QGraphError(
                    f"{name} holds {bad} non-finite value(s) (NaN or inf) in layer {layer!r}; quantizing or training "
                    "on it would spread them through every output. Fix or reload that weight before transforming")


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def check_call(input_ids: object, attention_mask: object, labels: object, *, vocab_size: int | None,
               max_batch: int, max_seq_len: int | None, per_token_labels: bool = True, config: Any = None) -> None:
    """The arguments of a transformed model's call: token ids and a mask of one (batch, seq) shape, labels of
    that shape too (`per_token_labels`, a causal LM: token ids or -100) or one row per sequence (a classifier:
    classes below the `config`'s num_labels, or float targets for regression and multi-label)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must hold torch.int64 token ids (the dtype the graph was captured with), got "
                        f"{input_ids.dtype}; pass the tokenizer's ids as they come, or ids.long()")
    if input_ids.dim() != 2:
        raise QGraphError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if not 1 <= batch <= max_batch or not 1 <= seq <= (max_seq_len or seq):
        raise QGraphError(
            f"input_ids shape {tuple(input_ids.shape)} is outside the captured range "
            f"(batch 1..{max_batch}, seq 1..{max_seq_len}); split the batch or shorten the text")
    if attention_mask is not None:
        _check_same_shape("attention_mask", attention_mask, input_ids)
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must hold integers or booleans (1 for a real token, 0 for padding), "
                            f"got {attention_mask.dtype}")
    if labels is not None and per_token_labels:
        _check_same_shape("labels", labels, input_ids)
        _check_token_labels(labels, vocab_size)
    elif labels is not None:
        _check_class_labels(labels, input_ids, config)
    if vocab_size is not None:
        _check_token_range(input_ids, vocab_size)


def _check_same_shape(name: str, tensor: object, input_ids: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.shape != input_ids.shape:
        raise QGraphError(f"{name} has shape {tuple(tensor.shape)} but input_ids has {tuple(input_ids.shape)}; "
                          f"{name} must have input_ids' (batch, seq) shape")


def _check_token_labels(labels: torch.Tensor, vocab_size: int | None) -> None:
    """A causal LM's labels: integer token ids of the vocabulary (forward takes them as int64), or -100 where the
    loss skips a position."""
    if not holds_integers(labels):
        raise TypeError(f"labels must hold integer token ids (-100 where the loss skips a position), got "
                        f"{labels.dtype}; build them from input_ids (labels = input_ids.clone())")
    if vocab_size is None or not labels.numel():
        return
    # one host sync: the skipped positions read as 0, inside any vocabulary
    low, high = value_range(labels.masked_fill(labels == IGNORE_INDEX, 0))
    if low < 0 or high >= vocab_size:
        raise QGraphError(f"labels holds {low if low < 0 else high}, neither a token id of the model's vocabulary "
                          f"(0..{vocab_size - 1}) nor {IGNORE_INDEX} (a position the loss skips); build labels from "
                          "this model's tokenizer's ids")


def _check_class_labels(labels: object, input_ids: torch.Tensor, config: Any) -> None:
    """A classifier's labels: one per sequence. Single-label classification (integer labels, num_labels > 1, as
    Hugging Face infers it) takes a class below num_labels per sequence, (batch,) or (batch, 1); regression and
    multi-label targets are left to the model's own loss, which reads their shape."""
    batch = input_ids.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or len(labels) != batch:
        raise QGraphError(f"labels has shape {tuple(getattr(labels, 'shape', ()))} but input_ids has "
                          f"{tuple(input_ids.shape)}; a classifier takes one label (or one row of labels) per "
                          f"sequence: ({batch},)")
    num_labels = getattr(config, "num_labels", None)
    single_label = getattr(config, "problem_type", None) in (None, "single_label_classification")
    if labels.is_floating_point() or labels.dtype == torch.bool or not single_label or not num_labels or num_labels < 2:
        return
    if labels.numel() != batch:
        raise QGraphError(f"labels has shape {tuple(labels.shape)}: integer labels are one class per sequence, "
                          f"shape ({batch},); for multi-label targets pass float labels of shape (batch, num_labels)")
    low, high = value_range(labels)
    if low < 0 or high >= num_labels:
        raise QGraphError(f"labels holds class {low if low < 0 else high}, but the classifier has "
                          f"num_labels={num_labels} (classes 0..{num_labels - 1}); check the label mapping or the "
                          "model's num_labels")


def _check_token_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    low, high = value_range(input_ids)
    if low >= 0 and high < vocab_size:
        return
    bad = ((input_ids < 0) | (input_ids >= vocab_size)).nonzero()[0].tolist()
    value = int(input_ids[bad[0], bad[1]])
    raise QGraphError(f"input_ids holds token id {value} at (batch {bad[0]}, position {bad[1]}), outside the "
                      f"model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); was the text tokenized with "
                      "this model's tokenizer?")
