"""A plain training loop with a rich progress bar: what the demo and the benchmarks share."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sized

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from qgraph.capture import MAX_BATCH, max_positions
from qgraph.errors import PlanError
from qgraph.inputs import is_int, scalar
from qgraph.module import QGraphModule
from qgraph.optim import param_groups
from qgraph.plans import get_plan, plans, resolve_steps, steps_train
from qgraph.side_network import SIDE_NETWORK_LR


def check_run_sizes(*, steps: int, batch_size: int, block_len: int, eval_blocks: int | None = None) -> None:
    """The sizes of a command-line run (the demo, `qgraph export`), refused before the model loads."""
    sizes = {"steps": (steps, 0), "batch_size": (batch_size, 1), "block_len": (block_len, 2)}
    if eval_blocks is not None:
        sizes["eval_blocks"] = (eval_blocks, 1)
    for name, (value, least) in sizes.items():
        if not is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if batch_size > MAX_BATCH:
        raise ValueError(f"batch_size {batch_size} is above the {MAX_BATCH} rows a captured graph takes; use at most "
                         f"{MAX_BATCH}")


def check_block_fits(model: nn.Module, block_len: int) -> None:
    """A command-line run's blocks fit the model's positions: checked once the model is loaded, before any
    scoring or training (the capture's bound would refuse them only then)."""
    config = getattr(model, "config", None)
    if config is not None and block_len > max_positions(config):
        raise ValueError(f"block_len {block_len} is longer than the {max_positions(config)} positions "
                         f"{type(model).__name__} takes; use at most {max_positions(config)}")


def check_trains(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `model` trains, or an error naming why there are none, before any step's forward and
    backward (autograd's own error comes after the forward: "element 0 of tensors does not require grad")."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        return trainable
    plan = getattr(getattr(model, "module", model), "plan", None)  # through a DDP wrapper
    if plan is None:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad: nothing to train")
    training = [name for name in plans() if steps_train(resolve_steps(get_plan(name), {}))]
    raise PlanError(f"plan {plan.name!r} has nothing to train (no parameter requires grad); transform the model "
                    f"with a plan that trains: {', '.join(training)}")


def check_optimizer(optimizer: object, trainable: list[nn.Parameter]) -> None:
    """An optimizer instance that steps at least one of the model's trainable parameters: a class, a list of
    parameters or another model's optimizer would fail (or train nothing) only after a backward."""
    # what the loop calls, not the class: optimizer wrappers that are not Optimizer subclasses step as well
    if isinstance(optimizer, type) or not all(hasattr(optimizer, name) for name in ("step", "zero_grad",
                                                                                   "param_groups")):
        raise TypeError(f"optimizer must be an optimizer instance (e.g. qgraph.train.default_optimizer(qm) or "
                        f"torch.optim.AdamW(qm.trainable_parameters())), got {optimizer!r}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in trainable):
        raise ValueError("the optimizer holds none of the model's trainable parameters; build it from this model's "
                         "qm.trainable_parameters() or qgraph.param_groups(qm)")


def default_optimizer(qm: QGraphModule) -> torch.optim.Optimizer:
    """AdamW as the papers train: LR-QAT's A, B and scales at their own rates (qgraph.param_groups),
    anything else (a QST side network) at SIDE_NETWORK_LR; betas (0.9, 0.95), no weight decay."""
    if not isinstance(qm, QGraphModule):
        raise TypeError(f"default_optimizer takes the module qgraph.transform returned, got {type(qm).__name__}")
    check_trains(qm)
    if any(config.name == "lrqat" for config in qm.plan.passes):
        return torch.optim.AdamW(param_groups(qm), betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.AdamW(qm.trainable_parameters(), lr=SIDE_NETWORK_LR, betas=(0.9, 0.95), weight_decay=0.0)


def known_length(batches: Iterable[torch.Tensor]) -> int | None:
    """How many batches there are, where that is known up front (a DataLoader over an iterable dataset has a
    __len__ that raises TypeError)."""
    try:
        return len(batches) if isinstance(batches, Sized) else None
    except TypeError:
        return None


def train_causal_lm(model: nn.Module, batches: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                    *, steps: int, console: Console | None = None, description: str = "training") -> list[float]:
    """Next-token training: `steps` steps, one on each of the first `steps` of `batches` (input_ids); returns the
    loss of every step. Too few batches is an error: up front where `batches` has a length, else when they run
    out.

    The model trains in train mode and comes back in the mode it had, also when a step fails."""
    steps = scalar(steps)
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if (available := known_length(batches)) is not None and available < steps:
        raise ValueError(f"{steps} steps need {steps} batches, got {available}")
    check_optimizer(optimizer, check_trains(model))
    was_training = model.training
    model.train()
    losses: list[float] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=steps, loss="-")
            for input_ids in itertools.islice(batches, steps):
                loss = model(input_ids=input_ids, labels=input_ids).loss
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} at step {len(losses)}; lower the learning rate")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
                progress.update(task, advance=1, loss=f"{value:.3f}")
    finally:
        model.train(was_training)
    if len(losses) < steps:
        raise ValueError(f"the batches ran out after {len(losses)} of {steps} steps (the model has taken those steps)")
    return losses
