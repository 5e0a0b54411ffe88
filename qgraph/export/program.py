"""The module every target exports: a finalized QGraphModule called as `(input_ids, attention_mask) -> logits`.

Every artifact has this one interface (int64 [batch, seq] in, float [batch, seq, vocab] out, batch and
sequence dynamic), whatever the plan; this is where it is defined once.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.export import Dim

from qgraph.capture import MAX_BATCH
from qgraph.decode import DECODE_ARGUMENTS, kv_cache_unsupported
from qgraph.errors import ExportError
from qgraph.finalize import FOLD_PASS, finalize
from qgraph.module import QGraphModule

INPUT_NAMES = ("input_ids", "attention_mask")
DECODE_NOTE = "decode: the file takes and returns the KV cache (qgraph.decode's signature)"


def is_finalized(module: QGraphModule) -> bool:
    return any(config.name == FOLD_PASS for config in module.plan.passes)


def check_exportable(module: object) -> None:
    """Raise unless `module` is a causal LM that qgraph.transform or qgraph.finalize returned."""
    if not isinstance(module, QGraphModule):
        raise ExportError(f"qgraph.export takes the module qgraph.transform or qgraph.finalize returned, got "
                          f"{type(module).__name__}; transform the model first")
    if not module.info.is_causal_lm:
        raise ExportError(f"qgraph.export writes causal language models (input_ids, attention_mask -> logits); "
                          f"this module was captured from a {module.info.model_class or 'plain module'}")


def deployable(module: QGraphModule) -> tuple[QGraphModule, list[str]]:
    """The finalized form of what transform or finalize returned, and a note when it had to be finalized."""
    check_exportable(module)
    if is_finalized(module):
        return module, []
    return finalize(module), [f"plan {module.plan.name!r} finalized first (qgraph.finalize): the artifact holds "
                              "its frozen, deployable form"]


class LogitsProgram(nn.Module):
    """(input_ids, attention_mask) -> logits over a finalized module's graph, nothing else."""

    def __init__(self, module: QGraphModule) -> None:
        super().__init__()
        self.graph_module = module.graph_module
        self.constant_kwargs = dict(module.info.constant_kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.graph_module(input_ids=input_ids, attention_mask=attention_mask, **self.constant_kwargs).logits


def dynamic_shapes(module: QGraphModule) -> dict[str, dict[int, Dim]]:
    """Batch and sequence dynamic in both inputs, over the range the module was captured with."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=module.info.max_seq_len)
    return {name: {0: batch, 1: seq} for name in INPUT_NAMES}


def example_kwargs(module: QGraphModule) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask as the module was captured with (batch and sequence > 1: stay dynamic)."""
    return {name: module.info.example_inputs[name] for name in INPUT_NAMES}


def fp32_bytes(module: QGraphModule) -> int:
    """What the model's weights take in float32: the size an artifact's 4-bit weights are set against."""
    # a site rewritten by several passes (lrqat, then fold_lrqat) counts once, as the last pass left it
    rewritten = {r.path: r for p in module.report.passes for r in p.rewritten}.values()
    quantized_params = sum(r.params for r in rewritten)
    quantized_bytes = sum(r.bytes_after for r in rewritten)
    tensors = {id(t): t for t in (*module.graph_module.parameters(), *module.graph_module.buffers())}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    # every stored tensor that is not a quantized weight counts as it is stored (fp32 in an fp32 model)
    return stored - quantized_bytes + 4 * quantized_params


def decode_unsupported(module: QGraphModule) -> str | None:
    """Why `module` has no exportable KV-cache signature (a target's decode=True), or None."""
    if module.decode_graph is None:
        why = kv_cache_unsupported(module.info.config) if module.info.is_causal_lm else None
        if why is not None:
            return f"decode=True needs a KV-cached decode graph, which this model cannot have: {why}"
        return "decode=True needs the module's KV-cached decode graph, which this one lacks; transform with kv_cache=True"
    if any(cache.dtype == torch.bfloat16 for cache in module.decode_graph.caches):
        # the file itself could be written, but an artifact counts only once its runtime has run it
        return ("decode=True with a bfloat16 KV cache: the runners' greedy loop carries the cache as numpy arrays, "
                "which have no bfloat16, so the file could not be checked in its runtime; export a float32 module "
                "(transform without dtype=torch.bfloat16; its weights stay 4-bit in the file)")
    return None


def output_dtype(module: QGraphModule) -> torch.dtype | None:
    """The dtype of the graph's first output (the logits), as capture recorded it; None where it did not."""
    output = next(node for node in reversed(module.graph_module.graph.nodes) if node.op == "output")
    first = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    value = first.meta.get("val") if isinstance(first, fx.Node) else None
    return getattr(value, "dtype", None)


def decode_names(module: QGraphModule) -> tuple[list[str], list[str]]:
    """The decode signature's flat input and output names: ..., past_0, past_1, ... in; logits, present_0, ... out
    (the model's keys and values, then a QST side network's)."""
    count = module.decode_graph.past_count
    return ([*DECODE_ARGUMENTS, *(f"past_{i}" for i in range(count))],
            ["logits", *(f"present_{i}" for i in range(count))])
