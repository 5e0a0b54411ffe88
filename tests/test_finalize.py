import pytest
import torch

import qgraph
from qgraph.graph import count_ops, flat_graph, get_attr_tensor
from qgraph.models import tiny_causal_lm
from qgraph.ops.lrqat import rebuild_weight

LRQAT, INT4 = torch.ops.qgraph.lrqat_linear, torch.ops.qgraph.int4_linear
LAYERS, HIDDEN = 2, 64


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def logits(qm, x):
    with torch.no_grad():
        return qm(input_ids=x).logits


def train(qm, steps=3, lr=1e-2):
    """A few AdamW steps with a high learning rate, so A @ B moves codes off RTN and s off s0."""
    optimizer = torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=lr, lr_s=lr))
    x = tokens(1, (4, 16))
    for _ in range(steps):
        qm(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return qm


def expected_bytes(records_shapes, bits, group_size):
    total = 0
    for out_features, in_features in records_shapes:
        codes = out_features * ((in_features + 1) // 2 if bits <= 4 else in_features)
        groups = 1 if group_size <= 0 else in_features // group_size
        total += codes + out_features * groups * 4
    return total


@pytest.fixture(scope="module")
def trained_llama():
    model = tiny_causal_lm("llama", layers=LAYERS, hidden=HIDDEN)
    return train(qgraph.transform(model, "lrqat-w4"))


def test_finalize_equals_the_trained_forward_exactly(trained_llama):
    qm = trained_llama
    deployed = qgraph.finalize(qm)
    for seed, shape in ((0, (2, 12)), (3, (1, 33))):
        x = tokens(seed, shape)
        assert torch.equal(logits(deployed, x), logits(qm, x))
    counts = count_ops(deployed.graph_module)
    assert counts[INT4] == 7 * LAYERS and LRQAT not in counts
    assert counts[torch.ops.aten.linear] == 1  # lm_head


def test_training_moved_the_weights_off_rtn(trained_llama):
    # otherwise the equality above would only show that folding RTN is RTN
    rtn = qgraph.transform(tiny_causal_lm("llama", layers=LAYERS, hidden=HIDDEN), "lrqat-w4")
    assert not torch.equal(logits(trained_llama, tokens()), logits(rtn, tokens()))
    gm = trained_llama.graph_module
    flipped = 0
    for node in flat_graph(gm).nodes:  # inside the checkpoint regions
        if node.target == LRQAT.default:
            phi0, lora_a, lora_b, _ = (get_attr_tensor(gm, arg.target).detach() for arg in node.args[1:5])
            trained = rebuild_weight(phi0, lora_a, lora_b, 4, 1 / 32, "fixed", torch.float32)
            start = rebuild_weight(phi0, torch.zeros_like(lora_a), lora_b, 4, 1 / 32, "fixed", torch.float32)
            flipped += int((trained != start).sum())
    assert flipped > 100  # A @ B moved integer codes, so the fold's rounding path is exercised


def test_finalized_module_is_frozen_and_holds_only_codes_and_scales(trained_llama):
    deployed = qgraph.finalize(trained_llama)
    assert deployed.trainable_parameters() == []
    assert deployed.report.trainable_params == 0
    assert deployed.report.frozen_params == sum(p.numel() for p in deployed.parameters())
    names = [n for n, _ in deployed.graph_module.named_parameters()] + \
        [n for n, _ in deployed.graph_module.named_buffers()]
    assert not any("lrqat_" in n for n in names)
    buffers = dict(deployed.graph_module.named_buffers())
    assert buffers["model.layers.0.self_attn.q_proj.int4_codes"].dtype == torch.uint8
    assert buffers["model.layers.0.self_attn.q_proj.int4_codes"].shape == (64, 32)  # two 4-bit codes per byte
    assert buffers["model.layers.0.self_attn.q_proj.int4_scale"].shape == (64, 1)
    assert deployed.plan.name == "lrqat-w4+finalize" and deployed.report.plan == "lrqat-w4+finalize"
    assert [p.name for p in deployed.plan.passes] == ["lrqat", "fold_lrqat"]


def test_fold_report_is_about_half_a_byte_per_weight_plus_scales(trained_llama):
    report = qgraph.finalize(trained_llama).report["fold_lrqat"]
    assert report.matched == len(report.rewritten) == 7 * LAYERS
    shapes = [tuple(int(v) for v in r.detail.split()[0].split("x")) for r in report.rewritten]
    assert report.bytes_after == expected_bytes(shapes, 4, -1)
    weights = sum(o * i for o, i in shapes)
    assert report.params == weights
    assert 0.5 < report.bytes_after / weights < 0.5 + 4 / 64 + 1e-9  # scales: 4 B per row of >= 64 weights
    assert report.bytes_before == trained_llama.report["lrqat"].bytes_after
    q = next(r for r in report.records if r.path == "model.layers.0.self_attn.q_proj")
    assert q.detail == "64x64 int4 per-channel packed 2/byte" and q.bytes_after == 64 * 32 + 64 * 4


def test_the_trained_module_stays_trainable_and_unchanged(trained_llama):
    qm = trained_llama
    x = tokens()
    before = logits(qm, x)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    deployed = qgraph.finalize(qm)
    assert count_ops(qm.graph_module)[LRQAT] == 7 * LAYERS
    assert all(torch.equal(qm.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits(qm, x), before)
    # the capture info (and the original model behind it) is shared, not copied; the head is back in the graph
    assert deployed.info.loss_function is qm.info.loss_function and deployed.info.config is qm.info.config
    assert qm.info.lm_head is not None and deployed.info.lm_head is None
    qm(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in qm.trainable_parameters())
    qm.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("family", "overrides", "bits", "group_size", "codes_dtype"), [
    ("gpt2", {}, 4, -1, torch.uint8),
    ("llama", {"bits": 3, "group_size": 32}, 3, 32, torch.uint8),
    ("qwen2", {"bits": 6, "phi_format": "bf16"}, 6, -1, torch.int8),
])
def test_finalize_other_families_bits_and_groups(family, overrides, bits, group_size, codes_dtype):
    qm = train(qgraph.transform(tiny_causal_lm(family, layers=1, hidden=HIDDEN), "lrqat-w4", **overrides))
    deployed = qgraph.finalize(qm)
    x = tokens()
    assert torch.equal(logits(deployed, x), logits(qm, x))
    sites = 4 if family == "gpt2" else 7
    assert count_ops(deployed.graph_module)[INT4] == sites and LRQAT not in count_ops(deployed.graph_module)
    report = deployed.report["fold_lrqat"]
    shapes = [tuple(int(v) for v in r.detail.split()[0].split("x")) for r in report.rewritten]
    assert report.bytes_after == expected_bytes(shapes, bits, group_size)
    codes = [b for n, b in deployed.graph_module.named_buffers() if n.endswith("int4_codes")]
    assert len(codes) == sites and all(c.dtype == codes_dtype for c in codes)


def test_finalize_without_lrqat_layers_is_a_frozen_copy():
    qm = qgraph.transform(tiny_causal_lm("llama", layers=1, hidden=HIDDEN), "nf4")
    deployed = qgraph.finalize(qm)
    assert torch.equal(logits(deployed, tokens()), logits(qm, tokens()))
    report = deployed.report["fold_lrqat"]
    assert report.matched == 0 and "nothing to fold" in report.notes[0]


def test_finalize_refuses_other_modules():
    with pytest.raises(TypeError, match="QGraphModule"):
        qgraph.finalize(torch.nn.Linear(2, 2))
