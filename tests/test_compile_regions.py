"""Which checkpoint regions one compiled function can serve (qgraph.compile.region_key); no compiling here."""

import pytest
import torch
from torch import fx

import qgraph
from qgraph.compile import compile_mode, graph_structure, region_calls, region_key, whole_graph_reason
from qgraph.errors import QGraphError
from qgraph.models import tiny_causal_lm


def keys(qm):
    gm = qm.graph_module
    return [region_key(gm, call) for call in region_calls(gm)]


def test_every_block_region_of_a_model_has_one_key():
    found = keys(qgraph.transform(tiny_causal_lm("llama", layers=3), "lrqat-w4", rank=4))
    assert len(found) == 3 and found[0] is not None and len(set(found)) == 1


def test_regions_of_two_and_one_blocks_differ():
    found = keys(qgraph.transform(tiny_causal_lm("llama", layers=3), "lrqat-w4", rank=4, checkpoint={"every": 2}))
    assert len(found) == 2 and len(set(found)) == 2


def test_a_checkpointed_module_with_its_own_weights_has_no_key():
    side_network = {"target": "modules", "include": ("qst_side",)}  # a call_module node, through checkpoint
    found = keys(qgraph.transform(tiny_causal_lm("llama", layers=2), "qst-nf4", checkpoint=side_network))
    assert found == [None]


def traced(fn):
    return fx.symbolic_trace(fn).graph


def test_the_structure_ignores_node_names_but_not_ops_or_wiring():
    structure = graph_structure(traced(lambda x, y: torch.mul(torch.add(x, y), x)))
    assert graph_structure(traced(lambda p, q: torch.mul(torch.add(p, q), p))) == structure  # renamed
    assert graph_structure(traced(lambda x, y: torch.mul(torch.sub(x, y), x))) != structure  # another op
    assert graph_structure(traced(lambda x, y: torch.mul(torch.add(x, y), y))) != structure  # another wiring


def test_what_sends_a_graph_to_the_whole_graph_compile():
    gm = qgraph.transform(tiny_causal_lm("llama", layers=3), "lrqat-w4", rank=4).graph_module
    calls = region_calls(gm)
    assert whole_graph_reason(gm, calls, dict.fromkeys(region_key(gm, call) for call in calls)) == ""
    assert whole_graph_reason(gm, [], {}) == "no checkpoint region in the graph itself"
    assert "holds its own tensors" in whole_graph_reason(gm, calls, {None: None})
    assert whole_graph_reason(gm, calls, dict.fromkeys([("a",), ("b",), ("c",)])).startswith("3 distinct")
    gm.register_buffer("stray", torch.zeros(1))  # a tensor of the graph module itself: a copy would not follow .to()
    assert "tensors of its own" in whole_graph_reason(gm, calls, dict.fromkeys(region_key(gm, c) for c in calls))


def test_compile_takes_true_false_or_a_mode_and_refuses_the_rest_before_capture():
    assert [compile_mode(v) for v in (False, True, "regions", "graph")] == [None, "regions", "regions", "graph"]
    with pytest.raises(QGraphError, match=r"compile must be False, True \(= 'regions'\) or one of 'regions', 'graph'"):
        compile_mode("grpah")

    class Uncapturable(torch.nn.Module):  # transform would fail to capture it: the refusal must come first
        def forward(self, x):
            raise AssertionError("captured")

    with pytest.raises(QGraphError, match="got 1"):
        qgraph.transform(Uncapturable(), "nf4", compile=1)
