import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qgraph
from passes.insert_checkpoints import (
    REGION_PREFIX,
    CheckpointedForward,
    CheckpointOptions,
    inline_checkpoints,
    insert_checkpoints,
)
from qgraph.graph import CHECKPOINT, checkpointed_module, count_ops, flat_graph
from qgraph.memory import FrozenAwareMemTracker, peak_breakdown
from qgraph.models import tiny_causal_lm
from qgraph.pipeline import PassContext
from qgraph.report import ADDED, SKIPPED

LRQAT = torch.ops.qgraph.lrqat_linear
NF4 = torch.ops.qgraph.nf4_linear


def tokens(shape=(2, 12), seed=0):
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


def regions(qm):
    gm = qm.graph_module
    return [n for n in gm.graph.nodes if checkpointed_module(gm, n) is not None]


def loss_and_grads(qm, ids):
    loss = qm(input_ids=ids, labels=ids).loss
    named = [(n, p) for n, p in qm.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss, {n: g for (n, _), g in zip(named, grads, strict=True)}


# --- numerics -------------------------------------------------------------------------------------------


SELECTIVE = {"save": ("attention", "residual_linears")}


@pytest.mark.parametrize(("family", "checkpoint"), [("llama", "blocks"), ("llama", {"every": 2}), ("gpt2", "blocks"),
                                                    ("llama", SELECTIVE), ("gpt2", SELECTIVE)])
def test_checkpointed_and_plain_give_equal_losses_and_gradients(family, checkpoint):
    model = tiny_causal_lm(family, layers=3)
    plain = qgraph.transform(model, "lrqat-w4", rank=4, checkpoint="none")
    checkpointed = qgraph.transform(model, "lrqat-w4", rank=4, checkpoint=checkpoint)
    checkpointed.load_state_dict(plain.state_dict())
    with torch.no_grad():  # move A off zero, so that the gradients of B are not zero as well
        for (_, a), (_, b) in zip(*(sorted((n, p) for n, p in qm.named_parameters() if n.endswith("lrqat_a"))
                                    for qm in (plain, checkpointed)), strict=True):
            a.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
            b.copy_(a)
    ids = tokens((3, 10))
    expected_loss, expected = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(checkpointed, ids)
    assert len(regions(checkpointed)) == (2 if checkpoint == {"every": 2} else 3) and not regions(plain)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected.keys() and len(grads) == 3 * 3 * (4 if family == "gpt2" else 7)
    for name, grad in grads.items():
        assert torch.equal(grad, expected[name]), name
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lrqat_b"))


def test_nf4_backbone_with_checkpoints_gives_the_same_input_gradient():
    # nf4_linear inside a region: the backward recomputes it and returns the same dL/dx
    model = tiny_causal_lm("llama", layers=2)
    plain, checkpointed = (qgraph.transform(model, "nf4", checkpoint=c) for c in ("none", "blocks"))
    assert count_ops(checkpointed.graph_module)[NF4] == 14 and len(regions(checkpointed)) == 2
    for qm in (plain, checkpointed):  # a trainable norm downstream of every region, so gradients flow through them
        qm.graph_module.model.norm.weight.requires_grad_(True)
    ids = tokens()
    (want,), (got,) = (torch.autograd.grad(qm(input_ids=ids, labels=ids).loss, [qm.graph_module.model.norm.weight])
                       for qm in (plain, checkpointed))
    assert torch.equal(got, want)


def test_activation_memory_drops():
    model = tiny_causal_lm("llama", layers=4, hidden=128)

    def peak_activations(checkpoint):
        qm = qgraph.transform(model, "lrqat-w4", rank=4, checkpoint=checkpoint)
        tracker = FrozenAwareMemTracker()
        tracker.track_external(qm)
        ids = tokens((4, 128))
        with tracker:
            qm(input_ids=ids, labels=ids).loss.backward()
        return peak_breakdown(tracker)["Activation"]

    plain, checkpointed = peak_activations("none"), peak_activations("blocks")
    assert checkpointed < plain / 2, (plain, checkpointed)


@pytest.mark.parametrize(("family", "kept"), [("llama", (3, 6)), ("gpt2", (1, 3))])
def test_selective_regions_keep_attention_and_the_residual_linears(family, kept, monkeypatch):
    # llama: o_proj and down_proj are linears 3 and 6 of q, k, v, o, gate, up, down; gpt2: c_proj twice
    # of c_attn, c_proj, c_fc, c_proj
    import qgraph.ops.lrqat as lrqat_ops

    model = tiny_causal_lm(family, layers=2)
    qm = qgraph.transform(model, "lrqat-w4", rank=4, checkpoint=SELECTIVE)
    calls = regions(qm)
    assert [n.kwargs for n in calls] == [{"use_reentrant": False, "save_attention": True, "save_linears": kept}] * 2
    assert all("attention, 2 linear output(s)" in r.detail for r in qm.report["insert_checkpoints"].records)
    runs = []
    forward = lrqat_ops.lrqat_linear_forward
    monkeypatch.setattr(lrqat_ops, "lrqat_linear_forward", lambda *args: runs.append(1) or forward(*args))
    ids = tokens()
    qm.train()(input_ids=ids, labels=ids).loss.backward()
    per_block = 4 if family == "gpt2" else 7
    # every linear runs in the forward; the recompute skips the two whose outputs the region kept
    assert len(runs) == 2 * (per_block + per_block - 2)


# --- structure and report -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_w4():
    return qgraph.transform(tiny_causal_lm("llama", layers=4), "lrqat-w4", rank=4)


def test_each_block_is_a_non_reentrant_region(llama_w4):
    gm = llama_w4.graph_module
    calls = regions(llama_w4)
    assert [n.args[0].target for n in calls] == [f"{REGION_PREFIX}{i}" for i in range(4)]
    # the lrqat plans keep attention and the residual linears (o_proj, down_proj: linears 3 and 6)
    kept = {"use_reentrant": False, "save_attention": True, "save_linears": (3, 6)}
    assert all(n.target is CHECKPOINT and n.kwargs == kept for n in calls)
    assert gm.code.count("qgraph_recompute_checkpoint(") == 4
    # the ops moved into the regions, none lost or duplicated
    assert count_ops(gm)[LRQAT] == 28
    assert LRQAT not in {n.target.overloadpacket for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    assert sum(n.target == LRQAT.default for n in getattr(gm, f"{REGION_PREFIX}0").graph.nodes) == 7


def test_parameters_are_shared_not_copied(llama_w4):
    gm = llama_w4.graph_module
    for i in range(4):
        region = getattr(gm, f"{REGION_PREFIX}{i}")
        assert not list(region.parameters()) and not list(region.buffers())
    assert not any(REGION_PREFIX in key for key in llama_w4.state_dict())
    plain = qgraph.transform(tiny_causal_lm("llama", layers=4), "lrqat-w4", rank=4, checkpoint="none")
    assert llama_w4.state_dict().keys() == plain.state_dict().keys()
    # each trainable parameter the optimizer sees is the one the regions are called with
    a = gm.get_submodule("model.layers.2.mlp.up_proj").lrqat_a
    group = next(g for g in qgraph.param_groups(llama_w4) if g["name"] == "lrqat_ab")
    assert any(p is a for p in group["params"]) and len(group["params"]) == 2 * 28


def test_report_lists_each_region(llama_w4):
    report = llama_w4.report["insert_checkpoints"]
    assert report.matched == 4
    assert [(r.path, r.action) for r in report.records] == [(f"model.layers.{i}", ADDED) for i in range(4)]
    detail = report.records[0].detail
    assert detail.startswith("1 block, ") and f"-> {REGION_PREFIX}0" in detail and "recomputes the rest" in detail
    # A, B, s of 7 linears and two norms: the region's parameters, trainable or not
    layer = llama_w4.graph_module.get_submodule("model.layers.0")
    assert report.records[0].params == sum(p.numel() for p in layer.parameters())
    text = str(llama_w4.report)
    rows = text.split("insert_checkpoints: per layer")[1].splitlines()
    assert [row.split()[1] for row in rows if "added" in row] == [f"model.layers.{i}" for i in range(4)]


def test_every_and_globs_pick_the_regions():
    model = tiny_causal_lm("llama", layers=5)
    qm = qgraph.transform(model, "nf4", checkpoint={"every": 2, "exclude": ["model.layers.2"]})
    report = qm.report["insert_checkpoints"]
    # a region never spans the excluded block: 0-1, then 3-4
    assert [r.path for r in report.records] == ["model.layers.0..1", "model.layers.3..4"]
    assert [r.detail.split(",")[0] for r in report.records] == ["2 blocks", "2 blocks"]
    qm = qgraph.transform(model, "nf4", checkpoint={"include": "model.layers.[13]"})
    assert [r.path for r in qm.report["insert_checkpoints"].records] == ["model.layers.1", "model.layers.3"]


def test_a_second_run_skips_what_is_already_checkpointed():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4", rank=4)
    gm = qm.graph_module
    result = insert_checkpoints(gm, PassContext(qm.info.example_inputs), CheckpointOptions())
    assert not result.modified
    assert [r.action for r in result.report.records] == [SKIPPED, SKIPPED]
    assert "already checkpointed" in result.report.records[0].reason
    assert len(regions(qm)) == 2


def test_finalize_and_inline_remove_the_regions():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4", rank=4)
    ids = tokens()
    deployed = qgraph.finalize(qm)
    assert not regions(deployed) and not any(n.startswith(REGION_PREFIX) for n, _ in deployed.graph_module.named_children())
    with torch.no_grad():
        expected = qm(input_ids=ids).logits
        assert torch.equal(deployed(input_ids=ids).logits, expected)
    assert inline_checkpoints(qm.graph_module) == 2
    assert not regions(qm) and count_ops(qm.graph_module)[LRQAT] == 14
    with torch.no_grad():
        assert torch.equal(qm(input_ids=ids).logits, expected)


def test_flat_graph_matches_the_graph_before_checkpointing():
    model = tiny_causal_lm("llama", layers=2)
    plain = qgraph.transform(model, "nf4", checkpoint="none").graph_module
    checkpointed = qgraph.transform(model, "nf4", checkpoint="blocks").graph_module

    def signature(graph):
        return [(n.op, str(n.target)) for n in graph.nodes if n.op != "get_attr"]

    assert signature(flat_graph(checkpointed)) == signature(plain.graph)


# --- whole modules (the hook QST's side blocks use) ------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + F.silu(self.fc(x))


class Side(nn.Module):
    """Loops over its blocks inside its own forward, as SideNetwork does: the graph sees one call_module."""

    def __init__(self, width=16, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.side = Side()

    def forward(self, x):
        return self.side(self.inp(x)).square().mean()


class SideLeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return qualname == "side" or super().is_leaf_module(m, qualname)


def traced_net():
    torch.manual_seed(0)
    net = Net()
    return net, fx.GraphModule(net, SideLeafTracer().trace(net))


def test_modules_inside_a_call_module_are_recomputed_in_backward():
    net, gm = traced_net()
    x = torch.randn(4, 16)
    expected = torch.autograd.grad(net(x), list(net.side.parameters()))
    options = CheckpointOptions(target="modules", include=("side.blocks.*",))
    result = insert_checkpoints(gm, PassContext({}), options)
    assert [(r.path, r.action) for r in result.report.records] == [(f"side.blocks.{i}", ADDED) for i in range(3)]
    assert all(isinstance(vars(b)["forward"], CheckpointedForward) for b in gm.side.blocks)
    assert gm.state_dict().keys() == net.state_dict().keys()
    before = [b.calls for b in gm.side.blocks]
    grads = torch.autograd.grad(gm(x), list(gm.side.parameters()))
    # one call in forward, one more when the backward recomputes the block
    assert [b.calls - n for b, n in zip(gm.side.blocks, before, strict=True)] == [2, 2, 2]
    for got, want in zip(grads, expected, strict=True):
        assert torch.equal(got, want)
    assert inline_checkpoints(gm) == 3 and not any("forward" in vars(b) for b in gm.side.blocks)


def test_call_module_nodes_become_checkpoint_calls():
    net, gm = traced_net()
    x = torch.randn(4, 16)
    expected = net(x)
    result = insert_checkpoints(gm, PassContext({}), CheckpointOptions(target="modules", include="side"))
    assert [r.path for r in result.report.with_action(ADDED)] == ["side"]
    assert not gm.graph.find_nodes(op="call_module", target="side") and len(
        [n for n in gm.graph.nodes if checkpointed_module(gm, n) is gm.side]) == 1
    gm.recompile()
    assert torch.equal(gm(x), expected)
    assert [n.op for n in flat_graph(gm).nodes].count("call_module") == 2  # inp and side, as traced


# --- options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": 0}, "every must be a positive integer (blocks per checkpoint region), got 0"),
    ({"every": True}, "every must be a positive integer"),
    ({"target": "layers"}, "target must be one of blocks, modules, got 'layers'"),
    ({"target": "modules"}, "target='modules' needs include globs naming the modules to checkpoint"),
    ({"target": "modules", "include": "x.*", "every": 2}, "with target='modules' each module is its own region"),
    ({"save": "mlp"}, "'mlp' is not something a region can keep; choose from attention, residual_linears"),
    ({"target": "modules", "include": "x.*", "save": "attention"}, "applies to decoder-block regions"),
])
def test_bad_options_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError) as err:
        CheckpointOptions(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(("plan", "checkpoint", "message"), [
    ("nf4", {"include": "model.blocks.*"}, "include/exclude matched none.*e.g. model.layers.0"),
    ("lrqat-w4", {"exclude": "model.layers.*"}, "include/exclude matched none"),
    ("qst-nf4", {"target": "modules", "include": "side.*"}, r"no module matches include=\['side.\*'\].*e.g. model"),
])
def test_globs_that_choose_no_region_are_an_error_naming_the_paths(plan, checkpoint, message):
    with pytest.raises(qgraph.PlanError, match=message):
        qgraph.transform(tiny_causal_lm("llama", layers=1), plan, checkpoint=checkpoint)


def test_a_plan_wide_include_selects_linears_and_leaves_the_blocks_checkpointed():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4", include=["*.mlp.*"])
    assert len(qm.report["lrqat"].rewritten) == 3 * 2
    assert [r.path for r in qm.report["insert_checkpoints"].with_action(ADDED)] == ["model.layers.0", "model.layers.1"]
    only_first = qgraph.transform(tiny_causal_lm("llama", layers=2), "lrqat-w4",
                                  **{"insert_checkpoints.include": ["model.layers.0"]})
    assert [r.path for r in only_first.report["insert_checkpoints"].with_action(ADDED)] == ["model.layers.0"]


def test_a_model_without_decoder_blocks_gets_a_note_not_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    report = qgraph.transform(model, "lrqat-w4", example_inputs=(torch.randn(2, 8),)).report["insert_checkpoints"]
    assert not report.records and "none found" in report.notes[0]


def test_qst_side_blocks_are_what_checkpoint_blocks_means_in_qst():
    model = tiny_causal_lm("llama", layers=2)
    plain = qgraph.transform(model, "qst-nf4")
    checkpointed = qgraph.transform(model, "qst-nf4", checkpoint="blocks")  # the side blocks: only they train
    checkpointed.load_state_dict(plain.state_dict())
    assert [r.path for r in checkpointed.report["insert_checkpoints"].with_action(ADDED)] == [
        "qst_side.blocks.0", "qst_side.blocks.1"]
    ids = tokens()
    (want_loss, want), (loss, got) = (loss_and_grads(qm.train(), ids) for qm in (plain, checkpointed))
    assert torch.equal(loss, want_loss)
    for name, grad in got.items():
        assert torch.equal(grad, want[name]), name


def test_only_linear_ops_count_towards_the_saved_linear_ordinals():
    # an activation fake quant (lrqat-w4a8) or a scale rounding sits beside a linear: counted, it would shift
    # which linear save_linears keeps
    from qgraph.recompute import is_linear_op

    q, aten = torch.ops.qgraph, torch.ops.aten
    linears = (q.nf4_linear.default, q.lrqat_linear.default, q.int4_linear.default, aten.mm.default,
               aten.addmm.default)
    beside = (q.fake_quant_act_int8_per_token.default, q.round_scale.default, aten.add.Tensor)
    assert all(is_linear_op(op) for op in linears)
    assert not any(is_linear_op(op) for op in beside)
