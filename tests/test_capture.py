import pytest
import torch
from torch import fx, nn

import qgraph
from qgraph.capture import EXAMPLE_BATCH, EXAMPLE_SEQ, capture_info
from qgraph.models import tiny_causal_lm

aten = torch.ops.aten


def plain_mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        x = self.proj(x)
        if x.sum() > 0:
            return x * 2
        return x


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class BranchyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.block(x))


def hf_logits(model, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


# --- Hugging Face models ----------------------------------------------------------------------------


def test_hf_capture_records_how_it_is_called(llama_capture):
    model, gm = llama_capture
    info = capture_info(gm)
    assert isinstance(gm, fx.GraphModule)
    assert info.kind == "hf"
    assert info.model_class == "LlamaForCausalLM"
    assert info.input_names == ("input_ids", "attention_mask")
    assert info.constant_kwargs == {"use_cache": False}
    assert set(info.example_inputs) == {"input_ids", "attention_mask", "use_cache"}
    assert info.example_inputs["input_ids"].shape == (EXAMPLE_BATCH, EXAMPLE_SEQ)
    assert torch.equal(info.example_inputs["attention_mask"], torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long))
    assert info.max_seq_len == model.config.max_position_embeddings == 512
    assert info.config is model.config
    assert [n.target for n in gm.graph.find_nodes(op="placeholder")] == ["input_ids", "attention_mask", "use_cache"]


def test_hf_capture_output_equals_the_model(llama_capture, make_ids):
    model, gm = llama_capture
    ids = make_ids((2, 11), seed=3)
    with torch.no_grad():
        out = gm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert out.logits.shape == (2, 11, 256)
    assert torch.equal(out.logits, hf_logits(model, ids))


def test_hf_capture_is_dynamic_in_batch_and_sequence(llama_capture):
    _, gm = llama_capture
    ids_val = gm.graph.find_nodes(op="placeholder", target="input_ids")[0].meta["val"]
    assert all(isinstance(d, torch.SymInt) for d in ids_val.shape)


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("seq", [1, 7, 100])
def test_one_capture_serves_every_batch_and_length(llama_capture, make_ids, batch, seq):
    model, gm = llama_capture
    assert model.config.max_position_embeddings >= 256
    ids = make_ids((batch, seq), seed=batch * 1000 + seq)
    with torch.no_grad():
        got = gm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert got.shape == (batch, seq, 256)
    torch.testing.assert_close(got, hf_logits(model, ids), rtol=0, atol=1e-6)


def test_left_padded_rows_match_the_rows_run_alone(llama_capture, make_ids):
    model, gm = llama_capture
    lengths = [9, 5, 1, 7]
    width = max(lengths)
    rows = [make_ids((n,), seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    with torch.no_grad():
        batch_logits = gm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    eager_batch = hf_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(batch_logits[real], eager_batch[real], rtol=0, atol=1e-6)
    assert torch.isfinite(batch_logits[real]).all()
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = gm(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long),
                       use_cache=False).logits[0]
        eager_alone = hf_logits(model, row[None])[0]
        torch.testing.assert_close(alone, eager_alone, rtol=0, atol=1e-6)
        # RoPE attends by relative position, so the shifted positions of a padded row do not matter
        torch.testing.assert_close(batch_logits[i, width - len(row):], alone, rtol=0, atol=1e-5)


def test_hf_capture_with_explicit_example_inputs(make_ids):
    model = tiny_causal_lm("llama", layers=1)
    example = make_ids((3, 5), seed=1)
    gm = qgraph.capture(model, example)
    info = capture_info(gm)
    assert info.example_inputs["input_ids"] is example
    assert torch.equal(info.example_inputs["attention_mask"], torch.ones_like(example))
    ids = make_ids((1, 2), seed=2)  # smaller than the example in both dims: still dynamic
    with torch.no_grad():
        got = gm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    torch.testing.assert_close(got, hf_logits(model, ids), rtol=0, atol=1e-6)


def test_example_inputs_from_a_tokenizer_or_in_other_integer_dtypes_capture_the_int64_graph(make_ids):
    from transformers import BatchEncoding

    model = tiny_causal_lm("llama", layers=1)
    ids = make_ids((2, 6), seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for example in (BatchEncoding({"input_ids": ids, "attention_mask": mask}),  # what tokenizer(...) returns
                    {"input_ids": ids.int(), "attention_mask": mask.bool()}, (ids, mask)):
        info = capture_info(qgraph.capture(model, example))
        assert torch.equal(info.example_inputs["input_ids"], ids)
        assert torch.equal(info.example_inputs["attention_mask"], mask)
        assert info.example_inputs["attention_mask"].dtype == torch.int64
    # (ids, None): no mask given, one of ones
    info = capture_info(qgraph.capture(model, (ids, None)))
    assert torch.equal(info.example_inputs["attention_mask"], torch.ones_like(ids))


@pytest.mark.parametrize(("example", "message"), [
    ({"input_ids": torch.ones(2, 4)}, "example input_ids must be a tensor of integers .* got torch.float32"),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
     "example attention_mask must be a tensor of integers"),
    ((torch.ones(2, 4, dtype=torch.long),) * 3, r"are the input_ids, \(input_ids, attention_mask\) or a dict .* "
                                                 "got tuple of 3"),
])
def test_example_inputs_that_no_call_could_match_are_capture_errors(example, message):
    with pytest.raises(qgraph.CaptureError, match=message):
        qgraph.capture(tiny_causal_lm("llama", layers=1), example)


def test_capture_restores_training_mode(snapshot):
    model = tiny_causal_lm("llama", layers=1).train()
    before = snapshot(model)
    qgraph.capture(model)
    assert model.training
    before.assert_unchanged(model)


def test_capture_restores_mixed_training_modes():
    model = tiny_causal_lm("llama", layers=1).train()
    model.model.layers[0].mlp.eval()
    qgraph.capture(model)
    assert model.training
    assert not model.model.layers[0].mlp.training


@pytest.mark.parametrize(
    ("example", "words"),
    [
        (torch.ones(1, 8, dtype=torch.long), [">= 2", "(1, 8)"]),
        (torch.ones(4, 1, dtype=torch.long), [">= 2", "(4, 1)"]),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)},
         ["labels", "input_ids and attention_mask only"]),
        ({"attention_mask": torch.ones(2, 4, dtype=torch.long)}, ["need 'input_ids'"]),
    ],
)
def test_bad_hf_example_inputs_raise_capture_error(tiny_llama, snapshot, example, words):
    before = snapshot(tiny_llama)
    with pytest.raises(qgraph.CaptureError) as err:
        qgraph.capture(tiny_llama, example)
    for word in words:
        assert word in str(err.value)
    before.assert_unchanged(tiny_llama)


def test_capture_rejects_non_modules():
    with pytest.raises(qgraph.CaptureError, match="torch.nn.Module objects, got function"):
        qgraph.capture(lambda x: x)


def test_capture_refuses_what_qgraph_made_and_names_for_a_plain_module(tiny_llama):
    gm = qgraph.capture(tiny_llama)
    for made in (gm, qgraph.transform(tiny_llama, "nf4")):
        with pytest.raises(qgraph.CaptureError, match="made by qgraph .* capture the original model"):
            qgraph.capture(made)
    with pytest.raises(qgraph.CaptureError, match=r"positional arguments .* got a dict with keys \['x'\]"):
        qgraph.capture(plain_mlp(), {"x": torch.randn(2, 16)})


def test_capture_info_requires_a_qgraph_capture():
    gm = torch.fx.symbolic_trace(plain_mlp())
    with pytest.raises(qgraph.CaptureError, match="not made by qgraph.capture"):
        capture_info(gm)


# --- plain modules ----------------------------------------------------------------------------------


def test_plain_module_symbolic_trace_without_example_inputs():
    mlp = plain_mlp()
    gm = qgraph.capture(mlp)
    info = capture_info(gm)
    assert info.kind == "module"
    assert info.input_names == ("input",)
    assert info.example_inputs == {}
    assert info.model_class == "Sequential"
    ops = [(n.op, n.target) for n in gm.graph.nodes]
    assert ops == [("placeholder", "input"), ("call_module", "0"), ("call_module", "1"), ("call_module", "2"),
                   ("output", "output")]
    for batch in (1, 5):
        x = torch.randn(batch, 16)
        assert torch.equal(gm(x), mlp(x))


def test_plain_module_export_with_example_inputs():
    mlp = plain_mlp()
    example = torch.randn(4, 16)
    gm = qgraph.capture(mlp, (example,))
    info = capture_info(gm)
    assert info.kind == "module"
    assert info.input_names == ("input",)
    assert info.example_inputs["input"] is example
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(aten.linear.default) == 2
    assert calls.count(aten.relu.default) == 1
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear) for n in gm.graph.nodes)
    for batch in (4, 1, 9):  # Dim.AUTO keeps the batch dynamic
        x = torch.randn(batch, 16)
        assert torch.equal(gm(x), mlp(x))


# --- failures name the module and the op ---------------------------------------------------------------


@pytest.mark.parametrize("example_inputs", [(torch.randn(3, 8),), None], ids=["export", "symbolic_trace"])
def test_data_dependent_branch_names_module_and_source_line(example_inputs, snapshot):
    net = BranchyNet().train()
    before = snapshot(net)
    with pytest.raises(qgraph.CaptureError) as err:
        qgraph.capture(net, example_inputs)
    message = str(err.value)
    assert "could not capture BranchyNet" in message
    assert "module 'block.gate' (Gate)" in message
    assert "`if x.sum() > 0:`" in message
    assert "test_capture.py:" in message
    assert "fix: the module branches on tensor values" in message and "torch.cond" in message
    assert isinstance(err.value, qgraph.QGraphError)
    before.assert_unchanged(net)
    x = torch.randn(2, 8)
    assert net(x).shape == (2, 4)  # still usable, hooks gone
