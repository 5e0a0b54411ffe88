import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from qgraph.ops.fused_inference import fused_inference
from qgraph.ops.nf4 import (
    NF4Weight,
    cpu_inference_kernel_available,
    decode_nf4,
    dequantize_nf4,
    nf4_linear,
    nf4_linear_from,
    nf4_linear_reference,
    quantize_nf4,
    uses_inference_kernel,
)

OP = torch.ops.qgraph.nf4_linear.default
# half the widest gap between neighbouring NF4 levels (-1 and -0.6962): the worst rounding error per absmax
NF4_MAX_ERROR = (1 - 0.6961928009986877) / 2 + 1e-6


def weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def decode(q: NF4Weight) -> torch.Tensor:
    return decode_nf4(q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset,
                      *q.shape, q.blocksize, q.nested_blocksize)


def op_args(x, q: NF4Weight, bias=None) -> tuple:
    return (x, q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset, bias,
            q.shape[0], q.shape[1], q.blocksize, q.nested_blocksize)


# --- storage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_layout(double_quant):
    q = quantize_nf4(weight(96, 128), 64, double_quant)
    assert q.shape == (96, 128) and q.blocksize == 64
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (96 * 128 // 2, 1)
    assert q.code.shape == (16,) and q.code.dtype == torch.float32
    assert q.absmax.numel() == 96 * 128 // 64
    if double_quant:
        assert q.absmax.dtype == torch.uint8
        assert q.nested_blocksize == 256 and q.nested_absmax.numel() == 1 and q.nested_code.numel() == 256
        assert q.offset.shape == ()
    else:
        assert q.absmax.dtype == torch.float32
        assert q.nested_absmax is None and q.nested_code is None and q.offset is None and q.nested_blocksize == 0


def test_weight_memory_is_half_a_byte_per_parameter_plus_constants():
    n = 256 * 256
    q = quantize_nf4(weight(256, 256), 64, double_quant=True)
    # packed codes + uint8 absmax per 64 + fp32 nested absmax per 256 absmaxes + two code books + offset
    assert q.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 16 + 4 * 256 + 4
    assert q.nbytes() / n < 0.6
    plain = quantize_nf4(weight(256, 256), 64, double_quant=False)
    assert plain.nbytes() == n // 2 + 4 * n // 64 + 4 * 16
    assert q.nbytes() < plain.nbytes()


# --- the reference decode -------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "blocksize"), [((64, 64), 64), ((128, 256), 64), ((128, 256), 128),
                                                   ((32, 192), 64), ((3, 320), 64), ((16, 512), 256)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_decode_equals_bitsandbytes_dequantize(shape, blocksize, double_quant):
    """Where in_features % blocksize == 0 (bitsandbytes' CPU kernel is only right there)."""
    w = weight(*shape)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    q = quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(q.packed, packed)
    assert torch.equal(decode(q), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(40, 48), (8, 100), (64, 64), (7, 129)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_decode_error_is_within_half_an_nf4_step(shape, blocksize):
    """Blocks run over the flattened weight, straddling rows where in_features % blocksize != 0."""
    w = weight(*shape, seed=1)
    q = quantize_nf4(w, blocksize, double_quant=False)
    flat = w.flatten()
    padded = F.pad(flat, (0, -flat.numel() % blocksize))
    absmax = padded.reshape(-1, blocksize).abs().amax(1)
    assert torch.equal(q.absmax, absmax)
    error = (decode(q).flatten() - flat).abs() / absmax.repeat_interleave(blocksize)[: flat.numel()]
    assert error.max() <= NF4_MAX_ERROR
    top = flat.abs().argmax()
    assert decode(q).flatten()[top] == flat[top]  # a block's absmax element decodes exactly (level +-1)


def test_dequantize_falls_back_to_the_exact_decode_where_bitsandbytes_is_wrong():
    q = quantize_nf4(weight(40, 48), 64, double_quant=True)
    args = (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset, *q.shape, q.blocksize,
            q.nested_blocksize)
    assert torch.equal(dequantize_nf4(*args), decode(q))


# --- the op against its reference -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 48), (64, 64), (96, 128), (24, 200)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_lead", [(5,), (2, 3), (2, 1, 4)])
def test_op_equals_reference(shape, double_quant, with_bias, x_lead):
    out_features, in_features = shape
    q = quantize_nf4(weight(*shape), 64, double_quant)
    bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(*x_lead, in_features)
    y = nf4_linear_from(x, q, bias)
    assert y.shape == (*x_lead, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y, nf4_linear_reference(x, q, bias), rtol=0, atol=1e-6)
    torch.testing.assert_close(y, F.linear(x, decode(q), bias), rtol=0, atol=1e-6)


def test_op_is_the_registered_custom_op():
    q = quantize_nf4(weight(16, 64))
    x = torch.randn(3, 64)
    assert torch.equal(OP(*op_args(x, q)), nf4_linear(*op_args(x, q)))
    assert torch.equal(OP(*op_args(x, q)), nf4_linear_from(x, q))


def test_bf16_activations():
    q = quantize_nf4(weight(32, 64))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    bias = torch.randn(32)
    y = nf4_linear_from(x, q, bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, decode(q).bfloat16(), bias.bfloat16()))


def test_bf16_input_gradient_equals_reference():
    q = quantize_nf4(weight(32, 64))
    x = torch.randn(2, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    nf4_linear_from(x, q).sum().backward()
    F.linear(reference, decode(q).bfloat16()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, reference.grad)


# --- autograd -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 48), (64, 128)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_input_and_bias_gradients_match_reference_autograd(shape, double_quant):
    q = quantize_nf4(weight(*shape), 64, double_quant)
    x = torch.randn(2, 3, shape[1], requires_grad=True)
    bias = torch.randn(shape[0], requires_grad=True)
    grad_out = torch.randn(2, 3, shape[0])
    nf4_linear_from(x, q, bias).backward(grad_out)
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    nf4_linear_reference(x_ref, q, bias_ref).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=0, atol=1e-6)


def test_only_bias_needs_grad():
    q = quantize_nf4(weight(16, 64))
    bias = torch.zeros(16, requires_grad=True)
    nf4_linear_from(torch.randn(5, 64), q, bias).sum().backward()
    assert torch.equal(bias.grad, torch.full((16,), 5.0))


def test_gradcheck_float64():
    """The weight is quantized from float32; the op casts the decoded weight to x's dtype."""
    q = quantize_nf4(weight(40, 48), 64, double_quant=True)
    assert q.code.dtype == torch.float32
    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert nf4_linear_from(x, q, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x, b: nf4_linear_from(x, q, b), (x, bias))


def test_gradcheck_float64_with_batch_dims():
    q = quantize_nf4(weight(8, 64), 64, double_quant=False)
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nf4_linear_from(x, q), (x,), fast_mode=True)


def test_backward_saves_no_dequantized_weight():
    q = quantize_nf4(weight(64, 64))
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nf4_linear_from(x, q)
    assert all(t.numel() < 64 * 64 for t in saved)
    assert not any(t.dtype.is_floating_point and t.shape == (64, 64) for t in saved)


# --- fake kernel, opcheck -------------------------------------------------------------------------------


def test_fake_kernel_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = quantize_nf4(weight(40, 48))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 7, 48, dtype=torch.bfloat16))
        y = OP(*op_args(x, q))
    assert y.shape == (2, 7, 40) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(double_quant, with_bias):
    q = quantize_nf4(weight(40, 48), 64, double_quant)
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    x = torch.randn(3, 48, requires_grad=True)
    torch.library.opcheck(OP, op_args(x, q, bias))


# --- bitsandbytes' CPU inference kernel (what generate runs) ------------------------------------------------


def bitsandbytes_linear(w: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """bitsandbytes' own NF4 layer of the same weight (double quantization, blocks of 64), in training mode
    as a new module is: bitsandbytes runs its fused CPU kernel only in eval mode."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer.to("cpu")  # .to() quantizes


@pytest.mark.parametrize("x_lead", [(1, 1), (1, 7), (3, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_inference_kernel_equals_bitsandbytes_linear4bit_in_eval(x_lead, with_bias):
    # on a CPU without AVX512-BF16 both sides decode to float32: still equal
    w, bias = weight(96, 128), (torch.randn(96) if with_bias else None)
    q, x = quantize_nf4(w), torch.randn(*x_lead, 128)
    with torch.no_grad():
        theirs = bitsandbytes_linear(w, bias).eval()(x)  # eval: the peer generation is compared with
        with fused_inference():
            ours = OP(*op_args(x, q, bias))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not cpu_inference_kernel_available(), reason="bitsandbytes' CPU kernel needs AVX512-BF16")
def test_inference_kernel_is_within_bf16_rounding_of_the_float32_decode():
    q, x = quantize_nf4(weight(96, 128)), torch.randn(4, 128)
    exact = nf4_linear_reference(x, q)
    with torch.no_grad(), fused_inference():
        assert uses_inference_kernel(x, None, 96, 128, 64)
        fast = OP(*op_args(x, q))
    assert not torch.equal(fast, exact)  # it is the kernel, not the float32 decode
    # activations and absmaxes rounded to bf16 (8 bits): a few 2^-8 of the outputs' scale
    torch.testing.assert_close(fast, exact, rtol=0, atol=4 * 2**-8 * exact.abs().max().item())


def test_the_kernel_runs_only_without_gradient_and_inside_the_context():
    q = quantize_nf4(weight(96, 128))
    x = torch.randn(4, 128, requires_grad=True)
    exact = OP(*op_args(x, q))
    with fused_inference():
        assert not uses_inference_kernel(x, None, 96, 128, 64)  # gradient enabled: training's float32 decode
        assert torch.equal(OP(*op_args(x, q)), exact)
    with torch.no_grad():
        x = x.detach()
        assert not uses_inference_kernel(x, None, 96, 128, 64)  # outside the context
        with fused_inference(enabled=False):
            assert not uses_inference_kernel(x, None, 96, 128, 64)
            assert torch.equal(OP(*op_args(x, q)), exact)


@pytest.mark.parametrize(("shape", "blocksize"), [((40, 128), 64), ((96, 100), 64), ((64, 96), 64)])
def test_weights_the_kernel_layout_does_not_take_decode_in_float32(shape, blocksize):
    # rows not in tiles of 32, or a block across two rows: the exact decode, as in training
    q, x = quantize_nf4(weight(*shape), blocksize), torch.randn(3, shape[1])
    with torch.no_grad(), fused_inference():
        assert not uses_inference_kernel(x, None, *shape, blocksize)
        assert torch.equal(OP(*op_args(x, q)), nf4_linear_reference(x, q))


def test_the_kernel_layout_follows_a_weight_changed_in_place():
    first, second = quantize_nf4(weight(96, 128, seed=1)), quantize_nf4(weight(96, 128, seed=2))
    x = torch.randn(2, 128)
    with torch.no_grad(), fused_inference():
        OP(*op_args(x, first))  # makes and keeps the layout of first's tensors
        for name in ("packed", "absmax", "nested_absmax", "offset"):
            getattr(first, name).copy_(getattr(second, name))  # as load_state_dict does
        assert torch.equal(OP(*op_args(x, first)), OP(*op_args(x, second)))


def test_opcheck_inside_the_inference_context():
    q = quantize_nf4(weight(96, 128))
    with fused_inference():
        torch.library.opcheck(OP, op_args(torch.randn(3, 128), q, torch.randn(96)))
