"""qgraph's linear ops under torch.autocast: the activation and bias in the autocast dtype, the weight side
(Phi0, A, B, scales, NF4 constants) as stored, gradients back in each input's own dtype."""

import pytest
import torch

import qgraph
from qgraph.models import tiny_causal_lm
from qgraph.ops.autocast import autocast_arguments
from qgraph.ops.int4 import fold_lrqat_weight
from qgraph.ops.nf4 import quantize_nf4
from tests.ops.test_int4 import IN, LORA_SCALE, OUT, trained_layer
from tests.ops.test_nf4 import op_args, weight

LRQAT = torch.ops.qgraph.lrqat_linear.default
INT4 = torch.ops.qgraph.int4_linear.default
NF4 = torch.ops.qgraph.nf4_linear.default


def lrqat_args(x, bias, group_size):
    layer = trained_layer("fixed", 4, group_size)
    for name in ("lora_a", "lora_b", "scale"):
        layer[name].requires_grad_()
    return (x, layer["phi0"], layer["lora_a"], layer["lora_b"], layer["scale"], bias, 4, group_size, LORA_SCALE,
            "fixed")


def int4_args(x, bias, group_size):
    layer = trained_layer("fixed", 4, group_size)
    codes, scale = fold_lrqat_weight(**layer)
    return x, codes, scale, bias, 4, group_size, IN


def nf4_args(x, bias, group_size):
    return op_args(x, quantize_nf4(weight(OUT, IN)), bias)


CASES = {"lrqat_linear": (LRQAT, lrqat_args, (0, 5)), "int4_linear": (INT4, int4_args, (0, 3)),
         "nf4_linear": (NF4, nf4_args, (0, 7))}


def leaves(args: tuple) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("group_size", [-1, 8])
def test_autocast_equals_the_op_on_cast_activations(name, group_size):
    """Under autocast the op is exactly the op called on the bf16 activation and bias, and every gradient
    comes back in its input's own dtype (float32 master copies)."""
    op, make_args, cast_positions = CASES[name]
    x = torch.randn(2, 3, IN, requires_grad=True)
    bias = torch.randn(OUT, requires_grad=True)
    args = make_args(x, bias, group_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = op(*args)
    assert mixed.dtype == torch.bfloat16
    mixed.float().square().sum().backward()
    mixed_grads = [t.grad.clone() for t in leaves(args)]
    assert all(g.dtype == torch.float32 for g in mixed_grads)

    for t in leaves(args):
        t.grad = None
    cast = tuple(a.to(torch.bfloat16) if i in cast_positions else a for i, a in enumerate(args))
    reference = op(*cast)
    assert torch.equal(mixed, reference)
    reference.float().square().sum().backward()
    for got, t in zip(mixed_grads, leaves(args)):
        assert torch.equal(got, t.grad)


def test_the_weight_side_is_not_cast():
    layer_args = lrqat_args(torch.randn(3, IN), None, -1)
    cast = autocast_arguments(layer_args, (0, 5), torch.bfloat16)
    assert cast[0].dtype == torch.bfloat16
    assert all(c is a for c, a in zip(cast[1:], layer_args[1:]))


def test_float64_is_left_alone_as_autocast_leaves_it():
    """gradcheck's float64 inputs pass through an autocast region unchanged."""
    x = torch.randn(3, IN, dtype=torch.float64)
    assert autocast_arguments((x,), (0,), torch.bfloat16)[0] is x


def test_outside_autocast_nothing_changes():
    x = torch.randn(3, IN)
    args = int4_args(x, None, -1)
    assert INT4(*args).dtype == torch.float32


@pytest.mark.parametrize("plan", ["lrqat-w4", "lrqat-w4g128", "qst-nf4"])
def test_a_transformed_model_trains_in_mixed_precision(plan):
    """A float32 model under autocast: the plan's linears compute in bf16 (the loss moves off the float32
    one by bf16 rounding, not more), the trained parameters and their gradients stay float32."""
    torch.manual_seed(0)
    qm = qgraph.transform(tiny_causal_lm("llama", hidden=128), plan)
    ids = torch.randint(0, 100, (2, 16))
    full = qm(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = qm(input_ids=ids, labels=ids).loss
    assert mixed.item() != full.item()
    assert mixed.item() == pytest.approx(full.item(), rel=2e-2)
    mixed.backward()
    trained = qm.trainable_parameters()
    assert trained and all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                           for p in trained)
