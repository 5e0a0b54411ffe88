"""Token-by-token decoding: `qm.generate(input_ids, max_new_tokens=...)`.

A module that offers a KV-cached session (`decode_session()`, qgraph.decode: a transformed causal LM) runs
the prompt once and then one token per step. Any other runs the whole sequence so far at every step and
reads the last position's logits: quadratic in length, but exact, and the same tokens.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qgraph.errors import QGraphError
from qgraph.inputs import is_int, scalar
from qgraph.ops.fused_inference import fused_inference


# as transformers' generate warns: a row whose prompt ends in padding continues after the padding, so its new
# tokens follow pad tokens the mask hides, not the prompt's last token at its own position
RIGHT_PADDING_WARNING = ("a prompt row ends in padding (attention_mask[:, -1] == 0): its tokens are generated after "
                         "the padding, unlike the same prompt alone; pad on the left for generation "
                         "(tokenizer.padding_side = 'left')")


def generate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    fused_kernels: bool = True,
) -> Tensor:
    """input_ids (B, T) followed by up to `max_new_tokens` tokens each: (B, T + n).

    Greedy unless `do_sample` (softmax of logits / temperature, optionally over the top_k only).
    A row that produced `eos_token_id` (one id, or a list as Hugging Face generation configs hold) gets
    `pad_token_id` (default: the first eos id) after it; decoding stops early once every row has. The
    model runs in eval mode and inference mode, and comes back in its mode.
    use_cache=False recomputes the whole sequence per token even where the model offers a KV cache.
    fused_kernels: NF4 and int4 layers run on fused CPU kernels that compute in bf16 where they apply
    (qgraph.ops.fused_inference: bitsandbytes' for NF4, as transformers + bitsandbytes' `generate` runs it;
    torch's int4 packed matmul for finalized layers); False decodes each weight to float32 as training does.
    """
    _check_arguments(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k)
    eos = _token_ids("eos_token_id", eos_token_id, model, input_ids.device)
    pad = _pad_id(pad_token_id, eos, model) if len(eos) else None  # without eos no row is ever padded
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape[1] and not bool(attention_mask[:, -1].all()):  # one host sync
        warnings.warn(RIGHT_PADDING_WARNING, stacklevel=2)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the first cached generation captures its decode graph: not in inference mode
            session = _session(model) if use_cache else RecomputeSession(model)
        # inference mode, not only no_grad: an op call then skips the autograd layer, which is most of what
        # a one-token step of small matmuls costs beyond its arithmetic
        with torch.inference_mode(), fused_inference(fused_kernels):
            logits = session.start(input_ids, attention_mask) if max_new_tokens else None
            for step in range(max_new_tokens):
                token = _pick(logits.float(), do_sample, temperature, top_k, generator)
                if len(eos):
                    token = torch.where(finished, pad, token)
                    finished |= torch.isin(token, eos)
                input_ids = torch.cat([input_ids, token[:, None]], dim=1)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                logits = session.step(token)
    finally:
        model.train(was_training)
    return input_ids.clone()  # a tensor made in inference mode cannot enter autograd or change in place


class Session(Protocol):
    """Next-token logits (B, V) for a prompt, then for each token appended to every row."""

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def step(self, tokens: Tensor) -> Tensor: ...


def _session(model: nn.Module) -> Session:
    # asked by attribute, not class: qgraph.module imports this module for its `generate` method
    decode_session = getattr(model, "decode_session", None)
    session = decode_session() if decode_session is not None else None
    return session if session is not None else RecomputeSession(model)


class RecomputeSession:
    """No cache: every step runs the whole sequence so far."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.input_ids: Tensor | None = None
        self.attention_mask: Tensor | None = None

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self.input_ids, self.attention_mask = input_ids, attention_mask
        return self._logits()

    def step(self, tokens: Tensor) -> Tensor:
        self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens[:, None])], dim=1)
        return self._logits()

    def _logits(self) -> Tensor:
        # a transformed Hugging Face model (HFQGraphModule) runs its head on the last position alone
        next_token_logits = getattr(self.model, "next_token_logits", None)
        if next_token_logits is not None:
            return next_token_logits(self.input_ids, self.attention_mask)
        return self.model(input_ids=self.input_ids, attention_mask=self.attention_mask).logits[:, -1]


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _check_arguments(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                     do_sample: bool, temperature: float, top_k: int | None) -> None:
    require_causal_lm = getattr(model, "require_causal_lm", None)
    if require_causal_lm is not None:
        require_causal_lm("generate needs")
    # a transformed model checks its inputs as its forward does (dtype, shape, mask, token range), before a
    # decode graph or a fused kernel sees them: an empty prompt reaches bitsandbytes' CPU kernel as a division
    # by zero that kills the process
    check_inputs = getattr(model, "check_inputs", None)
    if check_inputs is not None:
        check_inputs(input_ids, attention_mask)
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    info: Any = getattr(model, "info", None)
    if input_ids.dim() != 2:
        raise QGraphError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise TypeError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    limit = getattr(info, "max_seq_len", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise QGraphError(f"{input_ids.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                          f"{limit} positions the model was captured with; shorten the prompt or generate fewer")
    if isinstance(temperature, bool) or not isinstance(scalar(temperature), numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if do_sample and not scalar(temperature) > 0:  # greedy reads no temperature, as in transformers
        raise QGraphError(f"temperature must be positive, got {temperature!r} (do_sample=False for greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise TypeError(f"top_k must be a positive integer or None, got {top_k!r}")


def _is_int(value: object) -> bool:
    """An integer (Python, numpy, a one-element integer tensor), and not a bool."""
    return is_int(scalar(value))


def _pad_id(pad_token_id: object, eos: Tensor, model: nn.Module) -> Tensor:
    """What a finished row gets: `pad_token_id`, or the first eos id."""
    if pad_token_id is None:
        return eos[0]
    return _token_ids("pad_token_id", pad_token_id, model, eos.device, single=True)[0]


def _token_ids(name: str, value: object, model: nn.Module, device: torch.device, *,
               single: bool = False) -> Tensor:
    """`value` (an id, a list of ids with `single` False, or None) as a 1-D tensor, each id checked against the
    model's vocabulary: a pad id is fed back to the model, and an id outside it (LLaMA-1 configs ship
    pad_token_id=-1) would fail inside the embedding after tokens were already generated."""
    ids = [] if value is None else [value] if _is_int(value) else value
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or (single and len(ids) != 1) or not all(map(_is_int, ids)):
        kind = "an integer token id" if single else "an integer token id or a list of them"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    ids = [int(scalar(token)) for token in ids]
    vocab_size = getattr(getattr(getattr(model, "info", None), "config", None), "vocab_size", None)
    if vocab_size is not None:
        for token in ids:
            if not 0 <= token < vocab_size:
                raise QGraphError(f"{name}={token} is outside the model's vocabulary (0..{vocab_size - 1}); pass an "
                                  "id of its tokenizer (tokenizer.eos_token_id, or the eos id for padding)")
    return torch.tensor(ids, dtype=torch.int64, device=device)
