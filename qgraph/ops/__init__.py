"""Fused ops under torch.ops.qgraph; importing this package registers them."""

from qgraph.ops import act_quant, autocast, int4, lrqat, nf4, rotary, round_scale  # noqa: F401
