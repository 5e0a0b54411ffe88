"""Optimizer parameter groups for LR-QAT: the low-rank A, B and the scales s train at different rates."""

from __future__ import annotations

import torch
from torch import nn

from qgraph.errors import QGraphError
from qgraph.graph import flat_graph, get_attr_tensor
from qgraph.ops.round_scale import scale_source

# The paper (Bondarenko et al. 2024): AdamW, beta2 0.95, lr 1e-3 for A and B and 1e-5 for s, no weight decay.
BETAS = (0.9, 0.95)


def param_groups(qm: nn.Module, lr_ab: float = 1e-3, lr_s: float = 1e-5,
                 weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for `torch.optim.AdamW(param_groups(qm))`.

    "lrqat_ab": every trainable A and B (lr_ab, weight_decay); "lrqat_scale": every trainable scale
    (lr_s, never decayed: shrinking a quantization step towards zero is not a regulariser). Any other
    trainable parameter (a pass besides lrqat marked it) goes to "other" with lr_ab and weight_decay,
    so nothing trainable is left out of the optimizer. Empty groups are omitted.
    """
    graph_module = getattr(qm, "graph_module", qm)
    if not hasattr(graph_module, "graph"):
        raise TypeError(f"param_groups takes a QGraphModule (or its GraphModule), got {type(qm).__name__}")
    ab, scales = _lrqat_parameters(graph_module)
    seen = {id(p) for p in (*ab, *scales)}
    other = [p for p in qm.parameters() if p.requires_grad and id(p) not in seen]
    if not ab and not scales:
        plan = getattr(getattr(qm, "plan", None), "name", None)
        where = f" (plan {plan!r})" if plan else ""
        raise QGraphError(
            f"this module has no trainable LR-QAT parameters{where}: transform it with an lrqat plan that trains "
            "A, B or the scales (lrqat-w4, peqa-w4, ...; rtn-w4 trains nothing), or build the optimizer "
            "from qm.trainable_parameters() yourself")
    groups = [
        {"name": "lrqat_ab", "params": ab, "lr": lr_ab, "weight_decay": weight_decay, "betas": BETAS},
        {"name": "lrqat_scale", "params": scales, "lr": lr_s, "weight_decay": 0.0, "betas": BETAS},
        {"name": "other", "params": other, "lr": lr_ab, "weight_decay": weight_decay, "betas": BETAS},
    ]
    return [group for group in groups if group["params"]]


def _lrqat_parameters(gm: torch.fx.GraphModule) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(A and B, scales) that require grad, read off the lrqat_linear nodes (args 2, 3 and 4)."""
    ab: dict[int, nn.Parameter] = {}
    scales: dict[int, nn.Parameter] = {}
    for node in flat_graph(gm).nodes:  # ops inside checkpoint regions too
        if node.op != "call_function" or node.target != torch.ops.qgraph.lrqat_linear.default:
            continue
        for index, bucket in ((2, ab), (3, ab), (4, scales)):
            arg = scale_source(node.args[index])  # a scale may be read through qgraph::round_scale
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                tensor = get_attr_tensor(gm, arg.target)
                if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                    bucket.setdefault(id(tensor), tensor)
    return list(ab.values()), list(scales.values())
