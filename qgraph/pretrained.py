"""PEFT-style saving and loading of a training run: `qm.save_pretrained(dir)` writes the trainable
tensors and the plan as it ran; `qgraph.from_pretrained(model, dir)` re-applies that plan to the base
model and loads them, bit for bit. The file format and its checks are in qgraph.saved_state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qgraph.api import transform
from qgraph.compile import compile_mode
from qgraph.errors import QGraphError
from qgraph.fingerprint import weights_digest
from qgraph.inputs import check_materialized
from qgraph.module import QGraphModule
from qgraph.saved_state import (
    CONFIG_FILE, SavedState, applied_plan, check_base_model, check_plan, check_tensors, load_tensors, read_saved,
    save_pretrained, saved_dtype,
)

__all__ = ["CONFIG_FILE", "applied_plan", "from_pretrained", "save_pretrained"]


def from_pretrained(model: nn.Module, directory: str | Path, *, compile: bool | str = False,
                    example_inputs: Any = None) -> QGraphModule:
    """The module `qm.save_pretrained(directory)` saved, rebuilt from `model`.

    `model` is the base model the run was trained on: the saved plan is applied to it (with its
    options, `qgraph.transform`) and the trained tensors are loaded into the result. Or `model` is a
    module already transformed with that same plan: the tensors are loaded into it in place and it is
    returned. The save is read and verified first (files, format, size and sha256, the base model's
    class, config and weights, every tensor's name, shape and dtype): a mismatch raises
    `PretrainedError` naming what differs, with `model` untouched. `compile` and `example_inputs` are
    passed to transform; a module loaded in place keeps how it was transformed and refuses them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_pretrained takes the base model (a torch.nn.Module) the run was trained on, or the "
                        f"module transform returned, got {type(model).__name__}")
    compile_mode(compile)
    saved = read_saved(directory)
    if isinstance(model, QGraphModule):
        if compile is not False or example_inputs is not None:
            raise QGraphError("compile= and example_inputs= apply where from_pretrained transforms a base model; this "
                              "module was transformed already and keeps how transform made it (its compile= and "
                              "example_inputs=)")
        return _load_in_place(saved, model)
    check_materialized(model)  # named as such, not as a model of other weights
    config = model.config if hasattr(getattr(model, "config", None), "model_type") else None  # as capture reads it
    check_base_model(saved, type(model).__name__, config, weights_digest(model))
    qm = transform(model, saved.plan, compile=compile, example_inputs=example_inputs, dtype=saved_dtype(saved))
    load_tensors(saved, qm)  # checks every tensor before the first copy
    return qm


def _load_in_place(saved: SavedState, qm: QGraphModule) -> QGraphModule:
    check_base_model(saved, qm.info.model_class, qm.info.config, qm.info.weights_digest)
    check_plan(saved, qm)
    check_tensors(saved, qm)
    load_tensors(saved, qm)
    return qm
