import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from qgraph.compile import compile_module
from qgraph.ops.lrqat import (
    lrqat_linear,
    lrqat_linear_backward,
    lrqat_linear_compiled,
    lrqat_linear_forward,
    lrqat_linear_reference,
    phi0_from_weight,
    in_range_mask,
    rebuild_weight,
    rebuild_weight_and_saturated_rows,
    rounded_grid_values,
    scaled_linear,
)
from qgraph.quant.downcast import PHI_FORMATS
from qgraph.quant.uniform import fake_quantize, grid_bounds, init_scale, quantize_to_codes

OUT, IN, RANK, LORA_SCALE = 16, 32, 4, 0.25
FORMATS_BITS_GROUPS = [
    (fmt, bits, group_size) for fmt in PHI_FORMATS for bits in (3, 4) for group_size in (-1, 8)
]


def make_layer(fmt, bits, group_size, *, lora_a_std=2.0, interior=False, dtype=torch.float64, seed=0):
    """Keyword arguments of one lrqat_linear call, with A, B, s, bias and x requiring grad.

    `interior` draws W0 / s0 and a small A so that Z stays well inside the grid (no clamping).
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    weight = randn(OUT, IN)
    scale0 = init_scale(weight, bits, group_size)
    if interior:
        qmin, qmax = grid_bounds(bits)
        units = torch.rand(OUT, IN, generator=generator, dtype=dtype) * (qmax - qmin - 2) + qmin + 1
        weight = units * scale0.repeat_interleave(IN // scale0.shape[1], dim=1)
        lora_a_std = 0.05
    return dict(
        x=randn(2, 3, IN).requires_grad_(),
        phi0=phi0_from_weight(weight, scale0, bits, group_size, fmt),
        lora_a=(randn(OUT, RANK) * lora_a_std).requires_grad_(),
        lora_b=randn(RANK, IN).requires_grad_(),
        scale=(scale0 * (1 + 0.1 * torch.rand(scale0.shape, generator=generator, dtype=dtype)))
        .requires_grad_(),
        bias=randn(OUT).requires_grad_(),
        bits=bits,
        group_size=group_size,
        lora_scale=LORA_SCALE,
        phi_format=fmt,
    )


def positional(layer):
    return tuple(layer.values())


TRAINABLE = ("x", "lora_a", "lora_b", "scale", "bias")


def identity(t):
    return t


class StraightThroughSurrogate(torch.autograd.Function):
    """lrqat_linear's forward and backward formulas with the round replaced by the identity.

    Round's straight-through gradient is then the true derivative, so gradcheck can verify the
    formulas for A and B (the registered op wires the same two functions with torch.round).
    """

    @staticmethod
    def forward(ctx, x, phi0, lora_a, lora_b, scale, bias, bits, group_size, lora_scale, phi_format):
        y = lrqat_linear_forward(
            x, phi0, lora_a, lora_b, scale, bias, bits, group_size, lora_scale, phi_format, identity
        )
        ctx.save_for_backward(x, y, phi0, lora_a, lora_b, scale, bias)
        ctx.quant_args = (bits, group_size, lora_scale, phi_format)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad
        grads = lrqat_linear_backward(
            grad_out, *ctx.saved_tensors, *ctx.quant_args, (needs[0], needs[2], needs[3], needs[4], needs[5]), identity,
        )
        grad_x, grad_a, grad_b, grad_scale, grad_bias = grads
        return grad_x, None, grad_a, grad_b, grad_scale, grad_bias, None, None, None, None


def in_range(layer, round_fn=torch.round):
    """M, the whole in-range mask of a layer."""
    z = rounded_grid_values(layer["phi0"], layer["lora_a"], layer["lora_b"], layer["bits"], LORA_SCALE,
                            layer["phi_format"], layer["scale"].dtype, round_fn)
    return in_range_mask(z, layer["bits"])


@pytest.mark.parametrize(("fmt", "bits", "group_size"), FORMATS_BITS_GROUPS)
def test_forward_equals_reference(fmt, bits, group_size):
    layer = make_layer(fmt, bits, group_size)
    assert torch.equal(lrqat_linear(**layer), lrqat_linear_reference(**layer))


@pytest.mark.parametrize("x_shape", [(IN,), (5, IN), (2, 3, IN), (2, 1, 3, IN)])
def test_batch_dims(x_shape):
    layer = make_layer("fixed", 4, 8)
    layer["x"] = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    y = lrqat_linear(**layer)
    assert y.shape == (*x_shape[:-1], OUT)
    assert torch.equal(y, lrqat_linear_reference(**layer))
    y.sum().backward()
    assert layer["x"].grad.shape == x_shape and layer["lora_b"].grad.shape == (RANK, IN)


def test_bf16_activations_with_float32_parameters():
    layer = make_layer("fixed", 4, 8, dtype=torch.float32)
    layer["x"] = layer["x"].detach().to(torch.bfloat16).requires_grad_()
    layer["bias"] = None
    y = lrqat_linear(**layer)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, lrqat_linear_reference(**layer))
    y.float().sum().backward()
    assert layer["x"].grad.dtype == torch.bfloat16 and layer["lora_a"].grad.dtype == torch.float32


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fake_kernel_shape_and_dtype(x_dtype):
    with FakeTensorMode():
        x = torch.empty(7, 5, IN, dtype=x_dtype)
        phi0 = torch.empty(OUT, IN // 2, dtype=torch.uint8)
        y = lrqat_linear(x, phi0, torch.empty(OUT, RANK), torch.empty(RANK, IN), torch.empty(OUT, 4),
                         None, 4, 8, LORA_SCALE, "int-packed")
    assert y.shape == (7, 5, OUT) and y.dtype == x_dtype


def test_opcheck():
    layer = make_layer("int-packed", 4, 8, dtype=torch.float32)
    torch.library.opcheck(lrqat_linear, positional(layer))


@pytest.mark.parametrize(("fmt", "bits", "group_size"), FORMATS_BITS_GROUPS)
def test_gradcheck_x_scale_bias(fmt, bits, group_size):
    # W_int does not depend on x, s or bias: these derivatives are exact even with real rounding.
    layer = make_layer(fmt, bits, group_size)
    layer["lora_a"].requires_grad_(False)
    layer["lora_b"].requires_grad_(False)
    assert torch.autograd.gradcheck(lrqat_linear, positional(layer))


@pytest.mark.parametrize("interior", [True, False], ids=["interior", "saturated"])
@pytest.mark.parametrize(("fmt", "bits", "group_size"), FORMATS_BITS_GROUPS)
def test_gradcheck_straight_through_formulas(fmt, bits, group_size, interior):
    layer = make_layer(fmt, bits, group_size, interior=interior)
    mask = in_range(layer, identity)
    # "saturated": the clamp cuts some entries, so the correction for M = 0 is what gradcheck checks
    assert mask.all() if interior else 0 < mask.sum() < mask.numel()
    assert torch.autograd.gradcheck(StraightThroughSurrogate.apply, positional(layer))


@pytest.mark.parametrize(("fmt", "bits", "group_size"), FORMATS_BITS_GROUPS)
def test_gradients_equal_reference_autograd(fmt, bits, group_size):
    layer = make_layer(fmt, bits, group_size)
    mask = in_range(layer)
    assert 0 < mask.sum() < mask.numel(), "the clamp mask must be exercised"
    tensors = [layer[name] for name in TRAINABLE]
    grad_out = torch.randn(2, 3, OUT, dtype=torch.float64)
    grads = torch.autograd.grad(lrqat_linear(**layer), tensors, grad_out)
    expected = torch.autograd.grad(lrqat_linear_reference(**layer), tensors, grad_out)
    for name, got, want in zip(TRAINABLE, grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"d{name}")


def test_saturated_rows_are_the_rows_where_the_clamp_cuts():
    layer = make_layer("fixed", 4, -1)
    mask = in_range(layer)
    _, rows, in_range_rows = rebuild_weight_and_saturated_rows(
        layer["phi0"], layer["lora_a"], layer["lora_b"], 4, LORA_SCALE, "fixed", torch.float64)
    assert rows.tolist() == (~mask).any(1).nonzero().squeeze(1).tolist() and 0 < len(rows) < OUT
    assert torch.equal(in_range_rows, mask[rows])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_backward_op_opcheck_and_empty_gradients_not_asked_for(x_dtype):
    layer = make_layer("fixed", 4, -1, dtype=torch.float32)
    layer["x"], layer["bias"] = layer["x"].detach().to(x_dtype), layer["bias"].detach().to(x_dtype)
    output = lrqat_linear(**layer).detach()
    args = (torch.randn_like(output), layer["x"], output, layer["phi0"],
            *(layer[k].detach() for k in ("lora_a", "lora_b", "scale", "bias")), 4, -1, LORA_SCALE, "fixed")
    some = [True, False, True, False, False]
    for needs_grad in ([True] * 5, some):
        torch.library.opcheck(torch.ops.qgraph.lrqat_linear_backward, (*args, needs_grad))
    grads = torch.ops.qgraph.lrqat_linear_backward(*args, some)
    assert [tuple(g.shape) for g in grads] == [(2, 3, IN), (0,), (RANK, IN), (0,), (0,)]
    assert [g.dtype for g in grads] == [x_dtype, torch.float32, torch.float32, torch.float32, x_dtype]


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_gradients_equal_the_float64_reference_within_bf16_rounding(bias):
    """bf16 activations, float32 A, B, s: the backward's 16-bit rank-r products (saturated rows included) and
    float32-accumulated ds against autograd through the reference on the same values in float64."""
    layer = make_layer("fixed", 4, -1, dtype=torch.float32, lora_a_std=2.0)
    layer["x"] = (torch.randn(4, 64, IN, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
                  .requires_grad_())
    layer["bias"] = (layer["bias"].detach().to(torch.bfloat16).requires_grad_() if bias else None)
    exact = {name: (value.detach().double().requires_grad_() if isinstance(value, torch.Tensor) and name != "phi0"
                    else value) for name, value in layer.items()}
    y = lrqat_linear(**layer)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y.backward(grad_out)
    lrqat_linear_reference(**exact).backward(grad_out.double())
    for name in TRAINABLE:
        if layer[name] is None:
            continue
        got, want = layer[name].grad, exact[name].grad
        assert got.dtype == layer[name].dtype, name
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2, name


def test_scale_gradient_with_a_large_bias_in_bf16():
    # a bf16 output keeps the bias's ulp: ds cannot be read off it, and is formed from x instead
    layer = make_layer("fixed", 4, -1, dtype=torch.float32)
    x = layer["x"].detach().to(torch.bfloat16)
    bias = torch.full((OUT,), 300.0, dtype=torch.bfloat16)
    scale = layer["scale"].detach().requires_grad_()
    y = lrqat_linear(x, layer["phi0"], layer["lora_a"].detach(), layer["lora_b"].detach(), scale, bias, 4, -1,
                     LORA_SCALE, "fixed")
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    (grad_scale,) = torch.autograd.grad(y, scale, grad_out)
    w_int = rebuild_weight(layer["phi0"], layer["lora_a"].detach(), layer["lora_b"].detach(), 4, LORA_SCALE,
                           "fixed", torch.float32).double()
    expected = (grad_out.double() * (x.double() @ w_int.T)).sum((0, 1))
    torch.testing.assert_close(grad_scale[:, 0].double(), expected, rtol=1e-4, atol=1e-4)


def test_scale_gradient_of_a_zero_scale_is_computed_from_x():
    # per-channel ds reads u = (y - bias) / s off the output; a zero scale has no u to recover there
    layer = make_layer("fixed", 4, -1)
    with torch.no_grad():
        layer["scale"][3] = 0.0
    tensors = [layer[name] for name in TRAINABLE]
    grad_out = torch.randn(2, 3, OUT, dtype=torch.float64)
    grads = torch.autograd.grad(lrqat_linear(**layer), tensors, grad_out)
    expected = torch.autograd.grad(lrqat_linear_reference(**layer), tensors, grad_out)
    assert expected[3][3] != 0
    for name, got, want in zip(TRAINABLE, grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"d{name}")


def saved_for_backward(fn, layer):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, identity):
        fn(**layer)
    return saved


def weight_sized_non_inputs(saved, layer):
    inputs = {(t.data_ptr(), tuple(t.shape)) for t in layer.values() if isinstance(t, torch.Tensor)}
    return [t for t in saved if (t.data_ptr(), tuple(t.shape)) not in inputs and t.numel() >= OUT * IN // 4]


@pytest.mark.parametrize("group_size", [8, -1])
def test_saves_only_its_inputs_for_backward(group_size):
    layer = make_layer("fixed", 4, group_size)
    layer["x"] = torch.randn(2, IN, dtype=torch.float64, requires_grad=True)  # far smaller than W
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, identity):
        output = lrqat_linear(**layer)
    # and per-channel, for ds, its own output: activation-sized
    kept = {(t.data_ptr(), tuple(t.shape)) for t in [*layer.values(), output] if isinstance(t, torch.Tensor)}
    assert saved and all((t.data_ptr(), tuple(t.shape)) in kept for t in saved)
    assert (output.data_ptr() in {t.data_ptr() for t in saved}) == (group_size == -1)
    assert all(t.numel() < OUT * IN for t in saved if t.data_ptr() != layer["phi0"].data_ptr())
    # The check above would catch a weight-sized tensor: the plain autograd reference keeps several.
    assert weight_sized_non_inputs(saved_for_backward(lrqat_linear_reference, layer), layer)


def test_activation_not_saved_when_only_x_needs_grad():
    layer = make_layer("fixed", 4, 8)
    for name in ("lora_a", "lora_b", "scale"):
        layer[name].requires_grad_(False)
    saved = saved_for_backward(lrqat_linear, layer)
    assert all(t.data_ptr() != layer["x"].data_ptr() for t in saved)


@pytest.mark.parametrize("fmt", ["fp32", "int-packed"])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8])
def test_step_zero_is_rtn_exactly(fmt, bits, group_size):
    torch.manual_seed(0)
    weight, x = torch.randn(OUT, IN), torch.randn(5, IN)
    scale0 = init_scale(weight, bits, group_size)
    phi0, lora_a, lora_b = phi0_from_weight(weight, scale0, bits, group_size, fmt), torch.zeros(OUT, RANK), torch.randn(RANK, IN)
    rtn_codes = quantize_to_codes(weight, scale0, bits, group_size)
    assert torch.equal(rebuild_weight(phi0, lora_a, lora_b, bits, LORA_SCALE, fmt, torch.float32), rtn_codes.float())
    y = lrqat_linear(x, phi0, lora_a, lora_b, scale0, None, bits, group_size, LORA_SCALE, fmt)
    assert torch.equal(y, scaled_linear(x, rtn_codes, scale0, None, group_size))
    # the RTN weight s0 * W_int applied as a float weight: the same product, rounded in another order
    torch.testing.assert_close(y, F.linear(x, fake_quantize(weight, scale0, bits, group_size)), rtol=1e-5, atol=1e-5)


def fixed_point_codes_at_step_zero(grid_units, bits):
    """W_int of a per-channel layer with s0 = 1 (so W0 / s0 = W0) and A = 0, fixed-point Phi0."""
    phi0 = phi0_from_weight(grid_units, torch.ones(grid_units.shape[0], 1), bits, -1, "fixed")
    lora_a, lora_b = torch.zeros(grid_units.shape[0], RANK), torch.randn(RANK, grid_units.shape[1])
    return rebuild_weight(phi0, lora_a, lora_b, bits, LORA_SCALE, "fixed", torch.float32)


def test_fixed_point_step_zero_is_rtn_except_near_half_integers():
    # Q4.4 rounds W0 / s0 to 1/16 first: a value within 1/32 of k + 1/2 becomes exactly k + 1/2 and
    # then rounds half to even, which can differ from RTN of the unrounded value (2.52: RTN 3, here 2).
    bits, fractional_bits = 4, 4
    torch.manual_seed(0)
    units = torch.rand(64, 64) * 18 - 9
    units[0, :4] = torch.tensor([2.52, 1.48, -2.52, 2.47])
    w_int = fixed_point_codes_at_step_zero(units, bits)
    rtn = quantize_to_codes(units, torch.ones(64, 1), bits, -1).float()
    near_half = (units.abs().frac() - 0.5).abs() <= 2.0 ** -(fractional_bits + 1)
    assert torch.equal(w_int[~near_half], rtn[~near_half])
    assert w_int[0, :4].tolist() == [2.0, 2.0, -2.0, 2.0] and rtn[0, :4].tolist() == [3.0, 1.0, -3.0, 2.0]


def test_fixed_point_step_zero_is_rtn_at_8_bits():
    # Q8.0 has no fractional bits: phi^-1(phi(x)) = round(x), so the rounds agree everywhere.
    torch.manual_seed(0)
    units = torch.rand(64, 64) * 300 - 150
    units[0, :2] = torch.tensor([2.5, 3.5])
    rtn = quantize_to_codes(units, torch.ones(64, 1), 8, -1).float()
    assert torch.equal(fixed_point_codes_at_step_zero(units, 8), rtn)


def test_bad_arguments_raise_clear_errors():
    layer = make_layer("fixed", 4, 8)
    with pytest.raises(ValueError, match="unknown phi format 'q4.4'"):
        lrqat_linear(**{**layer, "phi_format": "q4.4"})
    with pytest.raises(ValueError, match="group_size=12 does not divide in_features=32"):
        lrqat_linear(**{**layer, "group_size": 12})
    with pytest.raises(ValueError, match=r"scale has shape \(16, 4\), expected \(16, 1\)"):
        lrqat_linear(**{**layer, "group_size": -1})
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        lrqat_linear(**{**layer, "bits": 9})
    with pytest.raises(ValueError, match="bias is torch.float32 but x is torch.float64: cast the bias"):
        lrqat_linear(**{**layer, "bias": layer["bias"].detach().float()})


class LRQATLayer(nn.Module):
    def __init__(self, fmt="int-packed", bits=4, group_size=8):
        super().__init__()
        layer = make_layer(fmt, bits, group_size, dtype=torch.float32)
        self.register_buffer("phi0", layer["phi0"])
        self.lora_a = nn.Parameter(layer["lora_a"].detach())
        self.lora_b = nn.Parameter(layer["lora_b"].detach())
        self.scale = nn.Parameter(layer["scale"].detach())
        self.quant_args = (bits, group_size, LORA_SCALE, fmt)

    def forward(self, x):
        return lrqat_linear(x, self.phi0, self.lora_a, self.lora_b, self.scale, None, *self.quant_args)


def lrqat_node_count(graph):
    return sum(node.target == torch.ops.qgraph.lrqat_linear.default for node in graph.nodes)


def test_export_and_reexport_keep_one_node():
    module, x = LRQATLayer(), torch.randn(2, 5, IN)
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    exported = torch.export.export(module, (x,), dynamic_shapes=dims)
    reexported = torch.export.export(exported.module(), (x,), dynamic_shapes=dims)
    for program in (exported, reexported):
        assert lrqat_node_count(program.graph) == 1
        assert torch.equal(program.module()(x), module(x))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    module, x = LRQATLayer(), torch.randn(2, 5, IN)
    eager_out = module(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(module.parameters()))
    compiled_out = torch.compile(module, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(module.parameters()))
    torch.testing.assert_close(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference():
    layer = {k: v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
             for k, v in make_layer("fixed", 4, 8).items()}
    tensors = [layer[name] for name in TRAINABLE]
    y = lrqat_linear(**layer)
    assert torch.equal(y, lrqat_linear_reference(**layer))
    grads = torch.autograd.grad(y.sum(), tensors)
    expected = torch.autograd.grad(lrqat_linear_reference(**layer).sum(), tensors)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- the compiled formulation (inductor decomposition) --------------------------------------------------


@pytest.mark.parametrize(("fmt", "bits", "group_size"), FORMATS_BITS_GROUPS)
def test_compiled_formulation_equals_the_op(fmt, bits, group_size):
    # LORA_SCALE is a power of two: scaling A before the matmul is then exact
    layer = make_layer(fmt, bits, group_size)
    assert torch.equal(lrqat_linear_compiled(**layer), lrqat_linear(**layer))


def compile_fresh(module):
    torch._dynamo.reset()
    return compile_module(module, fullgraph=True)


class ReferenceLayer(LRQATLayer):
    def forward(self, x):
        return lrqat_linear_reference(x, self.phi0, self.lora_a, self.lora_b, self.scale, None, *self.quant_args)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fixed", "int-packed"])
def test_inductor_fuses_the_weight_and_saves_nothing_weight_sized(fmt):
    from torch._inductor.utils import run_and_get_code

    module, x = LRQATLayer(fmt), torch.randn(2, 5, IN)
    compiled = compile_fresh(module)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        out, (forward_code,) = run_and_get_code(compiled, x)
    assert "torch.ops.qgraph.lrqat_linear" not in forward_code  # decomposed: no opaque fallback call left
    # ... by this compile alone: inductor's process-wide table is as it was
    assert torch.ops.qgraph.lrqat_linear.default not in torch._inductor.decomposition.decompositions
    # the weight is built by generated kernels around one addmm (Phi0 + c A @ B) and one mm (x @ W^T)
    assert forward_code.count("extern_kernels.") == 2 and 1 <= forward_code.count("async_compile.cpp") <= 3
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)
    tensors = {"phi0": module.phi0, "lora_a": module.lora_a, "lora_b": module.lora_b, "scale": module.scale, "x": x}
    inputs = {t.data_ptr() for t in tensors.values()}  # compiled code saves x as a (tokens, in) view

    def weight_sized_new(saved):
        return [t for t in saved if t.data_ptr() not in inputs and t.numel() >= OUT * IN // 4]

    saved = saved_for_backward(lambda **kw: compiled(kw["x"]), tensors)
    assert len(saved) == 5 and not weight_sized_new(saved)
    # the check sees weight-sized tensors where a compiled formulation keeps them
    reference = ReferenceLayer(fmt)
    reference.load_state_dict(module.state_dict())
    assert weight_sized_new(saved_for_backward(lambda **kw: compile_fresh(reference)(kw["x"]), tensors))


@pytest.mark.slow
def test_compiled_gradients_gradcheck_in_float64():
    # W_int does not depend on x, s or bias, so their derivatives are exact: gradcheck the compiled pair
    layer = make_layer("fixed", 4, 8)
    layer["lora_a"].requires_grad_(False)
    layer["lora_b"].requires_grad_(False)
    compiled = compile_fresh(lrqat_linear)
    assert torch.autograd.gradcheck(compiled, positional(layer))
