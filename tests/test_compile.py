"""transform(..., compile=True): checkpoint regions compiled once per structure (else one compiled graph), no
graph breaks, eager numerics, no recompiles.

torch.compile takes tens of seconds on CPU even for a tiny model, so one module-scoped compile serves
most checks here."""

import io

import pytest
import torch
from rich.console import Console

import qgraph
from qgraph.graph import CHECKPOINT
from qgraph.models import tiny_causal_lm

pytestmark = pytest.mark.slow


def tokens(shape, seed=0):
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    """(eager, compiled) lrqat-w4 on the same three-layer model, checkpoints on (the plan's default): three
    regions of one structure."""
    torch._dynamo.reset()
    model = tiny_causal_lm("llama", layers=3)
    eager = qgraph.transform(model, "lrqat-w4", rank=4)
    compiled = qgraph.transform(model, "lrqat-w4", rank=4, compile=True)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def loss_and_grads(qm, ids):
    loss = qm(input_ids=ids, labels=ids).loss
    return loss, torch.autograd.grad(loss, qm.trainable_parameters())


def assert_trains_as_eager(compiled, eager, ids):
    """The compiled module's loss and gradients are eager's; returns eager's gradients."""
    loss, grads = loss_and_grads(compiled, ids)
    expected_loss, expected = loss_and_grads(eager, ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return expected


def test_transformed_module_has_no_graph_break(pair):
    eager, _ = pair
    ids = tokens((2, 8))
    explained = torch._dynamo.explain(eager.graph_module)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                         **eager.info.constant_kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_blocks_share_one_compiled_region_and_the_graph_module_is_left_as_it_was(pair):
    eager, compiled = pair
    assert compiled.report.compiled.startswith("torch.compile: 3 checkpoint regions of 1 structure, ")
    printed = Console(file=io.StringIO(), width=10_000, no_color=True)
    printed.print(compiled.report)
    assert compiled.report.compiled in printed.file.getvalue()
    assert len(compiled.graph_module.graph.find_nodes(op="call_function", target=CHECKPOINT)) == 3
    run = compiled._run
    # the compiled form shares the graph module's submodules, so qm.to(...), loads and training reach it
    assert all(getattr(run, name) is child for name, child in compiled.graph_module.named_children())
    assert len(run.graph.find_nodes(op="call_function", target=CHECKPOINT)) == 0
    calls = [n.target for n in run.graph.find_nodes(op="call_module") if n.target.startswith("compiled_region")]
    assert calls == ["compiled_region_0"] * 3
    torch._dynamo.utils.counters.clear()
    ids = tokens((2, 10), seed=3)
    compiled(input_ids=ids, labels=ids).loss.backward()
    # two graphs for three blocks: block 0 reads the frozen embedding's output, which needs no gradient (a guard
    # dynamo compiles apart); blocks 1 and 2 share the second
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    compiled.zero_grad()


def test_compiled_training_matches_eager_and_new_shapes_do_not_recompile(pair):
    eager, compiled = pair
    ids = tokens((2, 12))
    with torch.no_grad():  # A off zero, so that every gradient formula is exercised
        for qm in pair:
            for layer in range(3):
                qm.graph_module.get_submodule(f"model.layers.{layer}.mlp.up_proj").lrqat_a.fill_(0.01)
    assert_trains_as_eager(compiled, eager, ids)
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
    assert qm.report.compiled == "torch.compile: the whole graph (no checkpoint region in the graph itself)"


def test_compile_graph_compiles_the_whole_graph_and_trains_as_eager():
    torch._dynamo.reset()
    model = tiny_causal_lm("llama", layers=1)
    eager = qgraph.transform(model, "lrqat-w4", rank=4)
    compiled = qgraph.transform(model, "lrqat-w4", rank=4, compile="graph")
    assert compiled.report.compiled == "torch.compile: the whole graph (compile='graph')"
    ids = tokens((2, 12))
    assert_trains_as_eager(compiled, eager, ids)


def test_regions_of_different_lengths_compile_apart_and_train_as_eager():
    # three blocks, one region per two: a two-block region and a one-block one, two structures
    torch._dynamo.reset()
    model = tiny_causal_lm("llama", layers=3)
    eager = qgraph.transform(model, "lrqat-w4", rank=4, checkpoint={"every": 2})
    compiled = qgraph.transform(model, "lrqat-w4", rank=4, checkpoint={"every": 2}, compile=True)
    assert compiled.report.compiled.startswith("torch.compile: 2 checkpoint regions of 2 structures, ")
    ids = tokens((2, 12))
    assert_trains_as_eager(compiled, eager, ids)


def test_qst_with_checkpointed_side_blocks_compiles_and_trains_as_eager():
    # two side blocks, each checkpointed: dynamo traces sibling checkpoint regions of the same
    # module class, where a Python float read inside the first used to crash the second's trace
    torch._dynamo.reset()
    model = tiny_causal_lm("llama", layers=2)
    side_blocks = {"target": "modules", "include": ("qst_side.blocks.*",)}
    eager = qgraph.transform(model, "qst-nf4", checkpoint=side_blocks)
    compiled = qgraph.transform(model, "qst-nf4", checkpoint=side_blocks, compile=True)
    with torch.no_grad():  # mix off 1 and the head delta's up off 0, so that no gradient is all zero
        for qm in (eager, compiled):
            qm.graph_module.get_submodule("qst_side").mix.fill_(0.5)
            qm.graph_module.get_submodule("qst_head_delta").up.fill_(0.01)
    ids = tokens((2, 12))
    explained = torch._dynamo.explain(eager.graph_module)(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                         **eager.info.constant_kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    # the side blocks go through checkpoint inside the side network's forward, not as regions of the graph
    assert compiled.report.compiled == "torch.compile: the whole graph (no checkpoint region in the graph itself)"
    expected = assert_trains_as_eager(compiled, eager, ids)
    assert all(want.abs().sum() > 0 for want in expected)
