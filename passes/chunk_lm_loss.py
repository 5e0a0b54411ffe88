"""chunk_lm_loss: move the LM head out of the graph so the loss never builds the whole logits tensor.

The graph then returns the hidden state that entered the head; `HFQGraphModule` computes the loss from
it with `qgraph.loss.linear_cross_entropy`, a chunk of tokens at a time (and the full logits only
when they are asked for). Only a head whose output is the graph's output qualifies: a head followed
by more work (a classifier's pooling, logit soft-capping) is left alone and reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from qgraph.capture import capture_info, is_causal_lm_class
from qgraph.graph import LinearSite, linear_sites
from qgraph.loss import LMHead
from qgraph.pipeline import PassContext, PassResult, PassSpec, options_dict
from qgraph.report import REWRITTEN, SKIPPED, PassReport, SiteRecord

aten = torch.ops.aten


@dataclass(frozen=True)
class ChunkLMLossOptions:
    chunk_tokens: int = 256  # 256 x 49152 fp32 logits: 50 MB instead of 201 MB at batch 4 x 256

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive number of tokens, got {self.chunk_tokens!r}")


def output_heads(gm: fx.GraphModule) -> list[LinearSite]:
    """Linear sites whose result is itself one of the graph's outputs."""
    outputs = set(gm.graph.output_node().all_input_nodes)
    return [site for site in linear_sites(gm) if site.node in outputs]


def chunk_lm_loss(gm: fx.GraphModule, context: PassContext, options: ChunkLMLossOptions) -> PassResult:
    report = PassReport("chunk_lm_loss", options_dict(options))
    info = capture_info(gm)
    heads = output_heads(gm)
    report.matched = len(heads)
    if not heads:
        report.notes.append("no linear layer's output is a graph output (a head followed by pooling or "
                            "soft-capping): the loss is computed from full logits")
        return PassResult(gm, modified=False, report=report)
    head = heads[0]
    reason = _why_not(info.model_class, head, heads)
    if reason:
        report.records.append(SiteRecord(head.path, SKIPPED, reason=reason))
        return PassResult(gm, modified=False, report=report)
    _return_head_input(gm, head)
    # a new CaptureInfo (shallow: config and example inputs stay shared) rather than an edit of the
    # captured one, which other graph modules may share (finalize's copy shares it with the original)
    gm.meta["qgraph"] = dataclasses.replace(info, lm_head=LMHead(head.weight_name, head.bias_name,
                                                                options.chunk_tokens))
    report.records.append(SiteRecord(
        head.path, REWRITTEN, params=head.in_features * head.out_features,
        detail=f"{head.out_features}x{head.in_features} head; loss in chunks of {options.chunk_tokens} tokens"))
    return PassResult(gm, modified=True, report=report)


def _why_not(model_class: str, head: LinearSite, heads: list[LinearSite]) -> str:
    if not is_causal_lm_class(model_class):
        return f"{model_class or 'this model'} is not a causal LM: its loss is not token cross-entropy"
    if len(heads) > 1:
        paths = ", ".join(h.path for h in heads)
        return f"{len(heads)} linear layers feed the graph output ({paths}); expected one LM head"
    if head.transposed:
        return "the head stores its weight (in, out) (Conv1D); the chunked loss expects an nn.Linear head"
    return ""


def _return_head_input(gm: fx.GraphModule, head: LinearSite) -> None:
    """The graph returns the head's input where it returned the head's output; the head's weight
    stays an attribute of the graph module, where the module reads it."""
    output = gm.graph.output_node()
    output.replace_input_with(head.node, head.input)
    attrs = [arg for arg in head.node.all_input_nodes if arg.op == "get_attr"]
    gm.graph.erase_node(head.node)
    for attr in attrs:
        if not attr.users:
            gm.graph.erase_node(attr)


def restore_lm_head(gm: fx.GraphModule, head: LMHead) -> None:
    """Undo the pass: the graph computes the logits again (a deployable graph is whole)."""
    output = gm.graph.output_node()
    hidden = output.all_input_nodes[0]
    with gm.graph.inserting_before(output):
        weight = gm.graph.get_attr(head.weight)
        bias = gm.graph.get_attr(head.bias) if head.bias else None
        logits = gm.graph.call_function(aten.linear.default, (hidden, weight, bias))
    output.replace_input_with(hidden, logits)
    gm.recompile()


PASS = PassSpec("chunk_lm_loss", chunk_lm_loss, ChunkLMLossOptions,
                "LM head out of the graph; the loss is computed a chunk of tokens at a time")
