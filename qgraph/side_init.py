"""Side blocks initialised from the backbone's own weights pruned to the side width ("pruned" init).

Ladder Side-Tuning (Sung et al., 2022), the method QST builds on, starts each side block from the
backbone layer it runs beside, pruned to the side width, rather than at random. Here the weights are
the backbone's dequantized NF4 weights (the fp32 ones are gone once quantize_nf4 has run), and every
choice is by weight magnitude, the squared L2 norm of the rows and columns a kept unit owns:

- hidden channels (d -> d/r), ONE choice shared by every side block, since the side network's
  residual stream runs through all of them: channel c scores the sum, over the tapped blocks, of the
  squared norms of column c of every linear that reads the residual stream (q, k, v after the
  attention norm, gate and up after the MLP norm, each column times its norm weight: the weight the
  channel really meets) plus row c of every linear that writes it (o, down);
- attention heads, per block: query head h scores its q rows plus its o columns; the side block's
  heads come from the best-scoring query heads, each with the key/value head of its group (GQA);
- inside a kept head, q/k dimensions go by rotary pair (j, j + head_dim/2), which rotate together:
  pair j scores q's and k's rows j and j + head_dim/2; the kept pairs are laid out as the side
  network's rotate-half expects (first members, then second members). v dimensions score v's row
  plus o's column for that dimension;
- FFN channels, per block: channel j scores gate's and up's row j plus down's column j.

Kept indices are sorted ascending (the backbone's order); ties go to the lower index. Biases (Qwen2's
q/k/v) are dropped: the side block has none. The side rotary tables stay the side network's own (its
head size and theta), so a kept pair rotates at the side network's frequency, not the backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INIT_KINDS = ("random", "pruned")


@dataclass(frozen=True)
class BackboneBlock:
    """One backbone decoder block's weights, each (out, in) in float32 as nn.Linear stores it.

    Norm weights are None where the block's norm has none the side block could copy."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor
    attn_norm: Tensor | None
    mlp_norm: Tensor | None
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.q.shape[0] // self.heads

    @property
    def width(self) -> int:
        return self.q.shape[1]


@dataclass(frozen=True)
class BlockChoice:
    """What one side block keeps of its backbone block (indices into the backbone's tensors)."""

    heads: Tensor  # (side heads,) query heads
    qk_dims: Tensor  # (side heads, side head_dim) dimensions inside each kept head, rotate-half layout
    v_dims: Tensor  # (side heads, side head_dim)
    ffn: Tensor  # (side FFN width,)


def top_indices(scores: Tensor, k: int) -> Tensor:
    """The indices of the k largest scores, ascending; a tie keeps the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def _columns(weight: Tensor, norm: Tensor | None) -> Tensor:
    """Squared norm of each column of the weight a normalised input meets: W * diag(norm weight)."""
    return (weight if norm is None else weight * norm).square().sum(0)


def hidden_scores(blocks: list[BackboneBlock]) -> Tensor:
    """(d,) the importance of each residual-stream channel, summed over the blocks."""
    total = torch.zeros(blocks[0].width)
    for b in blocks:
        total += sum(_columns(w, b.attn_norm) for w in (b.q, b.k, b.v))
        total += sum(_columns(w, b.mlp_norm) for w in (b.gate, b.up))
        total += b.o.square().sum(1) + b.down.square().sum(1)
    return total


def kv_head_of(block: BackboneBlock, heads: Tensor) -> Tensor:
    """The key/value head each query head reads (grouped-query attention)."""
    return heads // (block.heads // block.kv_heads)


def head_scores(block: BackboneBlock) -> Tensor:
    """(heads,) each query head's q rows plus its o columns."""
    hd = block.head_dim
    q = block.q.square().sum(1).view(block.heads, hd).sum(1)
    o = block.o.square().sum(0).view(block.heads, hd).sum(1)
    return q + o


def rotary_pair_scores(block: BackboneBlock, head: int) -> Tensor:
    """(head_dim / 2,) each rotary pair (j, j + head_dim/2) of a query head and its key head."""
    hd, half = block.head_dim, block.head_dim // 2
    kv = int(kv_head_of(block, torch.tensor(head)))
    rows = block.q[head * hd:(head + 1) * hd].square().sum(1) + block.k[kv * hd:(kv + 1) * hd].square().sum(1)
    return rows[:half] + rows[half:]


def value_dim_scores(block: BackboneBlock, head: int) -> Tensor:
    """(head_dim,) each value dimension: v's row (in the head's key/value head) plus o's column."""
    hd = block.head_dim
    kv = int(kv_head_of(block, torch.tensor(head)))
    return block.v[kv * hd:(kv + 1) * hd].square().sum(1) + block.o[:, head * hd:(head + 1) * hd].square().sum(0)


def ffn_scores(block: BackboneBlock) -> Tensor:
    """(FFN width,) each FFN channel's gate and up rows plus its down column."""
    return block.gate.square().sum(1) + block.up.square().sum(1) + block.down.square().sum(0)


def choose_block(block: BackboneBlock, side_heads: int, side_head_dim: int, side_ffn: int) -> BlockChoice:
    """The heads, head dimensions and FFN channels one side block keeps of its backbone block."""
    heads = top_indices(head_scores(block), side_heads)
    half = block.head_dim // 2
    qk, v = [], []
    for head in heads.tolist():
        pairs = top_indices(rotary_pair_scores(block, head), side_head_dim // 2)
        qk.append(torch.cat([pairs, pairs + half]))
        v.append(top_indices(value_dim_scores(block, head), side_head_dim))
    return BlockChoice(heads, torch.stack(qk), torch.stack(v), top_indices(ffn_scores(block), side_ffn))


def _rows(heads: Tensor, dims: Tensor, head_dim: int) -> Tensor:
    """Flat row indices of `dims` inside each of `heads` (heads of size head_dim)."""
    return (heads[:, None] * head_dim + dims).flatten()


def pruned_block_state(block: BackboneBlock, choice: BlockChoice, hidden: Tensor) -> dict[str, Tensor]:
    """A SideBlock's state dict: the backbone block's weights at the kept rows and columns."""
    hd = block.head_dim
    kv = kv_head_of(block, choice.heads)
    q_rows, k_rows = _rows(choice.heads, choice.qk_dims, hd), _rows(kv, choice.qk_dims, hd)
    v_rows, o_cols = _rows(kv, choice.v_dims, hd), _rows(choice.heads, choice.v_dims, hd)
    ones = torch.ones(len(hidden))
    return {
        "attn_norm.weight": ones if block.attn_norm is None else block.attn_norm[hidden],
        "attn.qkv.weight": torch.cat([block.q[q_rows], block.k[k_rows], block.v[v_rows]])[:, hidden],
        "attn.out.weight": block.o[hidden][:, o_cols],
        "mlp_norm.weight": ones if block.mlp_norm is None else block.mlp_norm[hidden],
        "mlp.gate_up.weight": torch.cat([block.gate[choice.ffn], block.up[choice.ffn]])[:, hidden],
        "mlp.down.weight": block.down[hidden][:, choice.ffn],
    }


def check_prunable(block: BackboneBlock, side_heads: int, side_head_dim: int, side_ffn: int) -> str | None:
    """Why the block cannot be pruned to these sizes (a message naming the fix), or None."""
    if side_heads > block.heads:
        return (f"the side block has {side_heads} heads but the backbone layer has {block.heads}; "
                f"set heads to at most {block.heads}")
    if block.head_dim % 2 or side_head_dim > block.head_dim:
        return (f"side heads of size {side_head_dim} do not fit the backbone's heads of size {block.head_dim}; "
                "set heads so that d/r / heads is at most the backbone's head size")
    if side_ffn > block.gate.shape[0]:
        return f"the side FFN width {side_ffn} exceeds the backbone's {block.gate.shape[0]}"
    return None
