"""The entry point: `transform(model, plan, **options)`."""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from torch import nn

from qgraph.capture import capture, capture_info, made_by_qgraph
from qgraph.cast import CastModel, cast_copy, cast_summary, check_dtype, slow_dtype_warning
from qgraph.compile import compile_mode
from qgraph.decode import decode_recipe, kv_cache_unsupported
from qgraph.errors import PlanError, QGraphError, unknown_name_message
from qgraph.graph import LINEAR_FORMS, linear_sites, matches_any
from qgraph.inputs import check_model
from qgraph.module import QGraphModule, wrap_graph_module
from qgraph.pipeline import PassContext, run_pipeline
from qgraph.plans import CHECKPOINT_PASS, Plan, get_plan, resolve_steps, with_checkpoint
from qgraph.report import PassReport, TransformReport

LINEAR_PASSES = ("quantize_nf4", "lrqat")  # the passes that rewrite linear layers
# the passes whose include/exclude globs name linear layers by module path
LINEAR_GLOB_PASSES = (*LINEAR_PASSES, "fake_quant_activations")


def transform(
    model: nn.Module,
    plan: str | Plan = "nf4",
    *,
    example_inputs: Any = None,
    compile: bool | str = False,
    checkpoint: str | dict | None = None,
    skip: Sequence[str] = (),
    print_after: Sequence[str] = (),
    console: Console | None = None,
    kv_cache: bool = True,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> QGraphModule:
    """Capture `model`, run `plan`'s passes (with `options` overriding theirs), return the module.

    Every plan, option and pass name is checked before the model is captured, so a typo changes
    nothing. The result shares the model's unquantized tensors (no copy) and freezes every
    parameter a pass did not mark trainable.

    checkpoint: None keeps the plan's activation checkpoints (the training plans recompute every
    decoder block in backward); "none" removes them; "blocks" makes each block a region;
    {"every": k, ...} one region per k blocks (any insert_checkpoints option). compile=True runs the
    graph through torch.compile (dynamic shapes: batch and sequence length vary without recompiling), its
    checkpoint regions compiled once per structure and shared by every block where they can be
    (qgraph.compile.compile_graph_module; `report.compiled` says how it was compiled); compile="graph"
    compiles the whole graph at once (a first compile 5x longer on SmolLM2, a step about 5% faster).

    kv_cache: a Hugging Face causal LM also gets a KV-cached decode graph, rewritten by the same passes and
    sharing every tensor with the training graph, which `generate` runs one token per step (qgraph.decode).
    It is captured at the first generate (from a stand-in of the model that holds no weights), so a transform
    that only trains pays nothing for it; False: generate recomputes the whole sequence per token.

    dtype: train and run in this floating dtype (torch.bfloat16, torch.float16, torch.float32). What the plan
    quantizes is quantized from the model's weights as they are; everything else (embeddings, norms, the head,
    the side network's compute) is cast, as `model.to(dtype)` would cast it (qgraph.cast). The model itself is
    not changed. None: the model's own dtype.
    """
    check_transformable(model)
    plan, steps, skip, print_after = check_transform_call(plan, options, checkpoint=checkpoint, skip=skip,
                                                          print_after=print_after, kv_cache=kv_cache, dtype=dtype,
                                                          compile=compile)
    check_model(model)
    if (slow := slow_dtype_warning(dtype, model)) is not None:
        warnings.warn(slow, stacklevel=2)
    start = time.perf_counter()
    cast = cast_copy(model, dtype) if dtype is not None else CastModel(model)
    gm = capture(cast.model, example_inputs, weights_of=model)
    check_globs_name_layers(steps, gm)
    capture_info(gm).cast_to = dtype if cast.sources else None  # None: nothing was cast
    report = TransformReport(plan.name, capture_seconds=time.perf_counter() - start)
    context = PassContext(example_inputs=capture_info(gm).example_inputs, sources=cast.sources)
    gm, report.passes = run_pipeline(gm, steps, context, skip=skip, print_after=print_after, console=console)
    check_rewrote_linears(plan, report.passes, gm)
    check_checkpoint_globs(checkpoint, options, report.passes)
    if cast.sources:
        report.dtype = cast_summary(cast, dtype, gm)

    info = capture_info(gm)
    decode = None
    no_cache_because = kv_cache_unsupported(info.config) if info.is_causal_lm else None
    if kv_cache and no_cache_because is not None:  # reported, not silent: generate still works, uncached
        report.decoding = f"no KV cache ({no_cache_because}): generate recomputes the whole sequence per token"
    elif kv_cache and info.is_causal_lm:
        decode = decode_recipe(cast.model, steps, context.made, max_seq_len=info.max_seq_len, skip=skip)
        report.decoding = ("KV cache: a decode graph is captured at the first generate and rewritten by the same "
                           "passes, sharing the training graph's tensors")
    elif info.is_causal_lm:
        report.decoding = "no KV cache (kv_cache=False): generate recomputes the whole sequence per token"

    trainable = {name for names in context.trainable.values() for name in names}
    freeze_untrained(gm, trainable)
    for param in gm.parameters():
        if param.requires_grad:
            report.trainable_params += param.numel()
        else:
            report.frozen_params += param.numel()
    return wrap_graph_module(gm, report, plan, info, compile=compile, decode_recipe=decode)  # info as the passes left it


# transform's own keywords, as against the passes' options (**options)
TRANSFORM_KEYWORDS = tuple(name for name, parameter in inspect.signature(transform).parameters.items()
                           if parameter.kind is parameter.KEYWORD_ONLY)


def check_transform_call(plan: str | Plan, options: dict[str, Any], *, checkpoint: Any = None, skip: Any = (),
                         print_after: Any = (), kv_cache: Any = True, dtype: Any = None,
                         compile: Any = False) -> tuple[Plan, list, list[str], list[str]]:
    """Every check of a transform call that needs no model, in transform's order: the resolved plan and its
    steps, and skip / print_after as lists of pass names."""
    plan, steps = resolve_transform(plan, options, checkpoint=checkpoint)
    pass_names = [spec.name for spec, _ in steps]
    skip, print_after = pass_name_list("skip", skip, pass_names), pass_name_list("print_after", print_after, pass_names)
    if not isinstance(kv_cache, bool):
        raise TypeError(f"kv_cache must be True or False, got {kv_cache!r}")
    for name in (*skip, *print_after):
        if name not in pass_names:
            raise PlanError(unknown_name_message("pass", name, pass_names) + f" (plan {plan.name!r})")
    check_dtype(dtype)
    compile_mode(compile)
    return plan, steps, skip, print_after


def check_transform_options(plan: str | Plan, options: dict[str, Any]) -> tuple[Plan, list]:
    """`transform(model, plan, **options)`'s checks that need no model, for a caller that loads the model
    after them (the CLI's --set mixes transform's keywords and the passes' options): the plan and its steps."""
    # example_inputs are checked against the model, at capture; a console is not checked
    own = {key: value for key, value in options.items() if key in TRANSFORM_KEYWORDS
           and key not in ("example_inputs", "console")}
    pass_options = {key: value for key, value in options.items() if key not in TRANSFORM_KEYWORDS}
    resolved, steps, _, _ = check_transform_call(plan, pass_options, **own)
    return resolved, steps


def pass_name_list(argument: str, names: object, pass_names: list[str]) -> list[str]:
    """skip= / print_after= as a list of pass names (None: none); one string is refused, not read letter by letter."""
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{argument} takes a list of pass names, e.g. {argument}={[pass_names[0]]!r}; got {names!r}")
    return list(names)


def check_transformable(model: object) -> None:
    """transform takes a model (an nn.Module), not its name, and not what transform returned."""
    if isinstance(model, nn.Module) and made_by_qgraph(model):
        raise QGraphError("this module was made by qgraph (transform or capture) already; transform the original model "
                          "(each plan starts from the model's own weights), or qgraph.finalize(qm) to fold what was "
                          "trained")
    if not isinstance(model, nn.Module):
        hint = (" (a checkpoint name: load it first, e.g. AutoModelForCausalLM.from_pretrained(name))"
                if isinstance(model, str) else "")
        raise TypeError(f"transform takes a torch.nn.Module, got {type(model).__name__}{hint}")


def resolve_transform(plan: str | Plan, options: dict[str, Any], *, checkpoint: Any = None) -> tuple[Plan, list]:
    """The plan and its resolved pass steps, as transform runs them: every check that needs no model
    (plan, options, checkpoint choice), so a caller can ask before capturing."""
    resolved = with_checkpoint(get_plan(plan), checkpoint)
    return resolved, resolve_steps(resolved, options)


def check_rewrote_linears(plan: Plan, reports: list[PassReport], gm: nn.Module) -> None:
    """A plan whose linear-rewriting passes ran and rewrote nothing is an error, not a module that trains nothing."""
    ran = [r for r in reports if r.name in LINEAR_PASSES and r.ran]
    for earlier, report in zip(ran, ran[1:]):
        if not report.matched and earlier.rewritten:  # each linear is rewritten once: the first pass took them
            raise PlanError(f"plan {plan.name!r}: {report.name} found no linear layer to rewrite among those "
                            f"{earlier.name} before it left ({len(earlier.rewritten)} rewritten; each linear is "
                            "rewritten once). Give the two passes include= globs that select apart, or drop one")
    if not ran or any(r.rewritten for r in ran):
        return
    skipped = [f"{record.path or '(root)'}: {record.reason}" for r in ran for record in r.skipped]
    # the globs that selected nothing, where the graph does hold linear layers
    globs = ", ".join(f"{key}={list(r.options[key])}" for r in ran for key in ("include", "exclude")
                      if r.options.get(key))
    layers = [site.path for site in linear_sites(gm)]
    if skipped:
        why = f"every matched linear was skipped ({'; '.join(skipped[:3])})"
    elif globs and layers:
        why = f"{globs} left none of the graph's {len(layers)} linear layers selected (e.g. {', '.join(layers[:3])})"
    else:
        why = f"no linear layer was found; it looks for {LINEAR_FORMS}"
    raise PlanError(f"plan {plan.name!r} rewrote nothing: {why}. Transformers' decoder blocks are selected by "
                    "default; pass include=['<module path glob>'] to select other layers")


def check_globs_name_layers(steps: list, gm: nn.Module) -> None:
    """Every include/exclude glob of a linear-selecting pass names at least one of the captured graph's linear
    layers. One that names none is a typo: an exclude that excludes nothing quantizes the layers the user meant
    to keep out, an include beside others silently selects less. Checked before any pass runs."""
    layers = [site.path for site in linear_sites(gm)]
    if not layers:  # check_rewrote_linears names what a linear layer is
        return
    for spec, options in steps:
        if spec.name not in LINEAR_GLOB_PASSES:
            continue
        for key in ("include", "exclude"):
            for glob in getattr(options, key) or ():
                if not any(matches_any(path, (glob,)) for path in layers):
                    raise PlanError(f"{spec.name}: {key} glob {glob!r} names none of the graph's {len(layers)} linear "
                                    f"layers (e.g. {', '.join(layers[:3])}): correct it, or drop it. Globs match "
                                    "whole module paths, e.g. 'model.layers.*.mlp.*'")


def check_checkpoint_globs(checkpoint: Any, options: dict[str, Any], reports: list[PassReport]) -> None:
    """Globs given to the checkpoints (`checkpoint={"include": ...}`, `insert_checkpoints.include=`) that chose
    no region are an error, as the linear passes' are; without globs, a model with no decoder blocks keeps the
    pass's note."""
    keys = ("include", "exclude")
    asked = (isinstance(checkpoint, dict) and any(key in checkpoint for key in keys)) or any(
        f"{CHECKPOINT_PASS}.{key}" in options for key in keys)
    ran = [r for r in reports if r.name == CHECKPOINT_PASS and r.ran]
    if asked and ran and not ran[0].matched:
        raise PlanError(f"{CHECKPOINT_PASS}: " + "; ".join(n for n in ran[0].notes if "no checkpoint regions" in n))


def freeze_untrained(gm: nn.Module, trainable: set[str]) -> None:
    """Freeze every parameter not in `trainable`.

    The graph shares its parameters with the user's model; freezing those in place would freeze the
    user's model too. Each frozen one becomes a new Parameter over the same storage (no copy), one per
    original, so tied weights stay tied.
    """
    frozen: dict[int, nn.Parameter] = {}
    for module_name, module in gm.named_modules():
        for name, param in list(module._parameters.items()):
            qualified = f"{module_name}.{name}" if module_name else name
            if param is None:
                continue
            if qualified in trainable:
                param.requires_grad_(True)
                continue
            if id(param) not in frozen:
                frozen[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
            module._parameters[name] = frozen[id(param)]
