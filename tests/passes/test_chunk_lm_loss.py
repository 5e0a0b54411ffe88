import pytest
import torch

import qgraph
from qgraph.graph import count_ops
from qgraph.models import tiny_sequence_classifier
from qgraph.plans import PassConfig, Plan

from tests.conftest import make_gpt2, make_llama, random_ids

LINEAR = torch.ops.aten.linear
NF4 = Plan("nf4-only", "", (PassConfig("quantize_nf4"),))
NF4_CHUNKED = Plan("nf4-chunked", "", (PassConfig("quantize_nf4"), PassConfig("chunk_lm_loss", {"chunk_tokens": 5})))


@pytest.fixture(scope="module")
def pair():
    model = make_llama()
    return qgraph.transform(model, NF4), qgraph.transform(model, NF4_CHUNKED)


def test_head_leaves_the_graph_and_is_reported(pair):
    plain, chunked = pair
    assert count_ops(plain.graph_module).get(LINEAR, 0) == 1  # lm_head: the only linear nf4 leaves
    assert count_ops(chunked.graph_module).get(LINEAR, 0) == 0
    report = chunked.report.passes[-1]
    assert [(r.path, r.action) for r in report.records] == [("lm_head", "rewritten")]
    assert "chunks of 5 tokens" in report.records[0].detail
    assert chunked.info.lm_head.weight == "lm_head.weight"


def test_eval_logits_and_loss_equal_the_unchunked_module(pair):
    plain, chunked = pair
    ids = random_ids((3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask, labels=labels)
        b = chunked(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.loss, a.loss)


def test_training_gradients_equal_and_logits_are_not_built():
    model = make_llama()
    plan = Plan("lrqat-chunked", "", (PassConfig("lrqat", {"bits": 4, "rank": 4}),
                                      PassConfig("chunk_lm_loss", {"chunk_tokens": 7})))
    unchunked = Plan("lrqat-plain", "", plan.passes[:1])
    ids = random_ids((2, 10))
    grads = []
    for p in (plan, unchunked):
        torch.manual_seed(0)  # B is Kaiming-uniform random: the same draw in both modules
        qm = qgraph.transform(model, p).train()
        with torch.no_grad():  # A = 0 makes B's gradient 0: move A off zero, identically in both
            for name, param in qm.named_parameters():
                if name.endswith("lrqat_a"):
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
        out = qm(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n: q.grad for n, q in qm.named_parameters() if q.requires_grad})
        if p is plan:
            assert out.logits is None
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_classifier_head_is_skipped_with_the_reason():
    model = tiny_sequence_classifier("llama", layers=2, hidden=64)
    qm = qgraph.transform(model, Plan("cls", "", (PassConfig("chunk_lm_loss"),)))
    report = qm.report.passes[-1]
    assert qm.info.lm_head is None
    assert not report.rewritten
    assert report.notes or report.skipped  # the score head is pooled before the output: not a match


def test_gpt2_tied_head_chunks_too():
    model = make_gpt2()
    ids = random_ids((2, 9))
    plain = qgraph.transform(model, NF4)
    chunked = qgraph.transform(model, NF4_CHUNKED)
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss)


def test_bad_chunk_size_is_an_error_before_capture():
    with pytest.raises(qgraph.PlanError, match="chunk_tokens must be a positive"):
        qgraph.transform(make_llama(), NF4_CHUNKED, chunk_tokens=0)


def test_the_captured_info_is_left_as_captured():
    from passes.chunk_lm_loss import ChunkLMLossOptions, chunk_lm_loss
    from qgraph.capture import capture, capture_info
    from qgraph.pipeline import PassContext

    gm = capture(make_llama())
    captured = capture_info(gm)
    chunk_lm_loss(gm, PassContext(example_inputs=captured.example_inputs), ChunkLMLossOptions())
    assert captured.lm_head is None  # what else shares it (finalize's copy) still sees the head in the graph
    assert capture_info(gm).lm_head.weight == "lm_head.weight"
