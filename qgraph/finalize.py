"""`finalize(qm)`: the deployable form of a trained LR-QAT module, every lrqat_linear folded to int4_linear."""

from __future__ import annotations

import copy
import dataclasses
import warnings

from qgraph.decode import TRAINING_ONLY_PASSES
from qgraph.module import QGraphModule, wrap_graph_module
from qgraph.pipeline import PassContext, run_pipeline
from qgraph.plans import PassConfig, Plan
from qgraph.report import TransformReport

FOLD_PASS = "fold_lrqat"


def finalize(qm: QGraphModule, *, compile: bool | str = False) -> QGraphModule:
    """A new, frozen QGraphModule whose LR-QAT layers are plain b-bit integer weights and scales.

    The fold runs through the pass pipeline (verified like any pass) on a deep copy of the graph, so
    `qm` stays trainable and unchanged. Its output equals `qm`'s exactly (torch.equal) for the same
    inputs. Plans without lrqat_linear come back as a frozen copy, with a note in the report.
    """
    from passes import get_pass
    from passes.chunk_lm_loss import restore_lm_head
    from passes.insert_checkpoints import inline_checkpoints

    if not isinstance(qm, QGraphModule):
        raise TypeError(f"finalize takes the QGraphModule that qgraph.transform returned, got {type(qm).__name__}")
    # The capture info holds the original model (through its loss function) and its config: share it
    # rather than copy a whole model. Every tensor of the graph module itself is copied.
    with warnings.catch_warnings():
        # torch's own pytree specs warn about a deprecated isinstance check of theirs when copied
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        gm = copy.deepcopy(qm.graph_module, {id(qm.info): qm.info})
    # deployment recomputes nothing; and the fold reads each lrqat_linear's weights as module attributes
    inline_checkpoints(gm)
    info = qm.info
    if info.lm_head is not None:  # a deployable graph computes its logits itself
        restore_lm_head(gm, info.lm_head)
        info = dataclasses.replace(info, lm_head=None)
        gm.meta["qgraph"] = info
    spec = get_pass(FOLD_PASS)
    context = PassContext(example_inputs=qm.info.example_inputs)
    gm, fold_reports = run_pipeline(gm, [(spec, spec.options_type())], context)
    # the decode graph: qm's recipe and the same fold (to the same codes: context.made), built when first used
    decode = qm.decode_recipe.then((spec, spec.options_type()), context.made) if getattr(
        qm, "decode_recipe", None) else None

    # the deployable graph has no checkpoint regions left, and its LM head back
    trained = [p for p in qm.plan.passes if p.name not in TRAINING_ONLY_PASSES]
    plan = Plan(f"{qm.plan.name}+finalize",
                f"{qm.plan.description}; then LR-QAT layers folded to int4_linear (frozen, deployable)",
                (*trained, PassConfig(FOLD_PASS)))
    kept = [r for r in qm.report.passes if r.name not in TRAINING_ONLY_PASSES]
    report = TransformReport(plan.name, passes=[*kept, *fold_reports],
                             capture_seconds=qm.report.capture_seconds)
    for param in gm.parameters():
        param.requires_grad_(False)
        report.frozen_params += param.numel()
    report.decoding = qm.report.decoding
    return wrap_graph_module(gm, report, plan, info, compile=compile, decode_recipe=decode)
