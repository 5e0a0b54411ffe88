import io

import pytest
import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

import qgraph
from passes.attach_side_taps import downstream, find_head, tapped_blocks
from qgraph.errors import PassError, PlanError
from qgraph.graph import decoder_blocks
from qgraph.models import tiny_causal_lm, tiny_sequence_classifier
from qgraph.report import ADDED, REWRITTEN
from qgraph.side_network import SIDE_MODULE, SideNetwork
from qgraph.train import train_causal_lm
from tests.conftest import random_ids

aten = torch.ops.aten
LAYERS = 2
FAMILIES = ("llama", "gpt2", "qwen2", "mistral")


def side_nodes(qm):
    return [n for n in qm.graph_module.graph.nodes if n.op == "call_module" and n.target == SIDE_MODULE]


def logits(qm, ids, **kwargs):
    with torch.no_grad():
        return qm(input_ids=ids, **kwargs).logits


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request):
    """(family, nf4 module, qst-nf4 module) of one tiny model."""
    model = tiny_causal_lm(request.param, layers=LAYERS)
    return request.param, qgraph.transform(model, "nf4"), qgraph.transform(model, "qst-nf4")


@pytest.fixture(scope="module")
def llama_qst():
    return qgraph.transform(tiny_causal_lm("llama", layers=LAYERS), "qst-nf4", r=4)


# --- structure -----------------------------------------------------------------------------------------


def test_one_side_module_reads_embedding_and_every_layer(family_pair):
    _, _, qm = family_pair
    [side] = side_nodes(qm)
    head_input, mask, *taps = side.args
    assert len(taps) == LAYERS + 1
    assert mask.op == "placeholder" and mask.target == "attention_mask"
    assert all(t.op == "call_function" and t.target == aten.detach.default for t in (head_input, *taps))
    # the backbone's own graph: taps are the residual stream into block 0 and out of every block
    blocks = decoder_blocks(qm.graph_module)
    assert [t.args[0] for t in taps] == [blocks[0].hidden_in, *(b.hidden_out for b in blocks)]
    # the head reads the side network's output: a linear in the graph, or the graph's output where
    # a later pass (chunk_lm_loss) moved the LM head out of it
    [head] = [u for u in side.users]
    assert head.target == aten.linear.default or (head.op == "output" and qm.info.lm_head is not None)
    detach_count = sum(n.target == aten.detach.default for n in qm.graph_module.graph.nodes)
    assert detach_count == LAYERS + 2  # the taps and the head's input


def test_layer_stride_taps_every_kth_layer_counting_back_from_the_last():
    model = tiny_causal_lm("llama", layers=5)
    qm = qgraph.transform(model, "qst-nf4", layer_stride=2)
    [side] = side_nodes(qm)
    blocks = decoder_blocks(qm.graph_module)
    taps = [t.args[0] for t in side.args[2:]]
    assert taps == [blocks[0].hidden_in, blocks[0].hidden_out, blocks[2].hidden_out, blocks[4].hidden_out]
    assert qm.graph_module.get_submodule(SIDE_MODULE).config.blocks == 3
    assert [b.index for b in tapped_blocks(blocks, 1)] == [0, 1, 2, 3, 4]
    assert [b.index for b in tapped_blocks(blocks, 5)] == [4]


def test_report_has_one_record_per_tap_and_the_head(llama_qst):
    report = llama_qst.report["attach_side_taps"]
    assert report.matched == LAYERS + 1
    assert [r.path for r in report.with_action(ADDED)] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    [head] = report.with_action(REWRITTEN)
    assert head.path == "lm_head"
    side = llama_qst.graph_module.get_submodule(SIDE_MODULE)
    assert report.params == sum(p.numel() for p in side.parameters())
    assert llama_qst.report.trainable_params == report.params


def test_head_is_found_by_structure_for_a_classifier():
    gm = qgraph.capture(tiny_sequence_classifier("gpt2", layers=LAYERS))
    blocks = decoder_blocks(gm)
    head = find_head(gm, blocks)
    assert head.path == "score" and head.input in downstream(blocks[-1].hidden_out)


# --- numbers: step 0 is the backbone; gradients stay out of it ----------------------------------------------


def test_step0_logits_equal_the_nf4_plan_exactly(family_pair):
    family, nf4, qm = family_pair
    ids = random_ids((2, 12), seed=1)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    assert torch.equal(logits(qm, ids, attention_mask=mask), logits(nf4, ids, attention_mask=mask)), family


def test_only_the_side_network_trains_and_gets_gradients(family_pair):
    _, _, qm = family_pair
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    side_ids = {id(p) for p in side.parameters()}
    assert {id(p) for p in qm.trainable_parameters()} == side_ids
    ids = random_ids((2, 12), seed=2)
    qm.zero_grad(set_to_none=True)
    qm(input_ids=ids, labels=ids).loss.backward()
    grads = {id(p) for p in qm.parameters() if p.grad is not None}
    qm.zero_grad(set_to_none=True)
    assert grads  # a's gradient at least (the rest is scaled by 1 - a = 0 at step 0)
    assert grads <= side_ids
    assert side.mix.grad is None  # zero_grad above


class _OpOutputs(TorchDispatchMode):
    """Keeps every op's output (alive, so no storage is reused) with whether the side network had run."""

    def __init__(self):
        super().__init__()
        self.side_started = False
        self.before_side: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.side_started:
            self.before_side.extend(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _storage(t):
    return t.untyped_storage().data_ptr()


def saved_backbone_storages(qm, ids):
    """(storages of backbone activations saved for backward, storages of the taps and the head's input,
    storage of the head's input), over one training step of `qm` as a user runs it."""
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    recorder, side_inputs, saved = _OpOutputs(), [], []

    def enter_side(module, args):
        recorder.side_started = True
        side_inputs.extend(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())

    handle = side.register_forward_pre_hook(enter_side)
    try:
        with recorder, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = qm(input_ids=ids, labels=ids).loss
    finally:
        handle.remove()
    loss.backward()
    weights = {_storage(t) for t in (*qm.parameters(), *qm.buffers())}
    backbone = {_storage(t) for t in recorder.before_side} - weights
    allowed = {_storage(t) for t in side_inputs}
    assert saved and backbone and len(side_inputs) == LAYERS + 2  # the check saw something to check
    return {_storage(t) for t in saved} & backbone, allowed, _storage(side_inputs[0])


def test_nothing_inside_the_backbone_is_saved_for_backward(llama_qst):
    saved, allowed, _ = saved_backbone_storages(llama_qst, random_ids((2, 16), seed=3))
    # the adapters' first linears keep their input (a tap) for their weight gradient; nothing else
    assert saved and saved <= allowed


def test_with_pooling_only_the_heads_input_is_saved_for_as_gradient():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=LAYERS), "qst-nf4", r=4, downsample="avgpool")
    saved, _, head_input = saved_backbone_storages(qm, random_ids((2, 16), seed=3))
    assert saved == {head_input}  # dL/da = sum(dL/dh * (h_head - side)) needs h_head


def test_loss_falls_over_a_few_steps():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=LAYERS), "qst-nf4", r=4)
    optimizer = torch.optim.AdamW(qm.trainable_parameters(), lr=1e-2)
    ids = random_ids((4, 32), seed=4)
    losses = train_causal_lm(qm, [ids] * 8, optimizer, steps=8, console=Console(file=io.StringIO()))
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    assert side.mix.item() < 1  # a moved, so the side network now contributes
    # a leaves 1 by about lr per step, so the side network's share (1 - a) grows slowly: the loss falls
    # at every step, by a little at first
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.005, losses


def test_right_padding_leaves_unpadded_rows_alone(llama_qst):
    with torch.no_grad():
        llama_qst.graph_module.get_submodule(SIDE_MODULE).mix.fill_(0.25)  # make the side network count
    try:
        ids = random_ids((2, 16), seed=5)
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        ids[1, 10:] = 0
        batched = logits(llama_qst, ids, attention_mask=mask)
        alone_full = logits(llama_qst, ids[:1])
        alone_short = logits(llama_qst, ids[1:, :10])
    finally:
        with torch.no_grad():
            llama_qst.graph_module.get_submodule(SIDE_MODULE).mix.fill_(1.0)
    torch.testing.assert_close(batched[:1], alone_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1:, :10], alone_short, rtol=1e-5, atol=1e-5)


# --- sequence classification -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequence_classifier_mixes_into_the_score_head(family):
    model = tiny_sequence_classifier(family, layers=LAYERS)
    qm = qgraph.transform(model, "qst-nf4", r=4)
    nf4 = qgraph.transform(model, "nf4")
    ids = random_ids((4, 12), seed=6)
    assert torch.equal(logits(qm, ids), logits(nf4, ids))
    [side] = side_nodes(qm)
    assert [u.target for u in side.users] == [aten.linear.default]
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW(qm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = qm(input_ids=ids, labels=labels).loss
        loss.backward()
        assert all(p.grad is None for p in qm.parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# --- bad options: clear errors, nothing changed -------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"downsample": "conv"}, "downsample must be one of adapter, lora, linear, maxpool, avgpool, got 'conv'"),
    ({"r": 0}, "r must be a positive integer"),
    ({"adapter_rank": 2.5}, "adapter_rank must be a positive integer"),
    ({"layer_stride": True}, "layer_stride must be a positive integer"),
])
def test_bad_option_values_fail_before_capture(tiny_llama, snapshot, options, message):
    before = snapshot(tiny_llama)
    with pytest.raises(PlanError, match=message):
        qgraph.transform(tiny_llama, "qst-nf4", **options)
    before.assert_unchanged(tiny_llama)


@pytest.mark.parametrize(("options", "message"), [
    ({"r": 7}, r"r=7 does not divide the hidden size 64; nothing was changed. Fix: pick r among \[2, 4, 8, 16, 32\]"),
    ({"r": 64}, r"side width d/r = 64/64 = 1 does not split .* Fix: pick r so that d/r is even"),
    ({"r": 4, "heads": 3}, r"does not split into 3 attention heads of even size"),
    ({"layer_stride": 3}, r"layer_stride=3 exceeds the 2 decoder layers; nothing was changed. Fix: use a "
                          r"layer_stride from 1 to 2"),
])
def test_options_that_do_not_fit_the_model_name_the_fix(tiny_llama, snapshot, options, message):
    before = snapshot(tiny_llama)
    with pytest.raises(PassError, match=message):
        qgraph.transform(tiny_llama, "qst-nf4", **options)
    before.assert_unchanged(tiny_llama)


def test_side_network_is_an_ordinary_submodule(llama_qst):
    side = llama_qst.graph_module.get_submodule(SIDE_MODULE)
    assert isinstance(side, SideNetwork)
    assert all(k.startswith(f"graph_module.{SIDE_MODULE}.") for k, p in llama_qst.named_parameters() if p.requires_grad)
    llama_qst.train()
    assert side.training and all(m.training for m in side.modules())
    llama_qst.eval()
    assert not side.training
