"""The QST side network (Zhang et al., ACL 2024): a small decoder that reads the frozen backbone's
hidden states and corrects its final hidden state.

    h_g0 = down_0(h_f0)
    h_gi = (1 - b_i) * down_i(h_fi) + b_i * block_i(h_g(i-1)),   b_i = sigmoid(gamma_i)
    h    = a * h_head + (1 - a) * upsample(norm(h_gN))        mix="gate" (the paper's)
    h    = a * h_head + (1 - a) * upsample(norm(h_gN)), a in R^d  mix="channel": one gate per feature
    h    = h_head + upsample(norm(h_gN)), upsample starting at 0  mix="residual"
    h    = gate's h + h_head * modulation(norm(h_gN)), modulation starting at 0   mix="modulate"

It is an ordinary nn.Module that `attach_side_taps` places in the captured graph with call_module, so
train()/eval(), state_dict and optimizers see it as usual. Nothing in it knows a model family: its
sizes come from the backbone's hidden and FFN widths divided by r. Every block is one pre-norm
decoder block (RMSNorm, causal self-attention with rotary positions, SwiGLU MLP), whatever the
backbone's family, so one side network serves Llama, Qwen2, Mistral and GPT-2 backbones alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qgraph.errors import QGraphError
from qgraph.ops.rotary import rotary_reference

SIDE_MODULE = "qst_side"  # the side network's attribute on the GraphModule (and its parameters' prefix)
DOWNSAMPLE_KINDS = ("adapter", "lora", "linear", "maxpool", "avgpool")
# how the side output meets the head's input (SideNetwork's docstring)
MIX_KINDS = ("gate", "channel", "residual", "modulate")
ROPE_THETA = 10000.0
NORM_EPS = 1e-6
# AdamW rate for the randomly initialised side network: the best held-out perplexity in
# tools/bench_qst.py's runs on SmolLM2 (200 steps: 12.76 at 1e-2, 14.10 at 1e-3)
SIDE_NETWORK_LR = 1e-2


@dataclass(frozen=True)
class SideConfig:
    """Every size of a side network: what save/load compares to refuse a mismatched checkpoint."""

    backbone_width: int  # d: the backbone's hidden size
    width: int  # d / r
    ffn_width: int  # the backbone's FFN width / r
    heads: int
    blocks: int  # one per tapped backbone layer (the embedding tap has a downsample, no block)
    downsample: str = "adapter"
    adapter_rank: int = 16
    mix: str = "gate"

    def __post_init__(self) -> None:
        if self.mix not in MIX_KINDS:
            raise ValueError(f"mix must be one of {', '.join(MIX_KINDS)}, got {self.mix!r}")
        if self.downsample not in DOWNSAMPLE_KINDS:
            raise ValueError(f"downsample must be one of {', '.join(DOWNSAMPLE_KINDS)}, got {self.downsample!r}")
        if self.width < 1 or self.backbone_width % self.width:
            raise ValueError(f"side width {self.width} must divide the backbone width {self.backbone_width}")
        if self.width % self.heads or self.head_dim % 2:
            raise ValueError(f"{self.heads} heads need a side width ({self.width}) that splits into heads of even "
                             "size (rotary positions rotate pairs of features)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def reduction(self) -> int:
        return self.backbone_width // self.width


# --- downsamples: d -> d / r -----------------------------------------------------------------------------


class Pool(nn.Module):
    """Parameter-free: the max or mean of each run of r adjacent features."""

    def __init__(self, reduction: int, kind: str) -> None:
        super().__init__()
        self.reduction = reduction
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        groups = x.unflatten(-1, (-1, self.reduction))
        return groups.amax(-1) if self.kind == "maxpool" else groups.mean(-1)


def make_downsample(config: SideConfig) -> nn.Module:
    d, width, rank = config.backbone_width, config.width, config.adapter_rank
    if config.downsample == "adapter":
        return nn.Sequential(nn.Linear(d, rank), nn.SiLU(), nn.Linear(rank, width), nn.LayerNorm(width))
    if config.downsample == "lora":
        return nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, width, bias=False))
    if config.downsample == "linear":
        return nn.Linear(d, width)
    return Pool(config.reduction, config.downsample)


# --- one side block ----------------------------------------------------------------------------------------


class Rotary(NamedTuple):
    """cos and sin of every (position, frequency) angle, (B, 1, T, head_dim / 2): one table per forward,
    shared by every block.

    Made once outside the blocks rather than in each: besides the repeated work, a Python float
    (theta) read inside a checkpointed block is lifted by dynamo into that block's subgraph, and the
    next block's checkpoint then fails on it (torch 2.13: "lift_tracked_freevar_to_input should not
    be called on root SubgraphTracer", pytorch/pytorch#193194)."""

    cos: Tensor
    sin: Tensor


def rotary_tables(positions: Tensor, head_dim: int, dtype: torch.dtype, theta: float = ROPE_THETA) -> Rotary:
    """The rotary angles of integer positions (B, T) for heads of size head_dim."""
    half = head_dim // 2
    inv_freq = theta ** -(torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, half)
    return Rotary(angles.cos().to(dtype), angles.sin().to(dtype))


def rotate(x: Tensor, rotary: Rotary) -> Tensor:
    """Rotary position embedding of x (B, heads, T, head_dim).

    Compiled, one opaque op (qgraph::rotary: inductor's CPU code for a head of a few features was ten times
    slower than eager's); eager and torch.export, the plain ops."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.ops.qgraph.rotary(x, rotary.cos, rotary.sin)
    return rotary_reference(x, rotary.cos, rotary.sin)


# one block's keys and values, each (B, heads, tokens, head_dim)
KeysValues = tuple[Tensor, Tensor]


class SideAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, rotary: Rotary, allowed: Tensor, past: KeysValues | None = None
                ) -> tuple[Tensor, KeysValues]:
        """(output, the keys and values it attended to): `past`'s, when given, followed by those of x's tokens."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, rotary), rotate(k, rotary)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out(y.transpose(1, 2).flatten(-2)), (k, v)


class SideMLP(nn.Module):
    def __init__(self, width: int, ffn_width: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * ffn_width, bias=False)
        self.down = nn.Linear(ffn_width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in its weight's dtype (float32), returned in the input's: a bf16 input is normalised
    over float32 sums, as the backbone's own norms do, and takes the fused kernel (one dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class SideBlock(nn.Module):
    def __init__(self, config: SideConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.width, eps=NORM_EPS)
        self.attn = SideAttention(config.width, config.heads)
        self.mlp_norm = RMSNorm(config.width, eps=NORM_EPS)
        self.mlp = SideMLP(config.width, config.ffn_width)

    def forward(self, x: Tensor, rotary: Rotary, allowed: Tensor, past: KeysValues | None = None
                ) -> tuple[Tensor, KeysValues]:
        attended, present = self.attn(self.attn_norm(x), rotary, allowed, past)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), present


# --- masks and positions ---------------------------------------------------------------------------------


def positions_from_mask(mask: Tensor) -> Tensor:
    """Each token's index among the real tokens of its row: padding never shifts a real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_allowed(mask: Tensor, queries: int | None = None) -> Tensor:
    """(B, 1, Q, T) bool for the last Q = `queries` tokens of the T that `mask` covers (all of them by default):
    query t sees key s <= t that is a real token, and always itself.

    Seeing itself keeps a padding query's row from being all-masked, which would make softmax NaN
    and carry the NaN into later layers through the values of that position. Only the queries' rows are
    formed: a decode step's one token costs a row of the mask, not the whole sequence's square.
    """
    seq = mask.shape[-1]
    keys = torch.arange(seq, device=mask.device)
    rows = keys if queries is None else keys[seq - queries:]
    causal = keys[None, :] <= rows[:, None]
    allowed = causal[None] & mask.bool()[:, None, :]
    return (allowed | (keys[None, :] == rows[:, None])[None])[:, None]


# --- the network -------------------------------------------------------------------------------------------


def zero_linear(linear: nn.Linear) -> nn.Linear:
    """The linear with weight and bias set to 0: a branch that starts silent (as LoRA's B)."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    return linear


class SideNetwork(nn.Module):
    """forward(head_input, attention_mask, h_f0, ..., h_fN) -> the head's new input; a KV-cached decode step
    passes past_attention_mask= and past= too, and gets (the head's new input, *present) (see forward).

    mix="gate" (the paper's): `a` starts at 1, so at step 0 the output is head_input exactly (1 * h + 0 * anything
    == h for finite values): the transformed model starts as the backbone, as the paper intends. With a = 1
    the side network's own gradients are zero (they are scaled by 1 - a), but a's gradient,
    sum(dL/dh * (h_head - upsample(...))), is not: the first Adam step moves a off 1 by about the
    learning rate whatever that gradient's size, and from then on every side parameter gets a
    gradient. Adam makes no update from the all-zero first gradients (its moments stay zero).
    """

    def __init__(self, config: SideConfig, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        # The parameters stay float32 (what the optimizer updates: a bf16 parameter would drop every update
        # below 2^-8 of its size, as PEFT keeps adapters float32 for the same reason). compute_dtype (None: the
        # parameters' dtype) runs the network in another dtype under autocast: matmuls and attention in 16
        # bits, what autocast keeps in float32 in float32 (attach_side_taps' compute_dtype="backbone").
        self.compute_dtype = compute_dtype
        self.downsamples = nn.ModuleList(make_downsample(config) for _ in range(config.blocks + 1))
        self.blocks = nn.ModuleList(SideBlock(config) for _ in range(config.blocks))
        # gamma = 0: each gate starts halfway between the backbone's tap and the side block's output
        self.gates = nn.Parameter(torch.zeros(config.blocks))
        self.norm = RMSNorm(config.width, eps=NORM_EPS)
        self.upsample = nn.Linear(config.width, config.backbone_width)
        if config.mix == "residual":
            zero_linear(self.upsample)
        else:
            self.mix = nn.Parameter(torch.ones(() if config.mix != "channel" else config.backbone_width))
        if config.mix == "modulate":
            self.modulation = zero_linear(nn.Linear(config.width, config.backbone_width))

    def side_output(self, attention_mask: Tensor | None, *taps: Tensor) -> Tensor:
        """upsample(norm(h_gN)) from the backbone's taps (B, T, d), in the network's compute dtype."""
        return self._side_outputs(attention_mask, taps)[0]

    def _side_outputs(self, attention_mask: Tensor | None, taps: tuple[Tensor, ...],
                      past: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """(upsample(norm(h_gN)), modulation(norm(h_gN)) or None, every block's keys and values [k_0, v_0, ...]),
        in the network's compute dtype."""
        if len(taps) != self.config.blocks + 1:
            raise ValueError(f"the side network reads {self.config.blocks + 1} taps, got {len(taps)}")
        dtype = self.effective_dtype()
        with self._autocast(dtype, taps[0].device):
            state, present = self._side_state(attention_mask, dtype, taps, past)
            modulation = self.modulation(state) if self.config.mix == "modulate" else None
            return self.upsample(state), modulation, present

    def _autocast(self, dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
        if dtype == self.upsample.weight.dtype:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def _side_state(self, attention_mask: Tensor | None, dtype: torch.dtype, taps: tuple[Tensor, ...],
                    past: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        """(norm(h_gN), [k_0, v_0, k_1, v_1, ...]). attention_mask covers the past's tokens and then the taps'."""
        new = taps[0].shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(taps[0].shape[:2], dtype=torch.long, device=taps[0].device)
        # the new tokens' rows of the whole sequence's positions and mask
        rotary = rotary_tables(positions_from_mask(attention_mask)[:, -new:], self.config.head_dim, dtype)
        allowed = attention_allowed(attention_mask, new)
        h = self.downsamples[0](taps[0].to(dtype))
        gates = torch.sigmoid(self.gates)
        present: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            down = self.downsamples[i + 1](taps[i + 1].to(dtype))
            # past is flat, [k_0, v_0, k_1, ...], as the decode signature's is; a block takes its own pair
            out, keys_values = block(h, rotary, allowed, None if past is None else (past[2 * i], past[2 * i + 1]))
            h = (1 - gates[i]) * down + gates[i] * out
            present += keys_values
        return self.norm(h), present

    def effective_dtype(self) -> torch.dtype:
        """The dtype it computes in, its keys and values' too: compute_dtype, else its parameters'."""
        return self.compute_dtype or self.upsample.weight.dtype

    def forward(self, head_input: Tensor, attention_mask: Tensor | None, *taps: Tensor,
                past_attention_mask: Tensor | None = None, past: list[Tensor] | None = None
                ) -> Tensor | tuple[Tensor, ...]:
        """The head's new input; with `past` (a KV-cached decode step, qgraph.decode), (the head's new input,
        *present): past holds every block's keys and values of the tokens before these, [k_0, v_0, k_1, ...]
        (B, heads, P, head_dim), past_attention_mask (B, P) their mask, and present the same with these tokens
        appended (P + T)."""
        if past is not None:
            if past_attention_mask is None or attention_mask is None:
                raise ValueError("past keys and values need past_attention_mask and attention_mask: the mask of "
                                 "the tokens before these, and of these")
            attention_mask = torch.cat([past_attention_mask, attention_mask], 1)
        side, modulation, present = self._side_outputs(attention_mask, taps, past)
        side = side.to(head_input.dtype)
        if self.config.mix == "residual":
            mixed = head_input + side
        else:
            mixed = self.mix * head_input + (1 - self.mix) * side
            if modulation is not None:
                mixed = mixed + head_input * modulation.to(head_input.dtype)
            mixed = mixed.to(head_input.dtype)
        return mixed if past is None else (mixed, *present)


def side_network_call(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's call of its side network (attach_side_taps' call_module node), or None where it has none."""
    return next(iter(gm.graph.find_nodes(op="call_module", target=SIDE_MODULE)), None)


def side_network(qm: nn.Module) -> SideNetwork:
    """The side network inside a module that a QST plan (attach_side_taps) made."""
    side = getattr(getattr(qm, "graph_module", None), SIDE_MODULE, None)
    if not isinstance(side, SideNetwork):
        plan = getattr(getattr(qm, "plan", None), "name", None)
        raise QGraphError(f"this module has no QST side network (plan {plan!r}); transform the model with a plan "
                          "that runs attach_side_taps, such as 'qst-nf4'")
    return side
