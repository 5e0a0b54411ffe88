import pytest
import torch
from torch.nn import functional as F

from qgraph.loss import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference


def case(dtype=torch.float32, batch=2, seq=7, hidden=16, vocab=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) / hidden**0.5
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2] = IGNORE_INDEX  # a padded prefix
    return h, w, b, labels


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])  # ragged chunks, one chunk, more chunk than tokens
def test_loss_equals_reference(chunk):
    h, w, b, labels = case()
    got = linear_cross_entropy(h, w, b, labels, chunk_tokens=chunk)
    torch.testing.assert_close(got, linear_cross_entropy_reference(h, w, b, labels))


def test_gradients_equal_reference_for_hidden_weight_and_bias():
    h, w, b, labels = case()
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = [t.clone().requires_grad_() for t in (h, w, b)]
    linear_cross_entropy(*ours, labels, chunk_tokens=4).backward()
    linear_cross_entropy_reference(*ref, labels).backward()
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


def test_bf16_loss_and_gradients_are_the_fp32_logits_reference():
    """bf16 hidden states and head: the bf16 logits are taken to float32 before the log-softmax, as the reference
    takes the whole bf16 product; gradients come back in each input's dtype, within bf16 rounding."""
    h, w, b, labels = case(dtype=torch.bfloat16, vocab=300, hidden=32)
    ours = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = linear_cross_entropy(*ours, labels, chunk_tokens=4)
    expected = linear_cross_entropy_reference(*ref, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for a, r in zip(ours, ref, strict=True):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad, r.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    h, w, b, labels = case(torch.float64, batch=2, seq=5, hidden=6, vocab=11, bias=bias)
    inputs = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_() if bias else None)
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb: linear_cross_entropy(hh, ww, bb, labels, chunk_tokens=3), inputs)


def test_frozen_head_gets_no_gradient_and_hidden_does():
    h, w, b, labels = case()
    h.requires_grad_()
    linear_cross_entropy(h, w, b, labels, chunk_tokens=4).backward()
    assert h.grad is not None and w.grad is None and b.grad is None


def test_num_items_in_batch_divides_the_sum_as_huggingface_does():
    h, w, b, labels = case()
    logits = F.linear(h, w, b)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum") / 40
    torch.testing.assert_close(linear_cross_entropy(h, w, b, labels, chunk_tokens=4, num_items_in_batch=40), expected)


def test_nothing_vocab_sized_is_saved_for_backward():
    h, w, b, labels = case(seq=32, hidden=8, vocab=1000)
    h.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = linear_cross_entropy(h, w, b, labels, chunk_tokens=8)
    assert saved and all(1000 not in shape for shape in saved), saved
    loss.backward()


# --- a low-rank head delta (QST's head_rank): logits + (h down^T) up^T ---------------------------------------


def delta_case(dtype=torch.float32, hidden=16, vocab=50, rank=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, hidden, generator=g, dtype=dtype) / hidden**0.5,
            torch.randn(vocab, rank, generator=g, dtype=dtype))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_a_head_delta_gives_the_reference_loss_and_gradients(chunk):
    h, w, b, labels = case()
    delta = delta_case()
    ours = [t.clone().requires_grad_() for t in (h, *delta)]
    ref = [t.clone().requires_grad_() for t in (h, *delta)]
    got = linear_cross_entropy(ours[0], w, b, labels, chunk_tokens=chunk, delta=(ours[1], ours[2]))
    want = linear_cross_entropy_reference(ref[0], w, b, labels, delta=(ref[1], ref[2]))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, linear_cross_entropy_reference(h, w, b, labels))  # the delta counts
    got.backward()
    want.backward()
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


def test_gradcheck_float64_with_a_head_delta():
    h, w, b, labels = case(torch.float64, batch=2, seq=5, hidden=6, vocab=11)
    down, up = delta_case(torch.float64, hidden=6, vocab=11, rank=2)
    inputs = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), down.requires_grad_(), up.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda hh, ww, bb, dd, uu: linear_cross_entropy(hh, ww, bb, labels, chunk_tokens=3, delta=(dd, uu)), inputs)


def test_a_float32_delta_over_a_bf16_head_is_the_fp32_logits_reference():
    h, w, b, labels = case(torch.bfloat16)
    down, up = (t.requires_grad_() for t in delta_case())
    got = linear_cross_entropy(h, w, b, labels, chunk_tokens=4, delta=(down, up))
    want = linear_cross_entropy_reference(h, w, b, labels, delta=(down, up))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    got.backward()
    assert down.grad.dtype == torch.float32 and up.grad.abs().sum() > 0


def test_under_autocast_the_delta_stays_float32_and_the_head_runs_in_bf16():
    # torch.autocast (a float32 model trained in mixed precision, the HF Trainer's bf16=True) runs the head's
    # product in bf16; the delta's products are the float32 ones of the reference, not autocast's bf16
    h, w, b, labels = case()
    down, up = (t.requires_grad_() for t in delta_case())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, b, labels, chunk_tokens=4, delta=(down, up))
    got.backward()
    grads = down.grad.clone(), up.grad.clone()
    down.grad = up.grad = None
    bf16_head = linear_cross_entropy_reference(h.bfloat16(), w.bfloat16(), b.bfloat16(), labels, delta=(down, up))
    torch.testing.assert_close(got, bf16_head, rtol=1e-3, atol=1e-3)  # the reference with the head in bf16
    bf16_head.backward()
    for a, r in zip(grads, (down.grad, up.grad), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-3)


def test_the_delta_module_starts_at_zero_and_keeps_the_inputs_dtype():
    from qgraph.loss import LowRankHeadDelta

    delta = LowRankHeadDelta(width=16, vocab=50, rank=4)
    h = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    out = delta(h)
    assert out.shape == (2, 3, 50) and out.dtype == torch.bfloat16 and not out.any()
    assert delta.down.dtype == delta.up.dtype == torch.float32
