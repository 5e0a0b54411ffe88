"""transform(..., compile=True): one compiled graph, no graph breaks, eager numerics, no recompiles.

torch.compile takes tens of seconds on CPU even for a tiny model, so one module-scoped compile serves
every check here."""

import pytest
import torch

import qgraph
from qgraph.models import tiny_causal_lm

pytestmark = pytest.mark.slow


def tokens(shape, seed=0):
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    """(eager, compiled) lrqat-w4 on the same one-layer model, checkpoints on (the plan's default)."""
    torch._dynamo.reset()
    model = tiny_causal_lm("llama", layers=1)
    eager = qgraph.transform(model, "lrqat-w4", rank=4)
    compiled = qgraph.transform(model, "lrqat-w4", rank=4, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def loss_and_grads(qm, ids):
    loss = qm(input_ids=ids, labels=ids).loss
    return loss, torch.autograd.grad(loss, qm.trainable_parameters())


def test_transformed_module_has_no_graph_break(pair):
    eager, _ = pair
    ids = tokens((2, 8))
    explained = torch._dynamo.explain(eager.graph_module)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                         **eager.info.constant_kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_training_matches_eager_and_new_shapes_do_not_recompile(pair):
    eager, compiled = pair
    ids = tokens((2, 12))
    with torch.no_grad():  # A off zero, so that every gradient formula is exercised
        for qm in pair:
            qm.graph_module.get_submodule("model.layers.0.mlp.up_proj").lrqat_a.fill_(0.01)
    loss, grads = loss_and_grads(compiled, ids)
    expected_loss, expected = loss_and_grads(eager, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # every later batch size and length reuses the graph compiled for the first (dims >= 2: torch
    # specialises a size of 1 and compiles once more for it)
    optimizer = torch.optim.AdamW(qgraph.param_groups(compiled))
    with torch.compiler.set_stance("fail_on_recompile"):
        for step, shape in enumerate([(3, 17), (4, 33), (2, 9)]):
            compiled(input_ids=tokens(shape, seed=step), labels=tokens(shape, seed=step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        ids = tokens((2, 20), seed=9)
        eager.load_state_dict(compiled.state_dict())
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_compile_does_not_duplicate_state():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1), "nf4", compile=True)
    assert all(key.startswith("graph_module.") for key in qm.state_dict())


def test_qst_with_checkpointed_side_blocks_compiles_and_trains_as_eager():
    # two side blocks, each checkpointed: dynamo traces sibling checkpoint regions of the same
    # module class, where a Python float read inside the first used to crash the second's trace
    torch._dynamo.reset()
    model = tiny_causal_lm("llama", layers=2)
    side_blocks = {"target": "modules", "include": ("qst_side.blocks.*",)}
    eager = qgraph.transform(model, "qst-nf4", checkpoint=side_blocks)
    compiled = qgraph.transform(model, "qst-nf4", checkpoint=side_blocks, compile=True)
    with torch.no_grad():  # mix off 1, so that the side network's gradients are not all zero
        for qm in (eager, compiled):
            qm.graph_module.get_submodule("qst_side").mix.fill_(0.5)
    ids = tokens((2, 12))
    explained = torch._dynamo.explain(eager.graph_module)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                         **eager.info.constant_kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    loss, grads = loss_and_grads(compiled, ids)
    expected_loss, expected = loss_and_grads(eager, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
