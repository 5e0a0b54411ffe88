"""qgraph::round_scale: the nearest fp16 (bf16) value forward, the gradient straight through."""

import pytest
import torch

from qgraph.ops.lrqat import lrqat_linear, lrqat_linear_reference, phi0_from_weight
from qgraph.ops.round_scale import round_scale
from qgraph.quant.uniform import init_scale

OUT, IN, RANK = 16, 32, 4


def scales(shape=(OUT, 1), seed=0, dtype=torch.float32):
    """Typical LR-QAT scales (~0.01), drawn so that almost none is exact in fp16."""
    generator = torch.Generator().manual_seed(seed)
    return 0.01 + 0.05 * torch.rand(shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize(("name", "narrow"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_forward_is_the_nearest_value_of_the_format(name, narrow):
    s = scales()
    rounded = round_scale(s, name)
    assert rounded.dtype == torch.float32 and rounded.shape == s.shape
    assert torch.equal(rounded, s.to(narrow).float())
    assert torch.equal(rounded.to(narrow).float(), rounded)  # exact in the format
    assert not torch.equal(rounded, s)  # and it did round (the check above could not fail otherwise)
    # nearest: no other value of the format is closer than half a step of it
    assert ((rounded - s).abs() <= rounded.abs() * torch.finfo(narrow).eps / 2).all()


def test_output_is_a_new_tensor_even_when_nothing_rounds():
    s = scales()
    out = round_scale(s, "float32")
    assert torch.equal(out, s) and out.data_ptr() != s.data_ptr()


def test_gradient_passes_straight_through():
    s = scales().requires_grad_()
    grad_out = torch.randn(OUT, 1)
    round_scale(s, "float16").backward(grad_out)
    assert torch.equal(s.grad, grad_out)


def test_gradcheck_float64():
    # rounding float64 to float64 is the identity, whose true derivative is the straight-through one: gradcheck
    # then verifies the autograd formula (rounding to fp16 has derivative 0 almost everywhere)
    s = scales(dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: round_scale(t, "float64"), (s,))


def test_opcheck():
    torch.library.opcheck(round_scale, (scales().requires_grad_(), "float16"))
    torch.library.opcheck(round_scale, (scales((OUT, 4)), "bfloat16"))


def test_fake_kernel_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = round_scale(torch.empty(OUT, 4), "float16")
    assert out.shape == (OUT, 4) and out.dtype == torch.float32


def test_bad_arguments_name_the_valid_ones():
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32, float64, got 'half'"):
        round_scale(scales(), "half")
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        round_scale(torch.ones(OUT, 1, dtype=torch.int32), "float16")


@pytest.mark.parametrize("group_size", [-1, 8])
def test_through_lrqat_linear_ds_is_the_unrounded_formula_at_the_rounded_scale(group_size):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(OUT, IN, generator=generator)
    s0 = init_scale(weight, 4, group_size)
    layer = dict(phi0=phi0_from_weight(weight, s0, 4, group_size, "fixed"),
                 lora_a=0.1 * torch.randn(OUT, RANK, generator=generator),
                 lora_b=torch.randn(RANK, IN, generator=generator))
    x = torch.randn(3, IN, generator=generator)
    grad_out = torch.randn(3, OUT, generator=generator)
    master = (s0 * (1 + 1e-3 * torch.rand(s0.shape, generator=generator))).requires_grad_()
    assert not torch.equal(master.half().float(), master)
    rounded = master.detach().half().float().requires_grad_()
    args = (None, 4, group_size, 1 / RANK, "fixed")

    y = lrqat_linear(x, *layer.values(), round_scale(master, "float16"), *args)
    y.backward(grad_out)
    y_at_rounded = lrqat_linear(x, *layer.values(), rounded, *args)
    y_at_rounded.backward(grad_out)
    assert torch.equal(y, y_at_rounded) and torch.equal(master.grad, rounded.grad)
    # and that is autograd's gradient of the plain-PyTorch layer at the rounded scale
    reference = rounded.detach().requires_grad_()
    lrqat_linear_reference(x, *layer.values(), reference, *args).backward(grad_out)
    torch.testing.assert_close(master.grad, reference.grad, rtol=1e-5, atol=1e-6)
