import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qgraph
from passes.lrqat import LORA_A, LORA_B, PHI0, SCALE, LRQATOptions, lrqat
from qgraph.capture import capture, capture_info
from qgraph.errors import PassError, PlanError, QGraphError
from qgraph.graph import count_ops, flat_graph, get_attr_tensor
from qgraph.models import tiny_causal_lm
from qgraph.ops.lrqat import rebuild_weight
from qgraph.pipeline import PassContext
from qgraph.quant.downcast import fractional_bits
from qgraph.quant.uniform import init_scale, quantize_to_codes

LRQAT = torch.ops.qgraph.lrqat_linear
LAYERS, HIDDEN = 2, 64
LLAMA_SITES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def logits(qm, x):
    with torch.no_grad():
        return qm(input_ids=x).logits


def lrqat_nodes(qm):
    """Inside checkpoint regions too (the lrqat plans checkpoint every block): copies whose get_attr
    arguments name the module's own tensors."""
    return [n for n in flat_graph(qm.graph_module).nodes if n.op == "call_function" and n.target == LRQAT.default]


def node_tensors(qm, node):
    gm = qm.graph_module
    return {name: get_attr_tensor(gm, arg.target)
            for name, arg in zip(("phi0", "lora_a", "lora_b", "scale"), node.args[1:5], strict=True)}


class RTNLinear(nn.Module):
    """A round-to-nearest quantized linear in plain PyTorch: y = (x @ W_int^T) * s + bias, the per-channel
    scale applied after the matmul as integer kernels apply it."""

    def __init__(self, weight, bias, bits, scale_dtype=None):
        super().__init__()
        scale = init_scale(weight, bits, -1)
        if scale_dtype is not None:  # the scale a narrower format stores (lrqat's scale_dtype option)
            scale = scale.to(scale_dtype).float()
        self.register_buffer("codes", quantize_to_codes(weight, scale, bits, -1).float())
        self.register_buffer("scale", scale[:, 0])
        self.bias = bias

    def forward(self, x):
        y = F.linear(x, self.codes) * self.scale
        return y if self.bias is None else y + self.bias


def rtn_reference(model, paths, bits=4, scale_dtype=None):
    """A copy of `model` with each linear at `paths` replaced by its RTN-quantized self (plain PyTorch)."""
    ref = copy.deepcopy(model)
    for path in paths:
        module = ref.get_submodule(path)
        transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        w = module.weight.detach().t() if transposed else module.weight.detach()
        owner, _, name = path.rpartition(".")
        setattr(ref.get_submodule(owner), name, RTNLinear(w.contiguous(), module.bias, bits, scale_dtype))
    return ref


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama", layers=LAYERS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def llama_w4(llama):
    return qgraph.transform(llama, "lrqat-w4")


@pytest.fixture(scope="module")
def llama_rtn(llama):
    return qgraph.transform(llama, "rtn-w4")


# --- structure -------------------------------------------------------------------------------------------


def test_every_decoder_linear_becomes_lrqat_linear_and_lm_head_stays(llama_w4):
    counts = count_ops(llama_w4.graph_module)
    assert counts[LRQAT] == 7 * LAYERS
    # lm_head untouched: the plan's chunk_lm_loss moved it out of the graph, where the loss reads it
    assert counts.get(torch.ops.aten.linear, 0) == 0
    assert counts.get(torch.ops.qgraph.int4_linear, 0) == 0
    assert llama_w4.info.lm_head.weight == "lm_head.weight"
    frozen_float = dict(llama_w4.graph_module.named_parameters())
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert frozen_float[name].dtype == torch.float32 and not frozen_float[name].requires_grad
    # the pretrained weights are gone from the rewritten graph: Phi0 replaces them
    names = {n for n, _ in llama_w4.graph_module.named_parameters()}
    assert not any(n.endswith("q_proj.weight") for n in names)


def test_trainable_parameters_are_exactly_a_b_and_s(llama_w4):
    trainable = {n for n, p in llama_w4.graph_module.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.{site}.{attr}"
                for i in range(LAYERS) for site in LLAMA_SITES for attr in (LORA_A, LORA_B, SCALE)}
    assert trainable == expected
    assert len(llama_w4.trainable_parameters()) == 3 * 7 * LAYERS
    assert llama_w4.report.trainable_params == sum(p.numel() for p in llama_w4.trainable_parameters())
    buffers = dict(llama_w4.graph_module.named_buffers())
    assert buffers[f"model.layers.0.self_attn.q_proj.{PHI0}"].dtype == torch.int8  # Q4.4 fixed point


def test_site_tensors_start_at_rtn(llama, llama_w4):
    node = lrqat_nodes(llama_w4)[0]
    t = node_tensors(llama_w4, node)
    w0 = llama.model.layers[0].self_attn.q_proj.weight.detach()
    assert t["lora_a"].shape == (HIDDEN, 32) and torch.count_nonzero(t["lora_a"]) == 0
    assert t["lora_b"].shape == (32, HIDDEN) and t["lora_b"].abs().max() <= 1 / HIDDEN ** 0.5
    assert isinstance(t["scale"], nn.Parameter) and torch.equal(t["scale"], init_scale(w0, 4, -1, "lp"))
    assert node.args[6:] == (4, -1, 1 / 32, "fixed")


def test_report_records_every_site_with_sizes(llama_w4):
    report = llama_w4.report["lrqat"]
    assert report.matched == len(report.rewritten) == 7 * LAYERS and not report.skipped
    q = next(r for r in report.records if r.path == "model.layers.0.self_attn.q_proj")
    assert q.detail == "64x64 w4 per-channel fixed r32"
    assert q.params == 64 * 64 and q.bytes_before == 64 * 64 * 4
    assert q.bytes_after == 64 * 64 * 1 + (64 * 32 + 32 * 64) * 4 + 64 * 4  # Phi0 int8 + A + B + s
    down = next(r for r in report.records if r.path == "model.layers.0.mlp.down_proj")
    assert down.detail == "64x256 w4 per-channel fixed r32"


# --- step 0 is RTN ---------------------------------------------------------------------------------------


def test_step_zero_equals_rtn_plan_and_plain_pytorch_rtn(llama, llama_rtn):
    x = tokens()
    qm = qgraph.transform(llama, "lrqat-w4", phi_format="int-packed")
    out = logits(qm, x)
    assert torch.equal(out, logits(llama_rtn, x))
    reference = rtn_reference(llama, [r.path for r in qm.report["lrqat"].rewritten])
    with torch.no_grad():
        assert torch.equal(out, reference(input_ids=x).logits)


def test_fp32_phi_is_exact_rtn(llama, llama_rtn):
    x = tokens()
    assert torch.equal(logits(qgraph.transform(llama, "lrqat-w4", phi_format="fp32"), x), logits(llama_rtn, x))


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_families_start_at_plain_pytorch_rtn(family):
    # qwen2: biases on q, k, v; gpt2: Conv1D, weights stored (in, out) and read by addmm
    model = tiny_causal_lm(family, layers=1, hidden=HIDDEN)
    x = tokens()
    qm = qgraph.transform(model, "rtn-w4")
    assert count_ops(qm.graph_module)[LRQAT] == (4 if family == "gpt2" else 7)
    out = logits(qm, x)
    reference = rtn_reference(model, [r.path for r in qm.report["lrqat"].rewritten])
    with torch.no_grad():
        expected = reference(input_ids=x).logits
    if family == "gpt2":
        # Conv1D's addmm(x, W) and linear(x, W^T) may sum in another order on other BLAS builds
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    else:
        assert torch.equal(out, expected)


def test_fixed_point_phi_differs_from_rtn_only_at_near_ties(llama, llama_w4):
    # downcast.py: Q4.4 rounds W0/s0 to 1/16 first; a value within 1/32 of k + 1/2 may then round to
    # the other neighbour. Every other weight is RTN's; and lrqat-w4 equals rtn-w4 with the same format.
    bits = 4
    mismatches = total = 0
    for node in lrqat_nodes(llama_w4):
        t = node_tensors(llama_w4, node)
        path = node.args[1].target.rpartition(".")[0]
        w0 = llama.get_submodule(path).weight.detach()
        w_int = rebuild_weight(t["phi0"], t["lora_a"].detach(), t["lora_b"].detach(), bits, 1 / 32, "fixed",
                               torch.float32)
        rtn = quantize_to_codes(w0, t["scale"].detach(), bits, -1).float()
        units = w0 / t["scale"].detach()
        near_tie = ((units - units.floor()) - 0.5).abs() <= 2.0 ** -(fractional_bits(bits) + 1)
        differ = w_int != rtn
        assert not (differ & ~near_tie).any(), path
        assert (w_int - rtn).abs().max() <= 1
        mismatches, total = mismatches + int(differ.sum()), total + differ.numel()
    assert mismatches < 0.05 * total
    x = tokens()
    assert torch.equal(logits(llama_w4, x), logits(qgraph.transform(llama, "rtn-w4", phi_format="fixed"), x))


# --- group sizes ------------------------------------------------------------------------------------------


def test_group_size_that_does_not_divide_raises_before_changing_anything(llama, snapshot):
    gm = capture(llama)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    context = PassContext(example_inputs=capture_info(gm).example_inputs)
    with pytest.raises(PassError) as info:
        lrqat(gm, context, LRQATOptions(group_size=48))
    message = str(info.value)
    assert "group_size=48" in message and "model.layers.0.self_attn.q_proj" in message
    assert "in_features=64" in message and "in_features=256" in message
    assert "nearest: 32 or 64" in message and "per_channel_fallback=True" in message
    assert gm.code == code and context.trainable == {}
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())

    before = snapshot(llama)
    with pytest.raises(PassError, match="does not divide"):
        qgraph.transform(llama, "lrqat-w4", group_size=48)
    before.assert_unchanged(llama)


def test_per_channel_fallback_lists_the_layers(llama):
    qm = qgraph.transform(llama, "lrqat-w4g128", per_channel_fallback=True)
    report = qm.report["lrqat"]
    fallback = [r for r in report.rewritten if "fallback" in r.detail]
    assert {r.path.split(".", 3)[3] for r in fallback} == set(LLAMA_SITES) - {"mlp.down_proj"}  # in_features 64
    assert len(fallback) == 6 * LAYERS
    assert all("group_size=128 does not divide in_features=64" in r.reason for r in fallback)
    (note,) = report.notes[:1]
    assert "12 layer(s)" in note and "model.layers.0.self_attn.q_proj" in note and "in_features=64" in note
    assert "model.layers.0.mlp.down_proj" not in note
    down = next(r for r in report.rewritten if r.path == "model.layers.0.mlp.down_proj")
    assert down.detail == "64x256 w4 g128 fixed r32" and not down.reason
    shapes = {n.args[1].target.rsplit(".", 2)[-2]: (n.args[4].meta["val"].shape, n.args[7])
              for n in lrqat_nodes(qm) if ".layers.0." in n.args[1].target}
    assert shapes["q_proj"] == ((64, 1), -1) and shapes["down_proj"] == ((64, 2), 128)
    assert "fallback" in str(qm.report) or "12 layer(s)" in str(qm.report)


def test_options_override_rank_and_group_size(llama):
    qm = qgraph.transform(llama, "lrqat-w4", rank=8, group_size=32)
    assert qm.report["lrqat"].options["rank"] == 8 and qm.report["lrqat"].options["group_size"] == 32
    for node in lrqat_nodes(qm):
        t = node_tensors(qm, node)
        out_features, in_features = t["lora_a"].shape[0], t["lora_b"].shape[1]
        assert t["lora_a"].shape == (out_features, 8) and t["lora_b"].shape == (8, in_features)
        assert t["scale"].shape == (out_features, in_features // 32)
        assert node.args[6:] == (4, 32, 1 / 8, "fixed")
    assert qm.report["lrqat"].records[0].detail == "64x64 w4 g32 fixed r8"


@pytest.mark.parametrize(("options", "match"), [
    ({"bits": 1}, "bits must be an integer from 2 to 8"),
    ({"bits": 9}, "bits must be"),
    ({"group_size": 0}, "group_size must be -1"),
    ({"group_size": -4}, "group_size must be -1"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"alpha": 0.0}, "alpha must be a positive number"),
    ({"phi_format": "int4"}, "phi_format must be one of fixed, int-packed, bf16, fp32"),
    ({"init": "max"}, "init must be one of lp, mse, minmax"),
    ({"p": -1.0}, "p must be a positive number"),
    ({"n_candidates": 0}, "n_candidates must be a positive integer"),
    ({"train_ab": "yes"}, "train_ab must be True or False"),
    ({"scale_dtype": "fp16"}, "scale_dtype must be one of float32, float16, bfloat16"),
])
def test_invalid_options_are_refused_with_the_valid_ones(options, match):
    with pytest.raises(ValueError, match=match):
        LRQATOptions(**options)


def test_invalid_option_fails_before_capture():
    model = nn.Linear(4, 4)  # never captured: the plan error comes first
    with pytest.raises(PlanError, match="pass 'lrqat': bits must be"):
        qgraph.transform(model, "lrqat-w4", bits=12)


def test_tied_weight_is_skipped_with_a_reason():
    model = tiny_causal_lm("llama", layers=1, hidden=HIDDEN, tie_word_embeddings=True)
    qm = qgraph.transform(model, "lrqat-w4", include=("*",))
    (skipped,) = qm.report["lrqat"].skipped
    assert skipped.path == "lm_head" and "tied" in skipped.reason
    assert count_ops(qm.graph_module)[LRQAT] == 7


# --- plans and training ----------------------------------------------------------------------------------


def test_lrqat_plans_are_registered():
    names = set(qgraph.plans())
    assert {"lrqat-w4", "lrqat-w4g128", "lrqat-w3", "lrqat-w3g128", "rtn-w4", "peqa-w4"} <= names


def test_rtn_trains_nothing_and_peqa_trains_scales_only(llama, llama_rtn):
    rtn = llama_rtn
    assert rtn.trainable_parameters() == [] and rtn.report.trainable_params == 0
    with pytest.raises(QGraphError, match="no trainable LR-QAT parameters.*rtn-w4"):
        qgraph.param_groups(rtn)
    peqa = qgraph.transform(llama, "peqa-w4")
    trainable = {n.rpartition(".")[2] for n, p in peqa.graph_module.named_parameters() if p.requires_grad}
    assert trainable == {SCALE}
    (group,) = qgraph.param_groups(peqa)
    assert group["name"] == "lrqat_scale" and len(group["params"]) == 7 * LAYERS


def test_param_groups_split_ab_from_scales(llama_w4):
    groups = qgraph.param_groups(llama_w4, lr_ab=2e-3, lr_s=3e-5, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lrqat_ab", "lrqat_scale"}
    assert len(by_name["lrqat_ab"]["params"]) == 2 * 7 * LAYERS and by_name["lrqat_ab"]["lr"] == 2e-3
    assert len(by_name["lrqat_scale"]["params"]) == 7 * LAYERS and by_name["lrqat_scale"]["lr"] == 3e-5
    assert by_name["lrqat_ab"]["weight_decay"] == 0.1 and by_name["lrqat_scale"]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    torch.optim.AdamW(groups)  # accepted as is


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_decreases_with_adamw(family):
    model = tiny_causal_lm(family, layers=1, hidden=HIDDEN)
    qm = qgraph.transform(model, "lrqat-w4")
    optimizer = torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=1e-2, lr_s=1e-3))
    x = tokens(1, (4, 16))
    losses = []
    for _ in range(10):
        loss = qm(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None or p.requires_grad for p in qm.parameters())
    assert all(not p.requires_grad for n, p in qm.named_parameters() if n.endswith(("wte.weight", "embed_tokens.weight")))


# --- scale_dtype="float16": scales GGUF (fp16) stores exactly -----------------------------------------------

ROUND_SCALE = torch.ops.qgraph.round_scale


def is_fp16_exact(tensor):
    return torch.equal(tensor.detach().half().float(), tensor.detach())


def scale_parameters(qm):
    return {n: p for n, p in qm.graph_module.named_parameters() if n.endswith(SCALE)}


def train(qm, steps=3, lr_s=1e-4, seed=1):
    """`steps` AdamW steps. lr_s 1e-4 (10x the paper's) moves a ~0.01 scale by ~1% over 3 steps: past a few
    fp16 steps, so the rounded scales change, while each step alone moves the fp32 parameter off fp16's grid."""
    optimizer = torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=1e-2, lr_s=lr_s))
    for step in range(steps):
        x = tokens(seed + step, (2, 16))
        qm(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return qm


@pytest.fixture(scope="module")
def llama_fp16_trained(llama):
    return train(qgraph.transform(llama, "lrqat-w4", scale_dtype="float16", group_size=32))


def test_scale_dtype_puts_round_scale_between_each_scale_and_its_layer(llama, llama_w4):
    qm = qgraph.transform(llama, "lrqat-w4", scale_dtype="float16")
    nodes = lrqat_nodes(qm)
    assert len(nodes) == count_ops(qm.graph_module)[ROUND_SCALE] == 7 * LAYERS
    for node in nodes:
        rounding = node.args[4]
        assert rounding.target == ROUND_SCALE.default and rounding.args[1] == "float16"
        assert rounding.args[0].op == "get_attr" and rounding.args[0].target.endswith(SCALE)
        assert rounding.meta["nn_module_stack"] == node.meta["nn_module_stack"]  # in the layer's block
    # the optimizer groups still find the scales behind it (lr_s, not lr_ab)
    by_name = {g["name"]: g for g in qgraph.param_groups(qm)}
    assert {id(p) for p in by_name["lrqat_scale"]["params"]} == {id(p) for p in scale_parameters(qm).values()}
    assert "other" not in by_name
    assert qm.report["lrqat"].records[0].detail == "64x64 w4 per-channel fixed r32 scales float16"
    assert count_ops(llama_w4.graph_module).get(ROUND_SCALE, 0) == 0  # the default adds none


def test_bad_scale_dtype_is_refused_listing_the_valid_values(llama, snapshot):
    before = snapshot(llama)
    with pytest.raises(PlanError, match=r"pass 'lrqat': scale_dtype must be one of float32, float16, bfloat16 "
                                        r".*got 'half'"):
        qgraph.transform(llama, "lrqat-w4", scale_dtype="half")
    before.assert_unchanged(llama)


@pytest.mark.parametrize("plan", ["lrqat-w4", "rtn-w4"])
def test_fp16_scales_step_zero_is_plain_pytorch_rtn_on_the_rounded_scale(llama, llama_rtn, plan):
    x = tokens()
    qm = qgraph.transform(llama, plan, scale_dtype="float16", phi_format="int-packed")
    assert all(is_fp16_exact(s) for s in scale_parameters(qm).values())  # s0 itself was rounded
    reference = rtn_reference(llama, [r.path for r in qm.report["lrqat"].rewritten], scale_dtype=torch.float16)
    out = logits(qm, x)
    with torch.no_grad():
        assert torch.equal(out, reference(input_ids=x).logits)
    assert not torch.equal(out, logits(llama_rtn, x))  # the rounding changed the model (else this proves nothing)


def test_fp16_scales_train_in_fp32_and_fold_to_the_trained_forward_exactly(llama, llama_fp16_trained):
    qm = llama_fp16_trained
    masters = scale_parameters(qm)
    # the fp32 parameters kept updates smaller than an fp16 step...
    assert not any(is_fp16_exact(s) for s in masters.values())
    # ...and the rounded scales the forward sees moved on fp16's grid during training
    initial = scale_parameters(qgraph.transform(llama, "lrqat-w4", scale_dtype="float16", group_size=32))
    moved = sum(int((s.detach().half() != initial[n].detach().half()).sum()) for n, s in masters.items())
    assert moved > 0.5 * sum(s.numel() for s in masters.values())

    deployed = qgraph.finalize(qm)
    assert count_ops(deployed.graph_module).get(ROUND_SCALE, 0) == 0
    x = tokens(7, (3, 10))
    assert torch.equal(logits(deployed, x), logits(qm, x))
    folded = {n: b for n, b in deployed.graph_module.named_buffers() if n.endswith("int4_scale")}
    assert len(folded) == 7 * LAYERS and all(is_fp16_exact(s) for s in folded.values())
    # the folded scale is the rounded parameter, not the parameter
    name = "model.layers.0.self_attn.q_proj."
    assert torch.equal(folded[name + "int4_scale"], masters[name + SCALE].detach().half().float())
    assert deployed.report["fold_lrqat"].records[0].detail.endswith("scales float16-exact")


def test_without_the_option_trained_scales_are_not_fp16_exact(llama):
    deployed = qgraph.finalize(train(qgraph.transform(llama, "lrqat-w4", group_size=32), steps=1))
    folded = [b for n, b in deployed.graph_module.named_buffers() if n.endswith("int4_scale")]
    assert not any(is_fp16_exact(s) for s in folded)  # what the option is for


@pytest.mark.parametrize("checkpoint", [None, "none"])
def test_fp16_scale_gradient_is_the_unrounded_layers_at_the_rounded_scale(llama, llama_fp16_trained, checkpoint):
    # straight through: d loss / d s of the rounding module equals the float32 module's gradient taken
    # with its scales set to the rounded values (same Phi0, A, B)
    rounding = qgraph.transform(llama, "lrqat-w4", scale_dtype="float16", group_size=32, checkpoint=checkpoint)
    rounding.load_state_dict(llama_fp16_trained.state_dict())
    plain = qgraph.transform(llama, "lrqat-w4", group_size=32, checkpoint=checkpoint)
    plain.load_state_dict(llama_fp16_trained.state_dict())
    with torch.no_grad():
        for s in scale_parameters(plain).values():
            s.copy_(s.half().float())
    x = tokens(3, (2, 16))
    grads = {}
    for name, qm in (("rounding", rounding), ("plain", plain)):
        loss = qm(input_ids=x, labels=x).loss
        grads[name] = dict(zip(scale_parameters(qm), torch.autograd.grad(loss, list(scale_parameters(qm).values())),
                               strict=True))
    assert grads["rounding"].keys() == grads["plain"].keys()
    for key, grad in grads["rounding"].items():
        assert torch.equal(grad, grads["plain"][key]), key
    assert any(g.abs().sum() > 0 for g in grads["rounding"].values())


def test_fp16_scales_save_nothing_more_for_backward():
    one_layer = tiny_causal_lm("llama", layers=1, hidden=HIDDEN)

    def saved_shapes(qm):
        shapes = []
        x = tokens(4, (2, 16))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            qm(input_ids=x, labels=x).loss.backward()
        return sorted(shapes)

    for checkpoint in (None, "none"):
        rounding = saved_shapes(qgraph.transform(one_layer, "lrqat-w4", scale_dtype="float16", checkpoint=checkpoint))
        assert rounding == saved_shapes(qgraph.transform(one_layer, "lrqat-w4", checkpoint=checkpoint))


def test_fp16_scales_survive_save_and_load_pretrained(llama, llama_fp16_trained, tmp_path):
    llama_fp16_trained.save_pretrained(tmp_path / "adapters")
    loaded = qgraph.from_pretrained(llama, tmp_path / "adapters")
    assert count_ops(loaded.graph_module)[ROUND_SCALE] == 7 * LAYERS
    x = tokens(5)
    assert torch.equal(logits(loaded, x), logits(llama_fp16_trained, x))


def test_scales_fp16_cannot_hold_are_refused_naming_the_layer():
    model = tiny_causal_lm("llama", layers=1, hidden=HIDDEN)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e7)  # scales ~1e5: past fp16's largest, 65504
    with pytest.raises(PassError, match=r"scale_dtype='float16' cannot hold the initial scales of "
                                        r"model\.layers\.0\.mlp\.up_proj .*round to inf or 0"):
        qgraph.transform(model, "lrqat-w4", scale_dtype="float16")
    assert qgraph.transform(model, "lrqat-w4", scale_dtype="bfloat16")  # bf16 has float32's range
