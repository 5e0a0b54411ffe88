"""qgraph: a graph-rewriting compiler for memory-efficient quantized fine-tuning of LLMs."""

from qgraph import ops  # noqa: F401  (registers the torch.ops.qgraph namespace)
from qgraph.api import transform
from qgraph.capture import capture
from qgraph.errors import (
    CaptureError, ExportError, PassError, PlanError, PretrainedError, QGraphError, VerificationError,
)
from qgraph import export  # noqa: F401  (callable: qgraph.export(module, path) exports)
from qgraph.finalize import finalize
from qgraph.module import HFQGraphModule, QGraphModule
from qgraph.optim import param_groups
from qgraph.plans import Plan, plans
from qgraph.pretrained import from_pretrained

__all__ = [
    "CaptureError", "ExportError", "HFQGraphModule", "PassError", "Plan", "PlanError", "PretrainedError", "QGraphError",
    "QGraphModule", "VerificationError",
    "capture", "export", "finalize", "from_pretrained", "param_groups", "plans", "transform",
]
