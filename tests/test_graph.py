import re

import networkx as nx
import pytest
import torch
from torch import fx, nn

import qgraph
from qgraph.graph import (
    LINEAR_COLOR,
    QGRAPH_COLOR,
    block_sites,
    count_ops,
    decoder_blocks,
    get_attr_tensor,
    linear_sites,
    module_graph,
    module_path,
    module_stack,
    select_sites,
    to_dot,
    to_networkx,
)

aten = torch.ops.aten
LAYERS = 2

LLAMA_LAYER = [  # (name, in, out) for hidden 64, 4 heads, 2 KV heads, FFN 256
    ("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 64, 32), ("self_attn.v_proj", 64, 32),
    ("self_attn.o_proj", 64, 64), ("mlp.gate_proj", 64, 256), ("mlp.up_proj", 64, 256), ("mlp.down_proj", 256, 64),
]
GPT2_LAYER = [("attn.c_attn", 64, 192), ("attn.c_proj", 64, 64), ("mlp.c_fc", 64, 256), ("mlp.c_proj", 256, 64)]


# --- linear sites ---------------------------------------------------------------------------------------


def test_llama_linear_sites(llama_capture):
    _, gm = llama_capture
    sites = linear_sites(gm)
    assert len(sites) == 7 * LAYERS + 1
    expected = [(f"model.layers.{i}.{name}", fin, fout) for i in range(LAYERS) for name, fin, fout in LLAMA_LAYER]
    expected.append(("lm_head", 64, 256))
    assert [(s.path, s.in_features, s.out_features) for s in sites] == expected
    for site in sites:
        assert site.kind == "linear" and site.node.target == aten.linear.default
        assert site.transposed is False
        assert site.weight_name == f"{site.path}.weight"
        assert site.bias_name is None  # Llama linears have no bias
        assert get_attr_tensor(gm, site.weight_name).shape == (site.out_features, site.in_features)
        assert site.node.args[0] is site.input
        assert module_path(site.node) == site.path


def test_gpt2_conv1d_sites_are_transposed_addmm(gpt2_capture):
    _, gm = gpt2_capture
    sites = linear_sites(gm)
    assert len(sites) == 4 * LAYERS + 1
    decoder, lm_head = sites[:-1], sites[-1]
    expected = [(f"transformer.h.{i}.{name}", fin, fout) for i in range(LAYERS) for name, fin, fout in GPT2_LAYER]
    assert [(s.path, s.in_features, s.out_features) for s in decoder] == expected
    for site in decoder:
        assert site.kind == "addmm" and site.node.target == aten.addmm.default
        assert site.transposed is True
        assert site.weight_name == f"{site.path}.weight" and site.bias_name == f"{site.path}.bias"
        # Conv1D stores its weight (in, out)
        assert get_attr_tensor(gm, site.weight_name).shape == (site.in_features, site.out_features)
        assert get_attr_tensor(gm, site.bias_name).shape == (site.out_features,)
    assert (lm_head.path, lm_head.kind, lm_head.transposed) == ("lm_head", "linear", False)
    assert (lm_head.in_features, lm_head.out_features) == (64, 256)


def test_symbolic_traced_linears_are_module_sites():
    mlp = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8))
    gm = qgraph.capture(mlp)
    sites = linear_sites(gm)
    assert [(s.path, s.kind, s.weight_name, s.bias_name, s.in_features, s.out_features) for s in sites] == [
        ("0", "module", "0.weight", None, 16, 32), ("2", "module", "2.weight", "2.bias", 32, 8)]
    assert all(s.node.op == "call_module" and not s.transposed for s in sites)


def test_module_stack_runs_outermost_to_innermost(llama_capture):
    _, gm = llama_capture
    site = linear_sites(gm)[0]
    stack = module_stack(site.node)
    assert [path for path, _ in stack] == ["", "model", "model.layers.0", "model.layers.0.self_attn",
                                           "model.layers.0.self_attn.q_proj"]
    assert stack[-1][1] == "torch.nn.modules.linear.Linear"
    assert stack[2][1].endswith("LlamaDecoderLayer")
    placeholder = gm.graph.find_nodes(op="placeholder")[0]
    assert module_stack(placeholder) == [] and module_path(placeholder) == ""


# --- selection ------------------------------------------------------------------------------------------


def test_select_sites_with_globs(llama_capture):
    _, gm = llama_capture
    sites = linear_sites(gm)
    mlp = select_sites(sites, ["model.layers.*.mlp.*"])
    assert [s.path for s in mlp] == [f"model.layers.{i}.mlp.{n}" for i in range(LAYERS)
                                     for n in ("gate_proj", "up_proj", "down_proj")]
    assert [s.path for s in select_sites(sites, ["model.layers.*.mlp.*"], ["*.down_proj"])] == [
        f"model.layers.{i}.mlp.{n}" for i in range(LAYERS) for n in ("gate_proj", "up_proj")]
    both = select_sites(sites, ["lm_head", "model.layers.1.self_attn.q_proj"])
    assert [s.path for s in both] == ["model.layers.1.self_attn.q_proj", "lm_head"]  # graph order
    assert len(select_sites(sites, ["*"], ["*.self_attn.*"])) == 3 * LAYERS + 1
    assert select_sites(sites, ["model.layers.9.*"]) == []
    assert select_sites(sites, ["*"], ["*"]) == []


def test_one_string_glob_is_one_glob_not_its_characters(llama_capture):
    sites = linear_sites(llama_capture[1])
    assert select_sites(sites, "model.layers.0.*") == select_sites(sites, ["model.layers.0.*"])
    assert len(select_sites(sites, "model.layers.0.*")) == 7
    assert [s.path for s in select_sites(sites, "model.layers.0.mlp.up_proj")] == ["model.layers.0.mlp.up_proj"]
    assert len(select_sites(sites, "*", exclude="model.layers.0.*")) == 7 * LAYERS + 1 - 7
    assert len(select_sites(sites, {"*.q_proj", "*.k_proj"})) == len(select_sites(sites, (g for g in ["*_proj"]))) - (
        5 * LAYERS)
    for bad in (5, [5], None, {"a": 1}):
        with pytest.raises(ValueError, match="glob"):
            select_sites(sites, bad)


def test_block_sites_exclude_the_lm_head(llama_capture):
    _, gm = llama_capture
    sites = block_sites(gm)
    assert len(sites) == 7 * LAYERS
    assert all(s.path.startswith("model.layers.") for s in sites)


def test_plain_module_has_no_blocks():
    gm = qgraph.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    assert decoder_blocks(gm) == []
    assert block_sites(gm) == []


# --- decoder blocks -------------------------------------------------------------------------------------


def test_llama_decoder_blocks_structure(llama_capture):
    _, gm = llama_capture
    blocks = decoder_blocks(gm)
    assert len(blocks) == LAYERS
    assert [(b.index, b.path) for b in blocks] == [(i, f"model.layers.{i}") for i in range(LAYERS)]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    outs = [order[b.hidden_out] for b in blocks]
    assert outs == sorted(outs) and len(set(outs)) == LAYERS
    assert blocks[0].hidden_in.target == aten.embedding.default
    for prev, block in zip(blocks, blocks[1:]):
        assert block.hidden_in is prev.hidden_out  # the residual stream chains block to block
    for block in blocks:
        assert block.hidden_out in block.nodes and block.hidden_in not in block.nodes
        assert all(module_path(n).startswith(block.path) for n in block.nodes)
        shape = block.hidden_out.meta["val"].shape
        assert len(shape) == 3 and shape[2] == 64
        assert sum(1 for n in block.nodes if n.target == aten.linear.default) == 7


def test_llama_block_outputs_are_the_decoder_layer_outputs(llama_capture, make_ids):
    model, gm = llama_capture
    blocks = decoder_blocks(gm)
    eager = {}
    hooks = [layer.register_forward_hook(
        lambda mod, args, out, i=i: eager.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(model.model.layers)]
    ids = make_ids((2, 6), seed=4)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            values[node] = super().run_node(node)
            return values[node]

    with torch.no_grad():
        Recorder(gm).run(ids, torch.ones_like(ids), False)
    assert torch.equal(values[blocks[0].hidden_in], model.model.embed_tokens(ids).detach())
    for block in blocks:
        assert torch.equal(values[block.hidden_out], eager[block.index])


def test_gpt2_decoder_blocks(gpt2_capture):
    _, gm = gpt2_capture
    blocks = decoder_blocks(gm)
    assert [b.path for b in blocks] == [f"transformer.h.{i}" for i in range(LAYERS)]
    assert blocks[1].hidden_in is blocks[0].hidden_out
    assert sum(1 for n in blocks[0].nodes if n.target == aten.addmm.default) == 4


# --- networkx, DOT, op counts ----------------------------------------------------------------------------


def test_to_networkx_mirrors_the_graph(llama_capture):
    _, gm = llama_capture
    graph = to_networkx(gm)
    nodes = list(gm.graph.nodes)
    assert isinstance(graph, nx.DiGraph)
    assert graph.number_of_nodes() == len(nodes)
    assert graph.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in nodes)
    assert nx.is_directed_acyclic_graph(graph)
    site = linear_sites(gm)[0]
    attrs = graph.nodes[site.node.name]
    assert attrs == {"op": "call_function", "target": "aten.linear", "path": "model.layers.0.self_attn.q_proj"}
    assert graph.has_edge(site.input.name, site.node.name)


def _assert_valid_dot(dot: str) -> None:
    assert dot.startswith("digraph qgraph {\n") and dot.endswith("}\n")
    assert dot.count("{") == dot.count("}")
    body = dot.splitlines()[2:-1]
    assert body and all(re.fullmatch(r'  "[^"]+" (\[label=".*", fillcolor="#[0-9a-f]{6}"\]|-> "[^"]+");', line)
                        for line in body), [line for line in body if "->" not in line][:3]


def test_to_dot_before_and_after_nf4(llama_capture, llama_nf4):
    _, gm = llama_capture
    _, qm = llama_nf4
    before, after = to_dot(gm), to_dot(qm.graph_module)
    _assert_valid_dot(before)
    _assert_valid_dot(after)
    assert "qgraph.nf4_linear" not in before and QGRAPH_COLOR not in before
    assert LINEAR_COLOR in before
    assert "qgraph.nf4_linear" in after and QGRAPH_COLOR in after
    full = to_dot(qm.graph_module, depth=None)
    _assert_valid_dot(full)
    assert full.count("qgraph.nf4_linear") == 7 * LAYERS
    assert full.count("->") == to_networkx(qm.graph_module).number_of_edges()


def test_module_graph_groups_by_path(llama_capture):
    _, gm = llama_capture
    graph = module_graph(gm, depth=4)
    assert "model.layers.0.mlp" in graph and "model.layers.1.self_attn" in graph
    assert graph.nodes["model.layers.0.mlp"]["ops"]["aten.linear"] == 3
    # the MLP reads the post-attention norm and feeds the residual add of its layer
    assert list(graph.predecessors("model.layers.0.mlp")) == ["model.layers.0.post_attention_layernorm"]
    assert list(graph.successors("model.layers.0.mlp")) == ["model.layers.0"]
    assert nx.has_path(graph, "model.layers.0.mlp", "model.layers.1.self_attn")
    assert not nx.has_path(graph, "model.layers.1.mlp", "model.layers.0.mlp")


def test_count_ops(llama_capture, gpt2_capture, llama_nf4):
    _, gm = llama_capture
    counts = count_ops(gm)
    assert counts[aten.linear] == 7 * LAYERS + 1
    assert counts[aten.embedding] == 1
    assert counts[aten.scaled_dot_product_attention] == LAYERS
    assert torch.ops.qgraph.nf4_linear not in counts
    assert sum(counts.values()) == sum(1 for n in gm.graph.nodes if n.op == "call_function")
    gpt2_counts = count_ops(gpt2_capture[1])
    assert gpt2_counts[aten.addmm] == 4 * LAYERS and gpt2_counts[aten.linear] == 1
    nf4_counts = count_ops(llama_nf4[1].graph_module)
    assert nf4_counts[torch.ops.qgraph.nf4_linear] == 7 * LAYERS
    assert nf4_counts[aten.linear] == 1


@pytest.mark.parametrize("depth", [1, 2, 6])
def test_to_dot_depths_stay_valid(llama_capture, depth):
    _assert_valid_dot(to_dot(llama_capture[1], depth=depth))


@pytest.mark.parametrize("query", [linear_sites, decoder_blocks, to_networkx, to_dot, count_ops, block_sites])
def test_graph_queries_given_a_module_say_where_its_graph_is(llama_capture, llama_nf4, query):
    model, _ = llama_capture
    with pytest.raises(TypeError, match=r"got LlamaForCausalLM: pass qgraph.capture\(model\)"):
        query(model)
    with pytest.raises(TypeError, match=r"got HFQGraphModule: pass qm.graph_module"):
        query(llama_nf4[1])


@pytest.mark.parametrize("depth", [0, -1, 1.5, "2", True])
def test_to_dot_refuses_a_depth_it_cannot_cut_paths_to(llama_capture, depth):
    with pytest.raises(ValueError, match="depth is an int >= 1"):
        to_dot(llama_capture[1], depth=depth)
