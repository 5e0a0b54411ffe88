"""qgraph::rotary: the side network's rotation, an opaque op in compiled code and plain ops elsewhere."""

import pytest
import torch
from torch import fx

from qgraph.ops.rotary import rotary, rotary_reference
from qgraph.side_network import Rotary, SideConfig, SideNetwork, rotary_tables, rotate

BATCH, HEADS, TOKENS, HEAD_DIM = 2, 3, 5, 4


def tables(dtype=torch.float32) -> Rotary:
    positions = torch.arange(TOKENS).expand(BATCH, TOKENS)
    return rotary_tables(positions, HEAD_DIM, dtype)


def test_equals_the_plain_rotation_and_keeps_each_pairs_length():
    x = torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM)
    table = tables()
    y = rotary(x, table.cos, table.sin)
    assert torch.equal(y, rotary_reference(x, table.cos, table.sin))
    half = HEAD_DIM // 2
    # a rotation: each (x1[i], x2[i]) pair keeps its length, and position 0 is not moved
    torch.testing.assert_close(y[..., :half] ** 2 + y[..., half:] ** 2, x[..., :half] ** 2 + x[..., half:] ** 2)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])


def test_products_promote_as_the_plain_ops_do():
    x = torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, dtype=torch.bfloat16)
    table = tables(torch.float32)
    y = rotary(x, table.cos, table.sin)
    assert y.dtype == torch.float32 and torch.equal(y, rotary_reference(x, table.cos, table.sin))


def test_gradcheck_float64():
    x = torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    table = tables(torch.float64)
    assert torch.autograd.gradcheck(lambda x: rotary(x, table.cos, table.sin), (x,))


def test_opcheck():
    table = tables()
    torch.library.opcheck(torch.ops.qgraph.rotary.default,
                          (torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, requires_grad=True), table.cos, table.sin))
    # q and k as the side attention makes them: a permuted view of the q/k/v projection
    qkv = torch.randn(BATCH, TOKENS, 3, HEADS, HEAD_DIM, requires_grad=True)
    torch.library.opcheck(torch.ops.qgraph.rotary.default, (qkv.permute(2, 0, 3, 1, 4)[0], table.cos, table.sin))


def test_tables_that_want_a_gradient_are_refused():
    table = tables()
    with pytest.raises(RuntimeError, match="take no gradient"):
        rotary(torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM), table.cos.requires_grad_(), table.sin)


def graph_ops(gm: fx.GraphModule) -> set:
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


def test_compiled_code_calls_the_op_and_torch_export_traces_the_plain_ops():
    table = tables()
    captured: list[fx.GraphModule] = []

    def backend(gm, _inputs):
        captured.append(gm)
        return gm

    x = torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM)
    compiled = torch.compile(lambda x: rotate(x, table), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), rotate(x, table))
    assert torch.ops.qgraph.rotary in graph_ops(captured[0])  # dynamo records the op packet

    config = SideConfig(backbone_width=64, width=8, ffn_width=16, heads=2, blocks=1)
    hidden = torch.randn(3, 1, 3, 64)  # the head's input, then the embedding's and the block's taps
    program = torch.export.export(SideNetwork(config), (hidden[0], None, *hidden[1:]))
    exported = graph_ops(program.graph_module)
    assert torch.ops.aten.cat.default in exported  # the rotation, as plain ops
    assert not any(str(target).startswith("qgraph.") for target in exported)
