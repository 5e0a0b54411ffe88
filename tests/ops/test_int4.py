import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from qgraph.ops.fused_inference import fused_inference
from qgraph.ops.int4 import fold_lrqat_weight, int4_linear, packed_mm_group
from qgraph.ops.lrqat import lrqat_linear, phi0_from_weight
from qgraph.quant.downcast import PHI_FORMATS, pack_codes, unpack_codes
from qgraph.quant.uniform import dequantize, init_scale, quantize_to_codes

OUT, IN, RANK, LORA_SCALE = 16, 32, 4, 0.25


def trained_layer(fmt, bits, group_size, dtype=torch.float32, seed=0):
    """lrqat_linear arguments after "training": random A and B, a scale moved away from s0."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    weight = randn(OUT, IN)
    scale0 = init_scale(weight, bits, group_size)
    return dict(
        phi0=phi0_from_weight(weight, scale0, bits, group_size, fmt),
        lora_a=randn(OUT, RANK),
        lora_b=randn(RANK, IN),
        scale=scale0 * (1 + 0.1 * torch.rand(scale0.shape, generator=generator, dtype=dtype)),
        bits=bits,
        group_size=group_size,
        lora_scale=LORA_SCALE,
        phi_format=fmt,
    )


def deployed_args(layer):
    codes, scale = fold_lrqat_weight(**layer)
    return codes, scale, layer["bits"], layer["group_size"]


@pytest.mark.parametrize("fmt", PHI_FORMATS)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_folded_output_is_bitwise_the_trained_output(fmt, bits, group_size, x_dtype):
    layer = trained_layer(fmt, bits, group_size)
    x, bias = torch.randn(2, 3, IN, dtype=x_dtype), torch.randn(OUT, dtype=x_dtype)
    codes, scale, bits, group_size = deployed_args(layer)
    trained = lrqat_linear(x, layer["phi0"], layer["lora_a"], layer["lora_b"], layer["scale"], bias,
                           bits, group_size, LORA_SCALE, fmt)
    assert torch.equal(int4_linear(x, codes, scale, bias, bits, group_size, IN), trained)


@pytest.mark.parametrize(("bits", "dtype", "shape"), [(3, torch.uint8, (OUT, IN // 2)),
                                                      (4, torch.uint8, (OUT, IN // 2)),
                                                      (8, torch.int8, (OUT, IN))])
def test_folded_codes_layout(bits, dtype, shape):
    codes, scale, _, _ = deployed_args(trained_layer("fixed", bits, 8))
    assert codes.dtype == dtype and codes.shape == shape
    assert scale.shape == (OUT, IN // 8) and not scale.requires_grad


def test_fold_at_step_zero_gives_rtn_codes():
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN)
    scale0 = init_scale(weight, 4, 8)
    layer = dict(phi0=phi0_from_weight(weight, scale0, 4, 8, "int-packed"), lora_a=torch.zeros(OUT, RANK),
                 lora_b=torch.randn(RANK, IN), scale=scale0, bits=4, group_size=8, lora_scale=LORA_SCALE,
                 phi_format="int-packed")
    codes, _, _, _ = deployed_args(layer)
    assert torch.equal(unpack_codes(codes, 4, IN), quantize_to_codes(weight, scale0, 4, 8))


@pytest.mark.parametrize("bits", [4, 6])
def test_gradcheck_input_and_bias(bits):
    generator = torch.Generator().manual_seed(0)
    codes = pack_codes(torch.randint(-8, 8, (OUT, IN), generator=generator, dtype=torch.int8), bits)
    scale = torch.rand(OUT, 4, generator=generator, dtype=torch.float64) + 0.1
    x = torch.randn(2, 3, IN, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(int4_linear, (x, codes, scale, bias, bits, 8, IN))


@pytest.mark.parametrize("group_size", [-1, 8])
def test_bf16_input_and_bias_gradients_equal_the_reference(group_size):
    codes, scale, bits, group_size = deployed_args(trained_layer("fixed", 4, group_size))
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(OUT, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(2, 3, OUT, dtype=torch.bfloat16)
    int4_linear(x, codes, scale, bias, bits, group_size, IN).backward(grad_out)
    weight = dequantize(unpack_codes(codes, bits, IN).float(), scale, group_size)
    x_ref, bias_ref = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    F.linear(x_ref, weight.double(), bias_ref).backward(grad_out.double())
    assert x.grad.dtype == bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bias.grad.double(), bias_ref.grad, rtol=2e-2, atol=2e-2)


def test_trainable_scale_is_refused():
    codes, scale, bits, group_size = deployed_args(trained_layer("fixed", 4, 8))
    with pytest.raises(ValueError, match="frozen"):
        int4_linear(torch.randn(2, IN), codes, scale.requires_grad_(), None, bits, group_size, IN)


def test_fake_kernel_shape_and_dtype():
    with FakeTensorMode():
        x = torch.empty(7, 5, IN, dtype=torch.bfloat16)
        codes = torch.empty(OUT, IN // 2, dtype=torch.uint8)
        y = int4_linear(x, codes, torch.empty(OUT, 1), None, 4, -1, IN)
    assert y.shape == (7, 5, OUT) and y.dtype == torch.bfloat16


def test_opcheck():
    codes, scale, bits, group_size = deployed_args(trained_layer("fixed", 4, 8))
    x = torch.randn(3, IN, requires_grad=True)
    bias = torch.randn(OUT, requires_grad=True)
    torch.library.opcheck(int4_linear, (x, codes, scale, bias, bits, group_size, IN))


# --- torch's int4 packed matmul inside fused_inference() (generation) ---------------------------------------


def packed_case(group_size: int, out_features: int = 96, in_features: int = 128, seed: int = 0):
    """(codes, scale) of a 4-bit layer: random codes in [-8, 7] and positive scales."""
    generator = torch.Generator().manual_seed(seed)
    w_int = torch.randint(-8, 8, (out_features, in_features), generator=generator, dtype=torch.int8)
    groups = 1 if group_size <= 0 else in_features // group_size
    scale = torch.rand(out_features, groups, generator=generator) * 0.01 + 1e-3
    return pack_codes(w_int, 4), scale


@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("x_lead", [(1, 1), (2, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_kernel_is_within_bf16_rounding_of_the_exact_op(group_size, x_lead, with_bias):
    codes, scale = packed_case(group_size)
    x, bias = torch.randn(*x_lead, 128), (torch.randn(96) if with_bias else None)
    exact = int4_linear(x, codes, scale, bias, 4, group_size, 128)
    with torch.no_grad(), fused_inference():
        assert packed_mm_group(codes, scale, 4, 128) is not None
        fast = int4_linear(x, codes, scale, bias, 4, group_size, 128)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # it is the packed kernel, not the float32 unpack
    # activations, scales and outputs in bf16 (8 bits): a few 2^-8 of the outputs' scale
    torch.testing.assert_close(fast, exact, rtol=0, atol=4 * 2**-8 * exact.abs().max().item())


@pytest.mark.parametrize(("out_features", "in_features", "group_size", "bits"),
                         [(40, 128, -1, 4), (96, 128, 16, 4), (96, 48, -1, 4), (96, 128, -1, 8)])
def test_weights_the_packed_kernel_cannot_take_run_the_exact_op(out_features, in_features, group_size, bits):
    # rows not in tiles of 16, a group it does not take, no 32-column groups, 8-bit codes
    generator = torch.Generator().manual_seed(1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    w_int = torch.randint(low, high, (out_features, in_features), generator=generator, dtype=torch.int8)
    codes = pack_codes(w_int, bits)
    groups = 1 if group_size <= 0 else in_features // group_size
    scale = torch.rand(out_features, groups, generator=generator) + 0.1
    x = torch.randn(3, in_features)
    exact = int4_linear(x, codes, scale, None, bits, group_size, in_features)
    with torch.no_grad(), fused_inference():
        assert packed_mm_group(codes, scale, bits, in_features) is None
        assert torch.equal(int4_linear(x, codes, scale, None, bits, group_size, in_features), exact)


def test_the_packed_kernel_runs_only_without_gradient_and_follows_an_edited_weight():
    codes, scale = packed_case(-1, seed=1)
    other_codes, other_scale = packed_case(-1, seed=2)
    x = torch.randn(2, 128, requires_grad=True)
    exact = int4_linear(x.detach(), codes, scale, None, 4, -1, 128)
    with fused_inference():  # a gradient wanted: the exact op
        assert torch.equal(int4_linear(x, codes, scale, None, 4, -1, 128), exact)
    with torch.no_grad(), fused_inference():
        int4_linear(x.detach(), codes, scale, None, 4, -1, 128)  # makes and keeps codes' layout
        codes.copy_(other_codes)
        scale.copy_(other_scale)
        assert torch.equal(int4_linear(x.detach(), codes, scale, None, 4, -1, 128),
                           int4_linear(x.detach(), other_codes, other_scale, None, 4, -1, 128))


def test_opcheck_inside_fused_inference():
    codes, scale = packed_case(32)
    with fused_inference():
        torch.library.opcheck(int4_linear, (torch.randn(3, 128), codes, scale, torch.randn(96), 4, 32, 128))
