import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import qgraph
from qgraph.errors import PlanError
from qgraph.graph import count_ops, linear_sites
from qgraph.ops.nf4 import decode_nf4, quantize_nf4
from qgraph.report import REWRITTEN, SKIPPED
from qgraph.models import tiny_causal_lm
from tests.ops.test_nf4 import bitsandbytes_linear

NF4 = torch.ops.qgraph.nf4_linear
aten = torch.ops.aten
LAYERS = 2
LLAMA_SITES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NF4_BUFFERS = ("nf4_packed", "nf4_absmax", "nf4_code", "nf4_nested_absmax", "nf4_nested_code", "nf4_offset")


def decoded(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> torch.Tensor:
    q = quantize_nf4(w, blocksize, double_quant)
    return decode_nf4(q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset, *q.shape,
                      q.blocksize, q.nested_blocksize)


def with_bnb_linear4bit(model: nn.Module, prefix: str) -> nn.Module:
    """A copy of `model` with every nn.Linear under `prefix` a bitsandbytes NF4 Linear4bit."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and name.startswith(prefix)):
            continue
        bias = None if module.bias is None else module.bias.detach().clone()
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, bitsandbytes_linear(module.weight.detach().clone(), bias))
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# --- Llama ----------------------------------------------------------------------------------------------


def test_llama_node_counts(llama_nf4):
    _, qm = llama_nf4
    counts = count_ops(qm.graph_module)
    assert {op: counts.get(op, 0) for op in (NF4, aten.linear, aten.addmm, aten.mm)} == {
        NF4: 7 * LAYERS, aten.linear: 1, aten.addmm: 0, aten.mm: 0}
    [site] = linear_sites(qm.graph_module)
    assert site.path == "lm_head"


def test_llama_nf4_nodes_keep_their_module_paths(llama_nf4):
    _, qm = llama_nf4
    nodes = [n for n in qm.graph_module.graph.nodes if n.target == NF4.default]
    paths = [n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0] for n in nodes]
    assert paths == [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LLAMA_SITES]
    q_proj = nodes[0]
    assert q_proj.args[8:] == (64, 64, 64, 256)  # out, in, blocksize, nested blocksize
    assert all(a.op == "get_attr" for a in q_proj.args[1:7])
    assert q_proj.args[7] is None  # no bias


def test_llama_matches_bitsandbytes_linear4bit(llama_nf4, make_ids):
    model, qm = llama_nf4
    reference = with_bnb_linear4bit(model, "model.layers.")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reference.modules()) == 7 * LAYERS
    # the same bytes as bitsandbytes stores
    layer = reference.model.layers[1].mlp.down_proj
    stored = qm.graph_module.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(stored.nf4_packed, layer.weight.data)
    assert torch.equal(stored.nf4_absmax, layer.weight.quant_state.absmax)
    for shape in [(3, 11), (1, 1), (5, 40)]:
        ids = make_ids(shape, seed=shape[1])
        got = logits(qm, ids)
        torch.testing.assert_close(got, logits(reference, ids, use_cache=False), rtol=0, atol=1e-5)
        assert (got - logits(model, ids, use_cache=False)).abs().max() > 1e-3  # it did quantize


def test_llama_report(llama_nf4):
    model, qm = llama_nf4
    report = qm.report["quantize_nf4"]
    assert report.ran and report.matched == 7 * LAYERS
    assert report.options == {"blocksize": 64, "double_quant": True, "include": None, "exclude": ()}
    assert [r.path for r in report.records] == [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LLAMA_SITES]
    assert all(r.action == REWRITTEN for r in report.records) and report.skipped == []
    for record in report.records:
        w = model.get_submodule(record.path).weight
        assert record.params == w.numel()
        assert record.bytes_before == 4 * w.numel()
        assert record.bytes_after == quantize_nf4(w).nbytes()
        assert record.detail == f"{w.shape[0]}x{w.shape[1]} linear"
    assert report.params == sum(r.params for r in report.records) == LAYERS * (
        2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 256)
    assert report.bytes_after / report.bytes_before < 0.17


def test_llama_state_is_nf4_buffers_and_frozen(llama_nf4):
    _, qm = llama_nf4
    gm = qm.graph_module
    assert sum(p.numel() for p in qm.parameters() if p.requires_grad) == 0
    params = dict(gm.named_parameters())
    assert sorted(params) == sorted(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in ("input_layernorm", "post_attention_layernorm")])
    buffers = dict(gm.named_buffers())
    for i in range(LAYERS):
        for site in LLAMA_SITES:
            assert all(f"model.layers.{i}.{site}.{b}" in buffers for b in NF4_BUFFERS)
            assert not hasattr(gm.get_submodule(f"model.layers.{i}.{site}"), "weight")
    assert "graph_module.model.layers.0.mlp.up_proj.nf4_packed" in qm.state_dict()


def test_user_model_keeps_its_linears_and_weights(tiny_llama, snapshot, make_ids):
    before = snapshot(tiny_llama)
    ids = make_ids((2, 7))
    expected = logits(tiny_llama, ids, use_cache=False)
    qgraph.transform(tiny_llama, "nf4")
    assert sum(isinstance(m, nn.Linear) for m in tiny_llama.modules()) == 7 * LAYERS + 1
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, nn.Linear)
    state = tiny_llama.state_dict()
    assert state.keys() == before.state.keys()
    assert all(torch.equal(state[k], v) for k, v in before.state.items())
    assert {k: type(m) for k, m in tiny_llama.named_modules()} == before.module_types
    assert torch.equal(logits(tiny_llama, ids, use_cache=False), expected)


def test_user_model_stays_trainable(tiny_llama):
    qgraph.transform(tiny_llama, "nf4")
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_plain_module_keeps_its_weights(snapshot):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    before = snapshot(model)
    qgraph.transform(model, "nf4", include=("*",))
    before.assert_unchanged(model)


# --- selection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "quantized"),
    [
        ({"exclude": "*.mlp.*"}, [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LLAMA_SITES[:4]]),
        ({"exclude": ("*.mlp.*", "*.o_proj")}, [f"model.layers.{i}.self_attn.{s}_proj" for i in range(LAYERS)
                                               for s in "qkv"]),
        ({"include": "model.layers.1.*"}, [f"model.layers.1.{s}" for s in LLAMA_SITES]),
        ({"include": ("lm_head",)}, ["lm_head"]),
        ({"include": ("*",), "exclude": ("model.*",)}, ["lm_head"]),
    ],
)
def test_include_and_exclude_globs(tiny_llama, make_ids, options, quantized):
    qm = qgraph.transform(tiny_llama, "nf4", **options)
    report = qm.report["quantize_nf4"]
    assert [r.path for r in report.rewritten] == quantized
    assert report.matched == len(quantized)
    counts = count_ops(qm.graph_module)
    assert counts.get(NF4, 0) == len(quantized)
    assert counts[aten.linear] == 7 * LAYERS + 1 - len(quantized)
    every = [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LLAMA_SITES] + ["lm_head"]
    assert [s.path for s in linear_sites(qm.graph_module)] == [p for p in every if p not in quantized]


def test_globs_that_select_nothing_are_an_error_with_the_model_unchanged(tiny_llama, snapshot):
    before = snapshot(tiny_llama)
    with pytest.raises(PlanError, match=r"quantize_nf4: include glob 'nothing\.\*' names none of the graph's"):
        qgraph.transform(tiny_llama, "nf4", include=("nothing.*",))
    with pytest.raises(PlanError, match=r"plan 'nf4' rewrote nothing: exclude=\['\*'\] left none of the graph's"):
        qgraph.transform(tiny_llama, "nf4", exclude=("*",))
    before.assert_unchanged(tiny_llama)


def test_blocksize_and_double_quant_options(tiny_llama, make_ids):
    qm = qgraph.transform(tiny_llama, "nf4", blocksize=256, double_quant=False)
    down = qm.graph_module.get_submodule("model.layers.0.mlp.down_proj")
    assert down.nf4_absmax.dtype == torch.float32 and down.nf4_absmax.numel() == 64 * 256 // 256
    assert not hasattr(down, "nf4_nested_absmax")
    reference = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for i in range(LAYERS):
            for site in LLAMA_SITES:
                linear = reference.get_submodule(f"model.layers.{i}.{site}")
                linear.weight.copy_(decoded(linear.weight, 256, double_quant=False))
    ids = make_ids((2, 9))
    torch.testing.assert_close(logits(qm, ids), logits(reference, ids, use_cache=False), rtol=0, atol=1e-5)


# --- GPT-2 (Conv1D, tied LM head) --------------------------------------------------------------------------


def test_gpt2_conv1d_sites_become_nf4(tiny_gpt2, make_ids):
    qm = qgraph.transform(tiny_gpt2, "nf4")
    counts = count_ops(qm.graph_module)
    assert counts[NF4] == 4 * LAYERS
    assert aten.addmm not in counts and aten.mm not in counts
    assert counts[aten.linear] == 1
    [lm_head] = linear_sites(qm.graph_module)
    assert lm_head.path == "lm_head"
    assert torch.equal(qm.graph_module.get_submodule("lm_head").weight, tiny_gpt2.transformer.wte.weight)
    report = qm.report["quantize_nf4"]
    assert [r.path for r in report.rewritten] == [f"transformer.h.{i}.{s}" for i in range(LAYERS)
                                                  for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert report.rewritten[0].detail == "192x64 addmm"
    # the Conv1D weight (in, out) was quantized as the (out, in) matrix it multiplies with
    reference = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        for module in reference.transformer.h.modules():
            if isinstance(module, Conv1D):
                module.weight.copy_(decoded(module.weight.t().contiguous()).t())
                assert module.bias is not None
    ids = make_ids((3, 10))
    got = logits(qm, ids)
    torch.testing.assert_close(got, logits(reference, ids, use_cache=False), rtol=0, atol=1e-5)
    assert (got - logits(tiny_gpt2, ids, use_cache=False)).abs().max() > 1e-3


def test_gpt2_tied_lm_head_is_skipped_with_a_reason(tiny_gpt2):
    qm = qgraph.transform(tiny_gpt2, "nf4", include=("lm_head", "transformer.h.0.mlp.c_fc"))
    report = qm.report["quantize_nf4"]
    assert report.matched == 2 and [r.path for r in report.rewritten] == ["transformer.h.0.mlp.c_fc"]
    [record] = report.skipped
    assert record.path == "lm_head" and record.action == SKIPPED
    assert "tied" in record.reason and "lm_head.weight" in record.reason and "embedding" in record.reason
    assert record.params == 0 and record.bytes_after == 0
    counts = count_ops(qm.graph_module)
    assert counts[NF4] == 1 and counts[aten.linear] == 1 and counts[aten.addmm] == 4 * LAYERS - 1


def test_a_tied_head_alone_rewrites_nothing_and_the_error_says_why(tiny_gpt2):
    with pytest.raises(PlanError, match=r"rewrote nothing: every matched linear was skipped \(lm_head: weight "
                                        r"lm_head\.weight is also read by embedding \(tied\)"):
        qgraph.transform(tiny_gpt2, "nf4", include=("lm_head",))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families(family, make_ids):
    """qwen2 has biases on q, k, v: they ride along as the op's bias."""
    model = tiny_causal_lm(family)
    qm = qgraph.transform(model, "nf4")
    assert count_ops(qm.graph_module)[NF4] == 7 * LAYERS
    biased = [n for n in qm.graph_module.graph.nodes if n.target == NF4.default and n.args[7] is not None]
    assert len(biased) == (3 * LAYERS if family == "qwen2" else 0)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in range(LAYERS):
            for site in LLAMA_SITES:
                linear = reference.get_submodule(f"model.layers.{i}.{site}")
                linear.weight.copy_(decoded(linear.weight))
    ids = make_ids((2, 8))
    torch.testing.assert_close(logits(qm, ids), logits(reference, ids, use_cache=False), rtol=0, atol=1e-5)
