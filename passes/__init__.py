"""Rewrite passes, one per module. The registry is a plain list (ExecuTorch style)."""

from __future__ import annotations

from qgraph.errors import PlanError, unknown_name_message
from qgraph.pipeline import PassSpec

from passes import (attach_side_taps, chunk_lm_loss, fake_quant_activations, fold_lrqat, insert_checkpoints, lrqat,
                    quantize_nf4)

ALL_PASSES: list[PassSpec] = [quantize_nf4.PASS, lrqat.PASS, fake_quant_activations.PASS, fold_lrqat.PASS,
                                attach_side_taps.PASS, chunk_lm_loss.PASS, insert_checkpoints.PASS]


def get_pass(name: str) -> PassSpec:
    for spec in ALL_PASSES:
        if spec.name == name:
            return spec
    raise PlanError(unknown_name_message("pass", name, [p.name for p in ALL_PASSES]))
