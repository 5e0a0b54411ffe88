"""Capture a model as a torch.fx GraphModule.

Hugging Face decoder-only models go through non-strict `torch.export` with a dynamic batch and
sequence dimension and an attention mask input, so one capture serves every batch shape and padding.
Plain modules go through `torch.export` when example inputs are given, else `torch.fx.symbolic_trace`.
Nothing about the user's model changes: a failed capture raises `CaptureError` naming the module and
the op, and the model's train/eval mode is restored either way.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from qgraph.errors import CaptureError
from qgraph.loss import LMHead
from qgraph.fingerprint import weights_digest

MAX_BATCH = 64
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 16  # > 1 so export does not specialise the dims to 0/1


@dataclass
class CaptureInfo:
    """How the captured graph is called, and what the original model returned."""

    kind: str  # "hf" (Hugging Face model, called with keywords) or "module" (positional args)
    input_names: tuple[str, ...]
    # placeholder name -> the example value it was captured with (what verification propagates)
    example_inputs: dict[str, Any] = field(default_factory=dict)
    constant_kwargs: dict[str, Any] = field(default_factory=dict)
    model_class: str = ""
    config: Any = None  # the HF config, for loss functions and output shapes
    loss_function: Callable | None = None  # the model's own loss (HF), given logits and labels
    max_seq_len: int | None = None
    lm_head: LMHead | None = None  # set when a pass moved the LM head out of the graph (chunk_lm_loss)
    # digest of the original model's weights (qgraph.fingerprint.weights_digest): what a saved training
    # state records, so that it is loaded only into the model it was trained on
    weights_digest: str = ""
    cast_to: torch.dtype | None = None  # transform(dtype=): what the model was cast to before capture (qgraph.cast)

    @property
    def is_causal_lm(self) -> bool:
        """A Hugging Face next-token model (LlamaForCausalLM, GPT2LMHeadModel, ...): its loss is token
        cross-entropy and it generates."""
        return self.kind == "hf" and is_causal_lm_class(self.model_class)


@functools.cache  # asked on every forward (label checks): the mapping is scanned once per class name
def is_causal_lm_class(model_class: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_class.endswith("ForCausalLM") or model_class in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def capture(model: nn.Module, example_inputs: tuple | dict | None = None, *,
            weights_of: nn.Module | None = None) -> torch.fx.GraphModule:
    """Capture `model` as a GraphModule; `gm.meta["qgraph"]` holds its `CaptureInfo`.

    weights_of: the model whose weights the info's digest records, when `model` is a cast copy of it
    (qgraph.cast): a saved training state names the model the user has, not the copy."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"qgraph captures torch.nn.Module objects, got {type(model).__name__}")
    if made_by_qgraph(model):
        raise CaptureError("this module was made by qgraph (capture or transform) already: capture the original "
                           "model; a transformed module's graph is qm.graph_module")
    if isinstance(example_inputs, Mapping) and not _is_hf_model(model):
        raise CaptureError(f"a plain module's example_inputs are its positional arguments (a tuple, or one tensor), "
                           f"got a {type(example_inputs).__name__} with keys {list(example_inputs)}; inputs by name "
                           "are read for Hugging Face models")
    modes = {module: module.training for module in model.modules()}
    model.eval()  # a compiled graph is captured without dropout; the backbone is frozen anyway
    try:
        # torch.fx keeps the traced submodules themselves: trace a copy of the module tree (sharing
        # the tensors) so that passes rewriting them never touch the user's modules
        traced = model if _is_hf_model(model) or example_inputs is not None else structural_copy(model)
        digest = weights_digest(model if weights_of is None else weights_of)  # not a tracing failure if it fails
        with _module_tracker(traced) as tracker:
            try:
                if _is_hf_model(model):
                    return _capture_hf(model, example_inputs, digest)
                return _capture_module(traced, example_inputs, digest)
            except CaptureError:
                raise
            except Exception as exc:  # noqa: BLE001 - every tracing failure becomes one clear error
                raise CaptureError(_explain_failure(traced, tracker, exc)) from exc
    finally:
        for module, training in modes.items():
            module.training = training


def made_by_qgraph(model: nn.Module) -> bool:
    """A graph qgraph.capture returned, or a module qgraph.transform returned (it carries the capture's info)."""
    return ((isinstance(model, torch.fx.GraphModule) and "qgraph" in model.meta)
            or isinstance(getattr(model, "info", None), CaptureInfo))


def capture_info(gm: torch.fx.GraphModule) -> CaptureInfo:
    info = gm.meta.get("qgraph")
    if info is None:
        raise CaptureError("this GraphModule was not made by qgraph.capture; capture the model first")
    return info


# --- Hugging Face models --------------------------------------------------------------------------


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def max_positions(config: Any) -> int:
    """The longest sequence a Hugging Face model is captured for: its position limit."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def _capture_hf(model: nn.Module, example_inputs: tuple | dict | None, digest: str) -> torch.fx.GraphModule:
    config = model.config
    max_seq = max_positions(config)
    kwargs = _hf_example_kwargs(config, example_inputs)
    accepted = inspect.signature(model.forward).parameters
    constants = {"use_cache": False} if "use_cache" in accepted else {}
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=max_seq)
    dynamic = {name: {0: batch, 1: seq} for name in kwargs} | {name: None for name in constants}
    exported = torch.export.export(
        model, (), kwargs=kwargs | constants, dynamic_shapes=dynamic, strict=False
    )
    gm = exported.module()
    gm.meta["qgraph"] = CaptureInfo(
        kind="hf",
        input_names=tuple(kwargs),
        example_inputs=kwargs | constants,
        constant_kwargs=constants,
        model_class=type(model).__name__,
        weights_digest=digest,
        config=config,
        loss_function=getattr(model, "loss_function", None),
        max_seq_len=max_seq,
    )
    return gm


def _hf_example_kwargs(config: Any, example_inputs: tuple | dict | None) -> dict[str, torch.Tensor]:
    if example_inputs is None:
        vocab = int(config.vocab_size)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return example_kwargs(example_inputs)


def example_kwargs(example_inputs: Any) -> dict[str, torch.Tensor]:
    """A Hugging Face model's example inputs by name, checked, in the dtypes the graph is captured with: what
    capture and qgraph.export take (a dict or BatchEncoding, the ids alone, or (input_ids, attention_mask))."""
    kwargs = _example_kwargs(example_inputs)
    if "input_ids" not in kwargs:
        raise CaptureError("example_inputs for a Hugging Face model need 'input_ids'")
    kwargs.setdefault("attention_mask", torch.ones_like(kwargs["input_ids"]))
    unknown = set(kwargs) - {"input_ids", "attention_mask"}
    if unknown:
        raise CaptureError(
            f"qgraph captures Hugging Face models with input_ids and attention_mask only; "
            f"drop {sorted(unknown)} from example_inputs"
        )
    for name, tensor in kwargs.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_complex():
            what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CaptureError(f"example {name} must be a tensor of integers (token ids; 1/0 for the mask), got {what}")
    if kwargs["input_ids"].dim() != 2 or min(kwargs["input_ids"].shape) < 2:
        raise CaptureError(
            "example input_ids must be (batch, seq) with batch and sequence length >= 2 so the graph stays dynamic "
            f"in both (torch.export takes a size of 1 as a constant); got shape {tuple(kwargs['input_ids'].shape)}"
        )
    # the graph is captured with int64 ids and mask, the dtypes every call then passes (forward casts a bool or
    # int32 mask to int64 too): an example in other integer dtypes would capture a graph no call matches
    return {name: tensor.long() for name, tensor in kwargs.items()}


def _example_kwargs(example_inputs: Any) -> dict[str, Any]:
    """example_inputs by argument name: a mapping (a dict, or the BatchEncoding a tokenizer returns), the ids
    alone, or (input_ids, attention_mask) in the forward's order."""
    if isinstance(example_inputs, Mapping):
        named = dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        named = {"input_ids": example_inputs}
    elif isinstance(example_inputs, (tuple, list)) and 1 <= len(example_inputs) <= 2:
        named = dict(zip(("input_ids", "attention_mask"), example_inputs))
    else:
        count = f" of {len(example_inputs)}" if isinstance(example_inputs, (tuple, list)) else ""
        raise CaptureError(f"example_inputs for a Hugging Face model are the input_ids, (input_ids, attention_mask) or "
                           f"a dict of them (a tokenizer's output), got {type(example_inputs).__name__}{count}")
    return {name: value for name, value in named.items() if value is not None}  # (ids, None): no mask given


# --- plain modules ----------------------------------------------------------------------------------


def _capture_module(model: nn.Module, example_inputs: tuple | dict | None, digest: str) -> torch.fx.GraphModule:
    if example_inputs is None:
        gm, args = torch.fx.symbolic_trace(model), ()
    else:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        # Dim.AUTO: the batch dim stays dynamic where the model allows it, else export specialises it
        dynamic = tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
        gm = torch.export.export(model, args, dynamic_shapes=dynamic, strict=False).module()
    names = tuple(n.target for n in gm.graph.find_nodes(op="placeholder"))
    gm.meta["qgraph"] = CaptureInfo(kind="module", input_names=names, example_inputs=dict(zip(names, args)),
                                    model_class=type(model).__name__, weights_digest=digest)
    return gm


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree with its own attribute dicts (parameters, buffers, submodules,
    hooks) but the same tensors: cheap, and safe to rewrite."""
    clone = copy.copy(module)
    clone.__dict__ = {key: (type(value)(value) if isinstance(value, dict) else value)
                      for key, value in module.__dict__.items()}
    clone._modules = {name: structural_copy(child) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


# --- naming the module and op that failed -------------------------------------------------------------


@dataclass
class _ModuleTracker:
    """The stack of module paths whose forward is running, so a failure can name its module."""

    names: dict[int, str]
    stack: list[str] = field(default_factory=list)

    def enter(self, module: nn.Module) -> None:
        self.stack.append(self.names.get(id(module), type(module).__name__))

    def leave(self, module: nn.Module) -> None:
        if self.stack:
            self.stack.pop()


@contextlib.contextmanager
def _module_tracker(model: nn.Module) -> Iterator[_ModuleTracker]:
    tracker = _ModuleTracker(names={id(m): (n or "<root>") for n, m in model.named_modules()})
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, args: tracker.enter(m)))
        handles.append(module.register_forward_hook(lambda m, args, out: tracker.leave(m)))
    try:
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


def _explain_failure(model: nn.Module, tracker: _ModuleTracker, exc: Exception) -> str:
    # a failed forward never pops its module: the top of the stack is the innermost one running
    module_path = tracker.stack[-1] if tracker.stack else "<root>"
    module = dict(model.named_modules()).get("" if module_path == "<root>" else module_path, model)
    where = _failing_source_line(exc, module)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"could not capture {type(model).__name__}: module {module_path!r} ({type(module).__name__}) "
        f"failed at {where}: {type(exc).__name__}: {reason}\n"
        f"fix: {_suggest_fix(exc)}"
    )


def _failing_source_line(exc: Exception, module: nn.Module) -> str:
    """The innermost traceback line inside the failing module's source file (the op that failed)."""
    source_file = inspect.getsourcefile(type(module)) or ""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f.filename == source_file] or frames[-1:]
    if not inside:
        return "an unknown op"
    frame = inside[-1]
    return f"`{(frame.line or '').strip()}` ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"


def _suggest_fix(exc: Exception) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if "data-dependent" in text or "guardondatadependent" in text or "control flow" in text:
        return (
            "the module branches on tensor values; make the branch depend on shapes or config only, "
            "use torch.cond, or mark the module as a leaf and keep it out of the rewritten region"
        )
    if "pytree" in text or "not a known type" in text:
        return "return tensors (or registered pytree containers) from forward, e.g. pass use_cache=False"
    if "proxy" in text or "symbolically traced" in text:
        return "pass example_inputs so qgraph captures the module with torch.export instead of torch.fx"
    return "check the op above runs under torch.export(strict=False); pass example_inputs matching forward"
