import pytest
import torch
from torch import fx

import qgraph
from qgraph.decode import signature_args
from qgraph.graph import get_attr_tensor
from qgraph.inference_graph import inference_graph
from qgraph.models import tiny_causal_lm
from qgraph.ops import eager_kernels
from tests.conftest import random_ids


def decode_graph(plan: str):
    """(module, its decode graph); "lrqat-w4-final": a finalized lrqat-w4 module (int4 linears)."""
    if plan == "lrqat-w4-final":
        qm = qgraph.finalize(qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4"))
    else:
        qm = qgraph.transform(tiny_causal_lm("llama", layers=2), plan)
    return qm, qm.tied_decode_graph()


def called(gm: fx.GraphModule) -> set:
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("plan", ["nf4", "qst-nf4", "lrqat-w4-final"])
def test_the_inference_form_computes_what_its_source_does(plan):
    _, decode = decode_graph(plan)
    args = signature_args(decode.example_inputs)
    form = inference_graph(decode.graph_module)
    with torch.inference_mode():
        expected, got = decode.graph_module(*args), form.module(*args)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("plan", ["nf4", "lrqat-w4-final"])
def test_it_reads_plain_attributes_and_calls_the_plain_kernels(plan):
    _, decode = decode_graph(plan)
    form = inference_graph(decode.graph_module)
    linear_ops = called(decode.graph_module) & set(eager_kernels())
    assert linear_ops  # the source calls a deployed linear op
    calls = called(form.module)
    assert not calls & linear_ops
    assert {eager_kernels()[op] for op in linear_ops} <= calls
    for node in form.module.graph.find_nodes(op="get_attr"):
        assert "." not in node.target and node.target in form.module.__dict__  # no path, no __getattr__
        assert form.module.__dict__[node.target] is get_attr_tensor(decode.graph_module, form.tensors[node.target])
    # the source is untouched: it still calls the registered ops
    assert linear_ops <= called(decode.graph_module)


def test_a_refresh_reads_the_source_as_it_is_now():
    _, decode = decode_graph("nf4")
    args = signature_args(decode.example_inputs)
    form = inference_graph(decode.graph_module)
    name = next(n for n in form.tensors.values() if n.endswith("input_layernorm.weight"))
    owner, _, attr = name.rpartition(".")
    new_weight = torch.nn.Parameter(get_attr_tensor(decode.graph_module, name).detach() * 3)
    setattr(decode.graph_module.get_submodule(owner), attr, new_weight)  # as qm.to(...) replaces tensors
    with torch.inference_mode():
        stale = form.module(*args)[0]
        fresh = form.refresh(decode.graph_module)(*args)[0]
        expected = decode.graph_module(*args)[0]
    assert not torch.equal(stale, expected)
    assert torch.equal(fresh, expected)


def test_generate_steps_the_inference_form_and_returns_a_plain_tensor():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "nf4")
    out = qm.generate(random_ids((1, 5), seed=1), max_new_tokens=3)
    assert qm.decode_session().run is qm.decode_graph.inference.module  # generation steps the inference form
    assert not out.is_inference()
    out.add_(0)  # in place: an inference tensor would refuse
