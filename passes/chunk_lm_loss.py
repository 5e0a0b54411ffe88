"""chunk_lm_loss: move the LM head out of the graph so the loss never builds the whole logits tensor.

The graph then returns the hidden state that entered the head; `HFQGraphModule` computes the loss from
it with `qgraph.loss.linear_cross_entropy`, a chunk of tokens at a time (and the full logits only
when they are asked for). Only a head whose output is the graph's output qualifies, alone or plus a
`LowRankHeadDelta` of the same input (QST's `head_rank`), which moves out with it: a head followed
by more work (a classifier's pooling, logit soft-capping) is left alone and reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from qgraph.capture import capture_info, is_causal_lm_class
from qgraph.graph import LinearSite, linear_sites
from qgraph.loss import LMHead, LowRankHeadDelta
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
    """Linear sites whose result is itself one of the graph's outputs, or is one with a head delta added."""
    outputs = set(gm.graph.output_node().all_input_nodes)
    return [site for site in linear_sites(gm) if site.node in outputs or head_delta_sum(gm, site) in outputs]


def head_delta_sum(gm: fx.GraphModule, head: LinearSite) -> fx.Node | None:
    """The node `head(x) + delta(x)` where a LowRankHeadDelta reads the head's input x, if there is one."""
    for user in head.node.users:
        if user.op == "call_function" and user.target is aten.add.Tensor and len(user.args) == 2:
            other = user.args[1] if user.args[0] is head.node else user.args[0]
            if isinstance(other, fx.Node) and other.op == "call_module" and other.args == (head.input,) \
                    and isinstance(gm.get_submodule(str(other.target)), LowRankHeadDelta):
                return user
    return None


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
    delta = _return_head_input(gm, head)
    # a new CaptureInfo (shallow: config and example inputs stay shared) rather than an edit of the
    # captured one, which other graph modules may share (finalize's copy shares it with the original)
    gm.meta["qgraph"] = dataclasses.replace(info, lm_head=LMHead(head.weight_name, head.bias_name,
                                                                options.chunk_tokens, delta))
    with_delta = f" plus its low-rank delta {delta}" if delta else ""
    report.records.append(SiteRecord(
        head.path, REWRITTEN, params=head.in_features * head.out_features,
        detail=f"{head.out_features}x{head.in_features} head{with_delta}; loss in chunks of "
               f"{options.chunk_tokens} tokens"))
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


def _return_head_input(gm: fx.GraphModule, head: LinearSite) -> str | None:
    """The graph returns the head's input where it returned the head's output (or that plus its delta); the
    head's weight and delta stay attributes of the graph module, where the module reads them. Returns the
    delta's path, if any."""
    output = gm.graph.output_node()
    total = head_delta_sum(gm, head)
    delta = None
    if total is not None:
        delta_node = next(arg for arg in total.args if arg is not head.node)
        delta = str(delta_node.target)
        output.replace_input_with(total, head.input)
        gm.graph.erase_node(total)
        gm.graph.erase_node(delta_node)
    output.replace_input_with(head.node, head.input)
    attrs = [arg for arg in head.node.all_input_nodes if arg.op == "get_attr"]
    gm.graph.erase_node(head.node)
    for attr in attrs:
        if not attr.users:
            gm.graph.erase_node(attr)
    return delta


def restore_lm_head(gm: fx.GraphModule, head: LMHead) -> None:
    """Undo the pass: the graph computes the logits again (a deployable graph is whole)."""
    output = gm.graph.output_node()
    hidden = output.all_input_nodes[0]
    with gm.graph.inserting_before(output):
        weight = gm.graph.get_attr(head.weight)
        bias = gm.graph.get_attr(head.bias) if head.bias else None
        logits = gm.graph.call_function(aten.linear.default, (hidden, weight, bias))
        if head.delta:
            delta = gm.graph.call_module(head.delta, (hidden,))
            logits = gm.graph.call_function(aten.add.Tensor, (logits, delta))
    output.replace_input_with(hidden, logits)
    gm.recompile()


PASS = PassSpec("chunk_lm_loss", chunk_lm_loss, ChunkLMLossOptions,
                "LM head out of the graph; the loss is computed a chunk of tokens at a time")
