"""Fused ops under torch.ops.qgraph; importing this package registers them."""

from qgraph.ops import nf4  # noqa: F401
