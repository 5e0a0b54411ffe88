"""Property-based: random tiny models x every plan x random padding.

`transform` either works — finite logits, real tokens untouched by padding, every matched linear rewritten or
skipped with a reason, finalize equal to the trained forward (to float rounding) — or raises a QGraphError that
says why. Never another exception, never a silent partial rewrite. Bounded and derandomized for CI.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import qgraph
from qgraph.api import LINEAR_PASSES
from qgraph.errors import QGraphError
from qgraph.models import TINY_FAMILIES, tiny_causal_lm
from qgraph.plans import plans

LLAMA_LIKE = sorted(family for family in TINY_FAMILIES if family != "gpt2")


@st.composite
def tiny_models(draw: st.DrawFn) -> tuple[str, torch.nn.Module]:
    family = draw(st.sampled_from(sorted(TINY_FAMILIES)))
    # widths that are multiples of 16 (one head per 16) but mostly not of 64; odd vocabularies
    hidden = draw(st.sampled_from([32, 48, 80, 96]))
    vocab = draw(st.integers(67, 301))
    overrides: dict = {"tie_word_embeddings": draw(st.booleans())}
    if family in LLAMA_LIKE:
        heads = hidden // 16
        overrides["num_key_value_heads"] = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    layers = draw(st.integers(1, 2))
    description = f"{family} layers={layers} hidden={hidden} vocab={vocab} {overrides}"
    return description, tiny_causal_lm(family, layers=layers, hidden=hidden, vocab=vocab, seed=0, **overrides)


def _logits(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids, attention_mask=mask).logits


@pytest.mark.slow
@settings(max_examples=16, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=tiny_models(), plan=st.sampled_from(plans()), seq=st.integers(3, 12), padding=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_transform_works_or_says_why(model, plan, seq, padding, seed):
    description, model = model
    try:
        qm = qgraph.transform(model, plan)
    except QGraphError as error:  # a refusal must say why, in words
        assert len(str(error)) > 40, (description, plan, str(error))
        event(f"refused: {type(error).__name__}")
        return
    event("transformed")
    for report in qm.report.passes:
        if report.name in LINEAR_PASSES:
            assert len(report.rewritten) + len(report.skipped) == report.matched, (description, plan)
            assert all(record.reason for record in report.skipped), (description, plan)

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    padding = min(padding, seq - 1)
    if padding:
        mask[1, seq - padding:] = 0
        ids[1, seq - padding:] = 0
    if qm.trainable_parameters():  # one step, so LR-QAT's A is not zero when finalize folds it
        optimizer = torch.optim.SGD(qm.trainable_parameters(), lr=1e-2)
        qm.train()
        qm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        qm.eval()

    logits = _logits(qm, ids, mask)
    assert torch.isfinite(logits).all(), (description, plan)
    real = seq - padding
    alone = _logits(qm, ids[1:, :real], mask[1:, :real])
    # int8 activations (lrqat-w4a8): padding may move one rounding step of a real token's per-token scale
    tolerance = 1e-3 if plan.endswith("a8") else 1e-4
    torch.testing.assert_close(logits[1:, :real], alone, atol=tolerance, rtol=tolerance, msg=f"{description} {plan}")
    finalized = qgraph.finalize(qm)
    deployed = _logits(finalized, ids, mask)
    # equal up to float rounding, not bit for bit: both graphs run the same ops on the same integer weights
    # (test_finalize checks bitwise equality on fixed shapes), but on an AVX2 CPU (the CI machine) BLAS has
    # given one of these random small shapes an ulp of difference between two runs of the same GEMM
    torch.testing.assert_close(deployed, logits, atol=1e-6, rtol=1e-5, msg=f"{description} {plan}")
    assert torch.equal(deployed.argmax(-1), logits.argmax(-1)), (description, plan)
