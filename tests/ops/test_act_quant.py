"""qgraph::fake_quant_act_int8_per_token against torch's quantized_decomposed ops (bit for bit) and its
straight-through gradient."""

from __future__ import annotations

import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

from qgraph.ops.act_quant import (QMAX, QMIN, fake_quant_act_int8_per_token, fake_quant_per_token_reference,
                                  in_range_mask, per_token_qparams)

quantized_decomposed = torch.ops.quantized_decomposed


def runtime_round_trip(x: torch.Tensor) -> torch.Tensor:
    """What ExecuTorch's 8da4w pattern computes on a linear's input: torch's own ops, called directly."""
    scale, zero_point = quantized_decomposed.choose_qparams_per_token_asymmetric(x, torch.int8)
    q = quantized_decomposed.quantize_per_token(x, scale, zero_point, QMIN, QMAX, torch.int8)
    return quantized_decomposed.dequantize_per_token(q, scale, zero_point, QMIN, QMAX, torch.int8, x.dtype)


def activations(kind: str, dtype: torch.dtype) -> torch.Tensor:
    # a seed of its own per kind, the same in every process (str hashes are salted per process)
    generator = torch.Generator().manual_seed(KINDS.index(kind))
    x = torch.randn(3, 5, 48, generator=generator)
    x = {"normal": x, "large": x * 1e4, "tiny": x * 1e-6, "positive": x.abs() + 0.5,
         "negative": -x.abs() - 0.5, "shifted": x + 3.0, "outlier": x.index_put_((torch.tensor(0), torch.tensor(1),
                                                                                  torch.tensor(7)), torch.tensor(80.0)),
         "constant": torch.full_like(x, 0.25), "zeros": torch.zeros_like(x)}[kind]
    return x.to(dtype)


KINDS = ["normal", "large", "tiny", "positive", "negative", "shifted", "outlier", "constant", "zeros"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_op_is_bitwise_the_decomposed_round_trip(kind, dtype):
    x = activations(kind, dtype)
    want = runtime_round_trip(x)
    # bit for bit, NaN where torch's ops give NaN too (a float16 row whose range overflows float16)
    torch.testing.assert_close(fake_quant_act_int8_per_token(x), want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fake_quant_per_token_reference(x), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qparams_are_choose_qparams_per_token_asymmetric(dtype):
    x = activations("shifted", dtype)
    scale, zero_point = per_token_qparams(x)
    want_scale, want_zero_point = quantized_decomposed.choose_qparams_per_token_asymmetric(x, torch.int8)
    assert scale.dtype == torch.float64 and zero_point.dtype == torch.int64
    assert torch.equal(scale, want_scale) and torch.equal(zero_point, want_zero_point)


def test_round_trip_quantizes_each_token_to_at_most_256_levels():
    x = activations("normal", torch.float32)
    y = fake_quant_act_int8_per_token(x)
    assert not torch.equal(y, x)  # it does round
    for token in y.reshape(-1, y.shape[-1]):
        assert token.unique().numel() <= 256
    # error at most half a step of that token's grid
    scale, _ = per_token_qparams(x)
    assert bool(((y - x).abs().double() <= scale / 2 + 1e-7).all())


def test_fake_kernel_and_registration():
    torch.library.opcheck(torch.ops.qgraph.fake_quant_act_int8_per_token.default, (torch.randn(2, 3, 16),))


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="floating-point"):
        fake_quant_act_int8_per_token(torch.ones(2, 4, dtype=torch.int64))


# --- the straight-through gradient ---------------------------------------------------------------------------


def ste_surrogate(x: torch.Tensor) -> torch.Tensor:
    """A differentiable function whose derivative is the op's straight-through estimator (torchao's QAT:
    round passes the gradient, the clamp stops it, qparams constant): x clamped to the range whose codes
    round into [qmin, qmax], [(qmin - 1/2 - zp) s, (qmax + 1/2 - zp) s], qparams taken from x without
    gradient. (Each token's min and max lie strictly inside, where the clamp is differentiable.)"""
    scale, zero_point = per_token_qparams(x.detach())
    low, high = (QMIN - 0.5 - zero_point) * scale, (QMAX + 0.5 - zero_point) * scale
    return torch.maximum(torch.minimum(x, high.to(x.dtype)), low.to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_the_in_range_mask_times_the_gradient(dtype):
    x = activations("normal", dtype).requires_grad_()
    grad_out = torch.randn_like(x)
    fake_quant_act_int8_per_token(x).backward(grad_out)
    assert torch.equal(x.grad, grad_out * in_range_mask(x.detach()))
    if dtype == torch.float32:  # the range covers each token's min and max: everything passes
        assert torch.equal(x.grad, grad_out)
    else:  # in bf16 a token's extreme can land one code past the grid, where the clamp does cut it
        assert x.grad.dtype == torch.bfloat16 and (x.grad == grad_out).float().mean() > 0.99


def test_gradcheck_float64_against_the_ste_surrogate():
    # the op's true derivative is 0 almost everywhere (rounding), so gradcheck checks the surrogate whose
    # derivative the STE is, and the op's Jacobian (through its registered backward) must equal that one
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(ste_surrogate, (x,), eps=1e-7, atol=1e-6)
    op_jacobian = torch.autograd.functional.jacobian(fake_quant_act_int8_per_token, x)
    surrogate_jacobian = torch.autograd.functional.jacobian(ste_surrogate, x)
    assert torch.equal(op_jacobian, surrogate_jacobian)
    assert torch.equal(op_jacobian.reshape(x.numel(), x.numel()), torch.eye(x.numel(), dtype=torch.float64))

