"""`QGraphTrainer`: the Hugging Face Trainer with checkpoints of the trainable state only, as PEFT's are.

The plain `transformers.Trainer` trains a transformed module as it is, but checkpoints anything that is
not a `PreTrainedModel` or a PEFT model by writing its whole `state_dict()`: every frozen 4-bit weight
again at every save (2.0 MB for 0.6 MB of LR-QAT tensors on a 2-layer test Llama). `QGraphTrainer` writes
each checkpoint with `qm.save_pretrained` (the plan as it ran and the trainable tensors, atomically) and
resumes, or loads the best model, with `qgraph.from_pretrained` in place: the parameters the optimizer
holds stay the same objects, and a resumed run equals an uninterrupted one bit for bit.

    trainer = QGraphTrainer(model=qm, args=TrainingArguments(...), train_dataset=...)
    trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from qgraph.errors import PretrainedError, QGraphError
from qgraph.module import QGraphModule
from qgraph.pretrained import from_pretrained
from qgraph.saved_state import CONFIG_FILE
from qgraph.train import check_trains


class QGraphTrainer(Trainer):
    """A Trainer whose checkpoints hold a QGraphModule's trainable state only (see the module docstring)."""

    def __init__(self, model: QGraphModule, *args, **kwargs) -> None:
        if not isinstance(model, QGraphModule):
            raise QGraphError(f"QGraphTrainer trains the module qgraph.transform returned, got {type(model).__name__}; "
                              "use transformers.Trainer for other models")
        super().__init__(model, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._qgraph_module().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer keeps it beside the model

    def train(self, *args, **kwargs):
        check_trains(self._qgraph_module())  # before the Trainer sets anything up (evaluate needs no training)
        return super().train(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not (Path(resume_from_checkpoint) / CONFIG_FILE).is_file():
            # a checkpoint of the plain Trainer: its loader overwrites tensor by tensor and fails at the first
            # mismatch, so another plan's or rank's checkpoint is compared first
            check_plain_checkpoint(self._qgraph_module(), Path(resume_from_checkpoint))
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        from_pretrained(self._qgraph_module(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not (Path(best) / CONFIG_FILE).is_file():
            super()._load_best_model()
            return
        from_pretrained(self._qgraph_module(), best)

    def _qgraph_module(self) -> QGraphModule:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


def checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape in a plain Trainer checkpoint's weights file (read without loading the tensors), or
    None where the directory holds neither file the Trainer writes for a module that is not a PreTrainedModel."""
    safetensors_file, torch_file = directory / SAFE_WEIGHTS_NAME, directory / WEIGHTS_NAME
    if safetensors_file.is_file():
        with safe_open(str(safetensors_file), framework="pt") as reader:
            return {name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()}
    if torch_file.is_file():
        state = torch.load(torch_file, map_location="cpu", mmap=True, weights_only=True)
        return {name: tuple(tensor.shape) for name, tensor in state.items()}
    return None


def check_plain_checkpoint(qm: QGraphModule, directory: Path) -> None:
    """Refuse a plain Trainer checkpoint whose tensors are not this module's (another plan, rank or model),
    before any of them is loaded."""
    saved = checkpoint_shapes(directory)
    if saved is None:
        return  # the Trainer names what is missing
    expected = {name: tuple(tensor.shape) for name, tensor in qm.state_dict().items()}
    # a checkpoint written before state_dict() left the tied names out holds them too (load_state_dict takes them)
    missing, unexpected = (sorted(expected.keys() - saved.keys()),
                           sorted(saved.keys() - expected.keys() - qm.tied_aliases().keys()))
    wrong_shape = [name for name in sorted(expected.keys() & saved.keys()) if expected[name] != saved[name]]
    if not (missing or unexpected or wrong_shape):
        return
    first = (f"{wrong_shape[0]} is {list(saved[wrong_shape[0]])} there, {list(expected[wrong_shape[0]])} here"
             if wrong_shape else f"{len(missing)} of this module's tensors missing (e.g. {missing[0]})"
             if missing else f"{len(unexpected)} tensors this module has not (e.g. {unexpected[0]})")
    raise PretrainedError(f"the checkpoint in {directory} is not of this module (plan {qm.plan.name!r}): {first}; "
                          "resume with the plan and options it was trained with. Nothing was loaded")
