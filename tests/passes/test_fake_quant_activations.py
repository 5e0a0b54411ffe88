"""fake_quant_activations: the input of every quantized decoder linear goes through the int8 per-token fake
quant; plan lrqat-w4a8 trains with it, and finalize keeps it (trained forward == deployed forward)."""

from __future__ import annotations

import copy

import pytest
import torch

import qgraph
from passes.fake_quant_activations import FakeQuantActivationsOptions, fake_quant_activations
from qgraph.graph import flat_graph, module_path
from qgraph.models import tiny_causal_lm
from qgraph.ops.act_quant import FAKE_QUANT_ACT, fake_quant_per_token_reference
from qgraph.pipeline import PassContext
from qgraph.report import ADDED
from tests.conftest import random_ids

LRQAT = torch.ops.qgraph.lrqat_linear.default
INT4 = torch.ops.qgraph.int4_linear.default
LLAMA_LINEARS_PER_LAYER = 7
# q/k/v read one tensor, gate/up another: o_proj and down_proj read their own
LLAMA_INPUTS_PER_LAYER = 4


def calls(graph: torch.fx.Graph, target) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]


def logits(qm: qgraph.QGraphModule, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return qm(input_ids=ids).logits


@pytest.fixture(scope="module")
def w4a8() -> qgraph.QGraphModule:
    return qgraph.transform(tiny_causal_lm("llama", layers=2, hidden=64), "lrqat-w4a8")


def test_every_decoder_linear_reads_a_fake_quantized_input(w4a8):
    graph = flat_graph(w4a8.graph_module)  # the plan checkpoints every block: look inside the regions
    linears = calls(graph, LRQAT)
    assert len(linears) == 2 * LLAMA_LINEARS_PER_LAYER
    assert all(n.args[0].target == FAKE_QUANT_ACT for n in linears)
    assert len(calls(graph, FAKE_QUANT_ACT)) == 2 * LLAMA_INPUTS_PER_LAYER
    # inserted before insert_checkpoints: the fake quants are inside the regions, none left outside
    assert calls(w4a8.graph_module.graph, FAKE_QUANT_ACT) == []
    # the LM head is not a decoder linear: its input is not quantized
    assert all(module_path(u).startswith("model.layers.") for n in calls(graph, FAKE_QUANT_ACT) for u in n.users)
    report = next(p for p in w4a8.report.passes if p.name == "fake_quant_activations")
    assert [r.action for r in report.records] == [ADDED] * 2 * LLAMA_LINEARS_PER_LAYER


def test_forward_equals_the_plain_pytorch_reference():
    """lrqat-w4a8 == lrqat-w4 (group 32, bf16 scales) with each linear's input put through the reference round trip."""
    model = tiny_causal_lm("llama", layers=1, hidden=64)
    w4a8 = qgraph.transform(model, "lrqat-w4a8", checkpoint="none")
    reference = qgraph.transform(model, "lrqat-w4", group_size=32, scale_dtype="bfloat16", checkpoint="none")
    graph = reference.graph_module.graph
    for node in calls(graph, LRQAT):
        with graph.inserting_before(node):
            node.args = (graph.call_function(fake_quant_per_token_reference, (node.args[0],)), *node.args[1:])
    reference.graph_module.recompile()
    ids = random_ids((2, 9), seed=1)
    got, want = logits(w4a8, ids), logits(reference, ids)
    assert torch.equal(got, want)
    plain = qgraph.transform(model, "lrqat-w4", group_size=32, checkpoint="none")
    assert not torch.equal(got, logits(plain, ids))  # the activations' rounding does change the output


def test_trains_and_finalizes_to_the_same_forward():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2, hidden=64), "lrqat-w4a8")
    params = [p for p in qm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = random_ids((2, 12), seed=2)
    for _ in range(2):  # through the checkpoint regions' recompute (selective: it counts the linear ops)
        loss = qm(input_ids=ids, labels=ids).loss
        loss.backward()
        # every parameter gets a gradient (B's is zero while A is: the plan starts at A = 0)
        assert all(p.grad is not None for p in params)
        assert all(bool(p.grad.abs().sum() > 0) for name, p in qm.named_parameters() if name.endswith("lrqat_a"))
        optimizer.step()
        optimizer.zero_grad()
    qm.eval()
    finalized = qgraph.finalize(qm)
    graph = finalized.graph_module.graph
    assert calls(graph, LRQAT) == [] and all(n.args[0].target == FAKE_QUANT_ACT for n in calls(graph, INT4))
    assert torch.equal(logits(finalized, ids), logits(qm, ids))


def test_nothing_to_quantize_is_a_note_and_no_change():
    rtn = qgraph.transform(tiny_causal_lm("llama", layers=1, hidden=64), "nf4")
    gm = copy.deepcopy(rtn.graph_module)
    before = gm.code
    result = fake_quant_activations(gm, PassContext(rtn.info.example_inputs), FakeQuantActivationsOptions())
    assert not result.modified and gm.code == before
    assert "no qgraph::lrqat_linear" in result.report.notes[0]


def test_exclude_leaves_those_linears_alone():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1, hidden=64), "lrqat-w4a8", checkpoint="none",
                          exclude=("*.mlp.*",))
    linears = calls(qm.graph_module.graph, LRQAT)
    quantized = {module_path(n).rpartition(".")[2] for n in linears if n.args[0].target == FAKE_QUANT_ACT}
    assert quantized == {"q_proj", "k_proj", "v_proj", "o_proj"}
