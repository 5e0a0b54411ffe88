import io

import pytest
import torch
from rich.console import Console
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qgraph
from passes.attach_side_taps import DEFAULT_HEAD_RANK, HEAD_DELTA_MODULE, downstream, find_head, tapped_blocks
from qgraph.errors import PassError, PlanError
from qgraph.graph import decoder_blocks
from qgraph.models import tiny_causal_lm, tiny_sequence_classifier
from qgraph.report import ADDED, REWRITTEN
from qgraph.side_network import SIDE_MODULE, SideNetwork
from qgraph.train import train_causal_lm
from tests.conftest import random_ids, train_steps

aten = torch.ops.aten
LAYERS = 2
FAMILIES = ("llama", "gpt2", "qwen2", "mistral")


def side_nodes(qm):
    return [n for n in qm.graph_module.graph.nodes if n.op == "call_module" and n.target == SIDE_MODULE]


def logits(qm, ids, **kwargs):
    with torch.no_grad():
        return qm(input_ids=ids, **kwargs).logits


def added_parameter_ids(qm) -> set[int]:
    """The parameters attach_side_taps adds, all that may train: the side network's and the head delta's (on by
    default for a language model's head)."""
    added = [qm.graph_module.get_submodule(SIDE_MODULE)]
    if hasattr(qm.graph_module, HEAD_DELTA_MODULE):
        added.append(qm.graph_module.get_submodule(HEAD_DELTA_MODULE))
    return {id(p) for module in added for p in module.parameters()}


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
    assert [r.path for r in report.with_action(ADDED)] == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                                           f"lm_head ({HEAD_DELTA_MODULE})"]
    [head] = report.with_action(REWRITTEN)
    assert head.path == "lm_head"
    added = [p for p in llama_qst.parameters() if id(p) in added_parameter_ids(llama_qst)]
    assert report.params == sum(p.numel() for p in added)
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
    added_ids = added_parameter_ids(qm)
    assert {id(p) for p in qm.trainable_parameters()} == added_ids
    ids = random_ids((2, 12), seed=2)
    qm.zero_grad(set_to_none=True)
    qm(input_ids=ids, labels=ids).loss.backward()
    grads = {id(p) for p in qm.parameters() if p.grad is not None}
    qm.zero_grad(set_to_none=True)
    assert grads  # a's gradient at least (the rest is scaled by 1 - a = 0 at step 0)
    assert grads <= added_ids
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


def head_tensors(qm):
    return {name: p for name, p in qm.graph_module.named_parameters() if name.startswith("score.")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_head_trains_a_copy_of_the_score_head_beside_the_side_network(family, snapshot):
    model = tiny_sequence_classifier(family, layers=LAYERS)
    before = snapshot(model)
    qm = qgraph.transform(model, "qst-nf4", r=4, train_head=True)
    ids, labels = random_ids((4, 12), seed=6), torch.tensor([0, 1, 1, 0])
    assert torch.equal(logits(qm, ids), logits(qgraph.transform(model, "nf4"), ids))  # step 0: the nf4 model
    head = head_tensors(qm)
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    assert head and all(p.dtype == torch.float32 for p in head.values())
    assert {id(p) for p in qm.trainable_parameters()} == {id(p) for p in [*side.parameters(), *head.values()]}
    assert all(p.data_ptr() != model.score.weight.data_ptr() for p in head.values())  # its own copy
    optimizer = torch.optim.AdamW(qm.trainable_parameters(), lr=1e-2)
    start = {name: p.detach().clone() for name, p in head.items()}
    losses = []
    for _ in range(6):
        loss = qm(input_ids=ids, labels=labels).loss
        loss.backward()
        assert all(p.grad is None for p in qm.parameters() if not p.requires_grad)  # none enters the backbone
        assert all(p.grad is not None for p in head.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not any(torch.equal(start[name], p) for name, p in head.items())
    before.assert_unchanged(model)  # the user's score head did not move


def test_train_head_is_in_the_report_and_the_saved_state(tmp_path):
    model = tiny_sequence_classifier("llama", layers=LAYERS)
    qm = qgraph.transform(model, "qst-nf4", r=4, train_head=True)
    [record] = [r for r in qm.report["attach_side_taps"].records if r.path == "score"]
    assert "the head's own 128 parameters train too" in record.detail
    with torch.no_grad():
        next(iter(head_tensors(qm).values())).add_(0.5)  # as training would move it
    loaded = qgraph.from_pretrained(tiny_sequence_classifier("llama", layers=LAYERS), qm.save_pretrained(tmp_path))
    ids = random_ids((2, 9), seed=3)
    assert torch.equal(logits(loaded, ids), logits(qm, ids))


def test_train_head_refuses_a_head_tied_to_the_embedding(tiny_gpt2, snapshot):
    before = snapshot(tiny_gpt2)
    with pytest.raises(PassError, match=r"train_head=True, but the head lm_head's weight is also read by "
                                        r".*wte \(tied to the embedding\).*Fix: leave train_head False"):
        qgraph.transform(tiny_gpt2, "qst-nf4", r=4, train_head=True)
    before.assert_unchanged(tiny_gpt2)


def test_train_head_trains_an_untied_lm_head(tiny_llama):
    qm = qgraph.transform(tiny_llama, "qst-nf4", r=4, train_head=True)
    assert "lm_head.weight" in {name for name, p in qm.graph_module.named_parameters() if p.requires_grad}
    ids = random_ids((2, 12), seed=2)
    qm(input_ids=ids, labels=ids).loss.backward()
    head = qm.graph_module.get_parameter("lm_head.weight")
    assert head.grad is not None
    with torch.no_grad():
        head.add_(torch.randn_like(head))  # as training moves it: the KV-cached decode graph reads the same copy
    prompt = random_ids((1, 5), seed=4)
    assert torch.equal(qm.generate(prompt, max_new_tokens=6), qm.generate(prompt, max_new_tokens=6, use_cache=False))


def test_train_head_refuses_a_bf16_head():
    model = tiny_sequence_classifier("llama", layers=LAYERS)
    with pytest.raises(PassError, match=r"computes in torch.bfloat16.*Fix: transform the float32 model"):
        qgraph.transform(model, "qst-nf4", r=4, train_head=True, dtype=torch.bfloat16)


# --- bad options: clear errors, nothing changed -------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"downsample": "conv"}, "downsample must be one of adapter, lora, linear, maxpool, avgpool, got 'conv'"),
    ({"gate_init": float("nan")}, "gate_init must be a finite number"),
    ({"gate_init": "2"}, "gate_init must be a finite number"),
    ({"mix": "sum"}, "mix must be one of gate, channel, residual, modulate, got 'sum'"),
    ({"r": 0}, "r must be a positive integer"),
    ({"adapter_rank": 2.5}, "adapter_rank must be a positive integer"),
    ({"layer_stride": True}, "layer_stride must be a positive integer"),
    ({"train_head": "yes"}, "train_head must be True or False, got 'yes'"),
    ({"head_rank": -1}, r"head_rank must be None \(the default: 16 for a language model's head\), 0 \(no head delta\) "
                        r"or a positive rank, got -1"),
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
    assert all(k.startswith((f"graph_module.{SIDE_MODULE}.", f"graph_module.{HEAD_DELTA_MODULE}."))
               for k, p in llama_qst.named_parameters() if p.requires_grad)
    llama_qst.train()
    assert side.training and all(m.training for m in side.modules())
    llama_qst.eval()
    assert not side.training


# --- init="pruned": side blocks from the backbone's dequantized weights ------------------------------------

PRUNABLE = ("llama", "qwen2", "mistral")  # gated MLPs; GPT-2's is not (an error, below)


@pytest.fixture(scope="module", params=PRUNABLE)
def pruned_triple(request):
    """(model, nf4 module, qst-nf4 module with init="pruned", r=4) of one tiny model."""
    model = with_random_norms(tiny_causal_lm(request.param, layers=LAYERS))
    return model, qgraph.transform(model, "nf4"), qgraph.transform(model, "qst-nf4", r=4, init="pruned")


def with_random_norms(model):
    """Norm weights drawn in [0.5, 1.5) (a fresh model's are all ones), so copying the wrong channels shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=g))
    return model


def test_pruned_init_keeps_the_random_inits_shapes(pruned_triple):
    model, _, qm = pruned_triple
    random = qgraph.transform(model, "qst-nf4", r=4).graph_module.get_submodule(SIDE_MODULE)
    pruned = qm.graph_module.get_submodule(SIDE_MODULE)
    assert pruned.config == random.config
    shapes = {name: tensor.shape for name, tensor in pruned.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in random.state_dict().items()}
    # the blocks and the side norm differ from the random draw; the downsamples, gates and upsample do not
    for name, tensor in random.state_dict().items():
        copied = name.startswith("blocks.") or name == "norm.weight"
        assert torch.equal(pruned.state_dict()[name], tensor) != copied, name


def test_pruned_init_step0_logits_equal_the_nf4_plan_exactly(pruned_triple):
    _, nf4, qm = pruned_triple
    ids = random_ids((2, 12), seed=1)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    assert torch.equal(logits(qm, ids, attention_mask=mask), logits(nf4, ids, attention_mask=mask))


def test_pruned_init_trains_the_side_network_only(pruned_triple):
    _, _, qm = pruned_triple
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    added_ids = added_parameter_ids(qm)
    assert {id(p) for p in qm.trainable_parameters()} == added_ids
    with torch.no_grad():
        side.mix.fill_(0.5)  # every side parameter gets a gradient once a < 1
    try:
        ids = random_ids((2, 12), seed=2)
        qm(input_ids=ids, labels=ids).loss.backward()
        with_grad = {id(p) for p in qm.parameters() if p.grad is not None}
        assert with_grad == added_ids
        assert all(p.grad.abs().sum() > 0 for p in side.blocks.parameters())
    finally:
        qm.zero_grad(set_to_none=True)
        with torch.no_grad():
            side.mix.fill_(1.0)


def _nf4_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """What the nf4 plan computes with: the fp32 weight quantized, then decoded in plain PyTorch."""
    from qgraph.ops.nf4 import decode_nf4, quantize_nf4

    w = quantize_nf4(linear.weight.detach())
    return decode_nf4(w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset, *w.shape,
                      w.blocksize, w.nested_blocksize)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def reference_pruned_blocks(model, tapped: list[int], width: int, side_heads: int, side_ffn: int):
    """The documented rule, written out in plain loops, for the tapped layers:
    (hidden channels, [expected SideBlock state per tapped layer])."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    side_hd = width // side_heads
    layers = []
    for layer in (model.model.layers[i] for i in tapped):
        a, m = layer.self_attn, layer.mlp
        w = {name: _nf4_weight(lin) for name, lin in [("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj),
                                                      ("o", a.o_proj), ("gate", m.gate_proj), ("up", m.up_proj),
                                                      ("down", m.down_proj)]}
        layers.append((w, layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()))
    score = torch.zeros(config.hidden_size)
    for w, g1, g2 in layers:
        for name in ("q", "k", "v"):
            score += (w[name] * g1).pow(2).sum(0)
        for name in ("gate", "up"):
            score += (w[name] * g2).pow(2).sum(0)
        score += w["o"].pow(2).sum(1) + w["down"].pow(2).sum(1)
    hidden = _top(score, width)
    states = []
    for w, g1, g2 in layers:
        head_score = torch.tensor([w["q"][h * hd:(h + 1) * hd].pow(2).sum()
                                   + w["o"][:, h * hd:(h + 1) * hd].pow(2).sum() for h in range(heads)])
        q_rows, k_rows, v_rows, o_cols = [], [], [], []
        for h in _top(head_score, side_heads):
            kv = h // (heads // kv_heads)
            q, k = w["q"][h * hd:(h + 1) * hd], w["k"][kv * hd:(kv + 1) * hd]
            pair = [q[j].pow(2).sum() + q[j + hd // 2].pow(2).sum() + k[j].pow(2).sum() + k[j + hd // 2].pow(2).sum()
                    for j in range(hd // 2)]
            kept = _top(torch.tensor(pair), side_hd // 2)
            dims = kept + [j + hd // 2 for j in kept]
            q_rows += [h * hd + j for j in dims]
            k_rows += [kv * hd + j for j in dims]
            v_score = [w["v"][kv * hd + j].pow(2).sum() + w["o"][:, h * hd + j].pow(2).sum() for j in range(hd)]
            v_dims = _top(torch.tensor(v_score), side_hd)
            v_rows += [kv * hd + j for j in v_dims]
            o_cols += [h * hd + j for j in v_dims]
        ffn = _top(w["gate"].pow(2).sum(1) + w["up"].pow(2).sum(1) + w["down"].pow(2).sum(0), side_ffn)
        states.append({
            "attn_norm.weight": g1[hidden],
            "attn.qkv.weight": torch.cat([w["q"][q_rows], w["k"][k_rows], w["v"][v_rows]])[:, hidden],
            "attn.out.weight": w["o"][hidden][:, o_cols],
            "mlp_norm.weight": g2[hidden],
            "mlp.gate_up.weight": torch.cat([w["gate"][ffn], w["up"][ffn]])[:, hidden],
            "mlp.down.weight": w["down"][hidden][:, ffn],
        })
    return hidden, states


def test_pruned_side_blocks_are_the_chosen_slices_of_the_dequantized_backbone(pruned_triple):
    model, _, qm = pruned_triple
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    config = side.config
    hidden, states = reference_pruned_blocks(model, list(range(LAYERS)), config.width, config.heads, config.ffn_width)
    assert_side_blocks_equal(side, states)
    torch.testing.assert_close(side.norm.weight.detach(), model.model.norm.weight.detach()[hidden], rtol=0, atol=0)


def assert_side_blocks_equal(side, states):
    assert len(states) == len(side.blocks)
    for i, (block, expected) in enumerate(zip(side.blocks, states)):
        got = block.state_dict()
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=f"block {i} {name}")


def test_pruned_init_with_a_layer_stride_copies_the_tapped_layers():
    model = with_random_norms(tiny_causal_lm("llama", layers=3))
    qm = qgraph.transform(model, "qst-nf4", r=4, init="pruned", layer_stride=2)  # taps layers 0 and 2
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    config = side.config
    _, states = reference_pruned_blocks(model, [0, 2], config.width, config.heads, config.ffn_width)
    assert_side_blocks_equal(side, states)


def test_report_says_which_init_ran(pruned_triple, llama_qst):
    _, _, qm = pruned_triple
    assert qm.report["attach_side_taps"].options["init"] == "pruned"
    assert any(note.startswith("init='pruned'") for note in qm.report["attach_side_taps"].notes)
    assert any(note.startswith("init='random'") for note in llama_qst.report["attach_side_taps"].notes)


def test_unknown_init_names_the_choices(tiny_llama, snapshot):
    before = snapshot(tiny_llama)
    with pytest.raises(PlanError, match="init must be one of random, pruned, got 'magnitude'"):
        qgraph.transform(tiny_llama, "qst-nf4", init="magnitude")
    before.assert_unchanged(tiny_llama)


@pytest.mark.parametrize(("family", "options", "message"), [
    ("gpt2", {}, r"init='pruned' copies a gated MLP .* Fix: use init='random'"),
    ("llama", {"heads": 8}, r"8 heads but the backbone layer has 4; set heads to at most 4"),
])
def test_pruned_init_that_cannot_fit_names_the_fix(family, options, message):
    model = tiny_causal_lm(family, layers=LAYERS)
    with pytest.raises(PassError, match=message):
        qgraph.transform(model, "qst-nf4", r=4, init="pruned", **options)


def test_pruned_init_starts_a_linear_downsample_as_the_kept_channels():
    model = with_random_norms(tiny_causal_lm("llama", layers=LAYERS))
    qm = qgraph.transform(model, "qst-nf4", r=4, init="pruned", downsample="linear")
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    config = side.config
    hidden, _ = reference_pruned_blocks(model, list(range(LAYERS)), config.width, config.heads, config.ffn_width)
    x = torch.randn(2, 5, config.backbone_width)
    with torch.no_grad():
        for down in side.downsamples:
            assert torch.equal(down(x), x[..., hidden])
    assert "the linear downsamples select the kept channels" in qm.report["attach_side_taps"].notes[0]


# --- mix="residual": h + upsample(side), the upsample from zero ----------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_residual_mix_starts_as_nf4_and_trains_the_side_network_only(family):
    model = tiny_causal_lm(family, layers=LAYERS)
    nf4, qm = qgraph.transform(model, "nf4"), qgraph.transform(model, "qst-nf4", mix="residual")
    ids = random_ids((2, 12), seed=4)
    assert torch.equal(logits(qm, ids), logits(nf4, ids))
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    added_ids = added_parameter_ids(qm)
    assert {id(p) for p in qm.trainable_parameters()} == added_ids
    before = qm(input_ids=ids, labels=ids).loss.item()
    train_steps(qm, ids, 4, lr=1e-2)
    qm.zero_grad(set_to_none=True)
    qm(input_ids=ids, labels=ids).loss.backward()
    assert qm(input_ids=ids, labels=ids).loss.item() < before
    assert {id(p) for p in qm.parameters() if p.grad is not None} == added_ids  # all of it, nothing else
    report = qm.report["attach_side_taps"]
    [head] = report.with_action(REWRITTEN)
    assert "h + upsample(norm(h_g)), upsample 4->64 starting at 0" in head.detail
    assert report.params == sum(p.numel() for p in qm.parameters() if id(p) in added_ids)


def test_gate_init_sets_every_ladder_gates_start_and_keeps_step0():
    model = tiny_causal_lm("llama", layers=LAYERS)
    qm = qgraph.transform(model, "qst-nf4", gate_init=2.0)
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    assert torch.equal(side.gates.detach(), torch.full((LAYERS,), 2.0))
    ids = random_ids((2, 12), seed=5)
    assert torch.equal(logits(qm, ids), logits(qgraph.transform(model, "nf4"), ids))


# --- head_rank: a trainable low-rank delta on the frozen head's logits ------------------------------------------


def with_random_delta(qm):
    """The delta's `up` off zero (it starts at zero), so that it changes the logits."""
    with torch.no_grad():
        qm.graph_module.get_submodule(HEAD_DELTA_MODULE).up.normal_(generator=torch.Generator().manual_seed(0))
    return qm


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_rank_starts_as_nf4_and_trains_the_side_network_and_the_delta_only(family):
    model = tiny_causal_lm(family, layers=LAYERS)
    nf4, qm = qgraph.transform(model, "nf4"), qgraph.transform(model, "qst-nf4", head_rank=4)
    ids = random_ids((2, 12), seed=1)
    assert torch.equal(logits(qm, ids), logits(nf4, ids))
    delta = qm.graph_module.get_submodule(HEAD_DELTA_MODULE)
    assert delta.down.shape == (4, model.config.hidden_size) and delta.up.shape == (model.config.vocab_size, 4)
    side = qm.graph_module.get_submodule(SIDE_MODULE)
    allowed = {id(p) for p in (*side.parameters(), *delta.parameters())}
    assert {id(p) for p in qm.trainable_parameters()} == allowed
    qm(input_ids=ids, labels=ids).loss.backward()
    grads = {id(p) for p in qm.parameters() if p.grad is not None}
    assert id(delta.up) in grads and grads <= allowed  # no gradient enters the backbone or the head


def test_the_delta_leaves_the_graph_with_the_head_and_every_path_adds_it():
    qm = with_random_delta(qgraph.transform(tiny_causal_lm("llama", layers=LAYERS), "qst-nf4", head_rank=4))
    assert qm.info.lm_head.delta == HEAD_DELTA_MODULE  # chunk_lm_loss moved it out with the head
    assert not qm.graph_module.graph.find_nodes(op="call_module", target=HEAD_DELTA_MODULE)
    ids = random_ids((2, 12), seed=3)
    full = logits(qm, ids)
    with torch.no_grad():
        loss = qm(input_ids=ids, labels=ids).loss
    expected = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(qm.next_token_logits(ids), full[:, -1])
    prompt = ids[:1, :5]  # the decode graph keeps the delta in the graph
    assert torch.equal(qm.generate(prompt, max_new_tokens=5), qm.generate(prompt, max_new_tokens=5, use_cache=False))
    torch.testing.assert_close(logits(qgraph.finalize(qm), ids), full)  # the head restored with its delta


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_language_models_head_gets_the_default_rank_16_delta_and_head_rank_0_turns_it_off(family):
    model = tiny_causal_lm(family, layers=LAYERS)
    qm = qgraph.transform(model, "qst-nf4")
    delta = qm.graph_module.get_submodule(HEAD_DELTA_MODULE)
    assert delta.down.shape == (DEFAULT_HEAD_RANK, model.config.hidden_size) and DEFAULT_HEAD_RANK == 16
    record = next(r for r in qm.report["attach_side_taps"].records if HEAD_DELTA_MODULE in r.path)
    assert "rank 16" in record.detail and "head_rank=None: the default" in record.detail
    ids = random_ids((2, 12), seed=5)
    assert torch.equal(logits(qm, ids), logits(qgraph.transform(model, "nf4"), ids))  # step 0 is nf4's
    without = qgraph.transform(model, "qst-nf4", head_rank=0)
    assert not hasattr(without.graph_module, HEAD_DELTA_MODULE)
    assert not any(HEAD_DELTA_MODULE in r.path for r in without.report["attach_side_taps"].records)


def test_a_classifiers_head_or_a_trained_head_gets_no_delta_unless_asked():
    classifier = tiny_sequence_classifier("llama", num_labels=3, layers=LAYERS)
    assert not hasattr(qgraph.transform(classifier, "qst-nf4").graph_module, HEAD_DELTA_MODULE)
    asked = qgraph.transform(classifier, "qst-nf4", head_rank=2).graph_module.get_submodule(HEAD_DELTA_MODULE)
    assert asked.up.shape == (3, 2)
    untied = tiny_causal_lm("llama", layers=LAYERS, tie_word_embeddings=False)
    assert not hasattr(qgraph.transform(untied, "qst-nf4", train_head=True).graph_module, HEAD_DELTA_MODULE)


def test_head_rank_is_in_the_report_and_the_saved_state(tmp_path):
    model = tiny_causal_lm("llama", layers=LAYERS)
    qm = with_random_delta(qgraph.transform(model, "qst-nf4", head_rank=4))
    record = next(r for r in qm.report["attach_side_taps"].records if HEAD_DELTA_MODULE in r.path)
    width, vocab = model.config.hidden_size, model.config.vocab_size
    assert record.action == ADDED and "rank 4" in record.detail and record.params == 4 * (width + vocab)
    qm.save_pretrained(tmp_path)
    ids = random_ids((2, 9), seed=4)
    assert torch.equal(logits(qgraph.from_pretrained(model, tmp_path), ids), logits(qm, ids))
