"""Data-parallel training of a transformed model: DDP or FSDP2, one process per rank.

    torchrun --nproc-per-node 2 tools/train_distributed.py --strategy ddp fsdp2 --out out/dist
    accelerate launch --multi-gpu --num-processes 2 tools/train_distributed.py --strategy fsdp2 --out out/dist
    python tools/train_distributed.py --out out/dist              # one rank, no process group

Every rank builds the same model (same seed), transforms it with `--plan`, and trains it for
`--steps` steps on the same seeded token batches; each step's `--global-batch` rows are split evenly
across the ranks, so N ranks compute the gradient of the same loss as one rank (every row has the same
number of tokens, and both strategies average gradients over ranks). Rank 0 writes `<out>/<strategy>.pt`
(the trainable tensors, full-size; the global loss of every step; what FSDP2 sharded and how many bytes
it all-gathered per step), which tests/test_distributed.py compares with a one-rank run.

Backend: nccl with one GPU per rank when CUDA is present, gloo on CPUs.

DDP wraps the QGraphModule as it is: every trainable tensor (LR-QAT's A, B, s; a QST side network) takes
part in every step, so find_unused_parameters stays off.

FSDP2 shards the QGraphModule as one unit: `fully_shard(qm, ignored_params=<frozen parameters>)`.
Per-block sharding (`fully_shard` on each decoder layer) cannot work on a transformed model: its graph
reads the layers' parameters through get_attr and never calls the layer modules, so FSDP2's pre-forward
hooks on them never fire, and the graph meets the still-sharded DTensors ("aten.mul.Tensor got mixed
torch.Tensor and DTensor"). Sharding the root costs little here: only the trainable tensors are
sharded and all-gathered, and LR-QAT's are small (r*(in+out) per linear against in*out frozen). The frozen 4-bit weights are
buffers, which FSDP2 never shards; the other frozen parameters (embeddings, norms, head) are ignored,
so every rank keeps its own replica and nothing frozen is all-gathered, reduced or kept in optimizer state.
The default plan is lrqat-w4; --plan qst-nf4 works too (its side network is sharded the same way, but for
the 0-dim output mix, which fully_shard refuses: it stays whole, its gradient averaged by an all-reduce).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

import qgraph
from qgraph.models import MODEL_SPECS, TINY_SPECS, check_model_spec, resolve_model, tiny_causal_lm
from qgraph.train import default_optimizer, train_causal_lm

sys.path.insert(0, str(Path(__file__).parent))  # benchlib, a sibling, also when the tests load this file by path

from benchlib import check_writable, plan_name, positive_int, sequence_length  # noqa: E402

STRATEGIES = ("none", "ddp", "fsdp2")
TINY_MODEL = "tiny-llama"
FIRST_ORDINARY_TOKEN = 3  # ids 0-2 are pad, bos and eos in the tiny models


@dataclass
class Replica:
    """Where this process sits: its rank among `world_size` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


@dataclass
class TrainResult:
    """What a run leaves to compare: full-size trainable tensors, the global loss of every step, and
    for FSDP2 which parameters it sharded and how many bytes it all-gathered per step."""

    strategy: str
    world_size: int
    trainable: dict[str, torch.Tensor]
    losses: list[float]
    sharded: list[str] = field(default_factory=list)
    not_sharded: list[str] = field(default_factory=list)
    all_gathered_bytes_per_step: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_spec(text: str) -> str:
    """An argparse type: a model the qgraph CLI takes (qgraph.models.resolve_model), checked before any loading."""
    try:
        check_model_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_model(model: str, seed: int) -> nn.Module:
    """A tiny model seeded with `seed` (the tests' tiny Llama by default), or what resolve_model gives for
    smollm2 or a checkpoint directory."""
    if model in TINY_SPECS:  # resolve_model's tiny models are seed 0; here every seed draws its own
        return tiny_causal_lm(TINY_SPECS[model], layers=2, hidden=64, vocab=256, seed=seed)
    return resolve_model(model)[0]


def global_batches(steps: int, global_batch: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """The same token batches on every rank: one generator, seeded, drawn in step order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_ORDINARY_TOKEN, vocab, (global_batch, seq_len), generator=generator)
            for _ in range(steps)]


def rank_rows(batch: torch.Tensor, replica: Replica) -> torch.Tensor:
    """This rank's contiguous share of a global batch's rows."""
    if batch.shape[0] % replica.world_size:
        raise ValueError(f"--global-batch {batch.shape[0]} does not split evenly over {replica.world_size} ranks; "
                         "pick a multiple of the number of processes")
    rows = batch.shape[0] // replica.world_size
    return batch[replica.rank * rows:(replica.rank + 1) * rows]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one full-size CPU tensor; a sharded DTensor is all-gathered (a collective: every
    rank must call this for the same tensors in the same order)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p) for name, p in module.named_parameters() if p.requires_grad}


def global_losses(losses: list[float], replica: Replica) -> list[float]:
    """The mean over ranks of each step's loss: the loss of the whole global batch, since every rank's
    rows hold the same number of tokens."""
    values = torch.tensor(losses, dtype=torch.float64, device=replica.device)
    if replica.distributed:
        dist.all_reduce(values)
        values /= replica.world_size
    return values.tolist()


@contextlib.contextmanager
def counting_all_gathered_bytes() -> Iterator[list[int]]:
    """Count the bytes FSDP2 all-gathers (it calls torch.distributed.all_gather_single); yields a list
    whose one element grows. Measures that frozen tensors are not all-gathered: a count of 0 means FSDP2
    gathered by another route and the measurement is void, which the caller must treat as a failure."""
    total = [0]
    original = dist.all_gather_single

    def counted(output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs):
        total[0] += output_tensor.numel() * output_tensor.element_size()
        return original(output_tensor, input_tensor, *args, **kwargs)

    dist.all_gather_single = counted
    try:
        yield total
    finally:
        dist.all_gather_single = original


def shard_with_fsdp2(qm: nn.Module) -> nn.Module:
    """FSDP2 over the whole QGraphModule (see the module docstring). Left whole on every rank: the frozen
    parameters, and the trainable 0-dim ones, which fully_shard refuses (QST's output mix); those
    get their gradients averaged over the ranks by hand, as FSDP2 would have."""
    from torch.distributed.fsdp import fully_shard

    frozen = {p for p in qm.parameters() if not p.requires_grad}
    scalars = {p for p in qm.parameters() if p.requires_grad and p.dim() == 0}
    for parameter in scalars:
        parameter.register_post_accumulate_grad_hook(average_gradient_over_ranks)
    return fully_shard(qm, ignored_params=frozen | scalars)


def average_gradient_over_ranks(parameter: torch.Tensor) -> None:
    dist.all_reduce(parameter.grad)  # a sum: gloo has no ReduceOp.AVG
    parameter.grad /= dist.get_world_size()


def sharding_of(module: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the parameters and buffers held as DTensors, names of the others)."""
    from torch.distributed.tensor import DTensor

    tensors = [*module.named_parameters(), *module.named_buffers()]
    sharded = [name for name, t in tensors if isinstance(t, DTensor)]
    return sharded, [name for name, t in tensors if not isinstance(t, DTensor)]


def train(strategy: str, qm: nn.Module, batches: list[torch.Tensor], replica: Replica,
          console: Console | None = None) -> TrainResult:
    """Train `qm` (a transformed model, in place) on this rank's share of `batches`, wrapped for `strategy`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy != "none" and not replica.distributed:
        raise RuntimeError(f"--strategy {strategy} needs a process group: launch with torchrun or accelerate launch")
    if strategy == "none" and replica.world_size > 1:
        raise ValueError("strategy 'none' trains one rank; use ddp or fsdp2 with several processes")
    local_batches = [rank_rows(batch, replica).to(replica.device) for batch in batches]
    console = console or Console(quiet=replica.rank != 0)
    result = TrainResult(strategy, replica.world_size, {}, [])
    if strategy == "fsdp2":
        model = shard_with_fsdp2(qm)
        result.sharded, result.not_sharded = sharding_of(model)
        optimizer = default_optimizer(qm)  # after fully_shard: it swapped in sharded parameters
        with counting_all_gathered_bytes() as gathered:
            losses = train_causal_lm(model, local_batches, optimizer, steps=len(batches), console=console,
                                     description=f"fsdp2 rank {replica.rank}")
        result.all_gathered_bytes_per_step = gathered[0] // max(len(batches), 1)
    else:
        optimizer = default_optimizer(qm)
        model = qm
        if strategy == "ddp":
            device_ids = [replica.device.index] if replica.device.type == "cuda" else None
            # forward_sync_buffers=False: the buffers are the frozen 4-bit weights, equal on every rank
            # (DDP copies rank 0's once, at init) and would otherwise send them all again
            # before every forward. find_unused_parameters stays off: every trainable tensor is used
            # every step (DDP raises on the next step if one is not).
            model = nn.parallel.DistributedDataParallel(qm, device_ids=device_ids, forward_sync_buffers=False)
        losses = train_causal_lm(model, local_batches, optimizer, steps=len(batches), console=console,
                                 description=f"{strategy} rank {replica.rank}")
    result.losses = global_losses(losses, replica)
    result.trainable = trainable_state(qm)
    return result


def transformed(model_name: str, plan: str, seed: int, device: torch.device) -> nn.Module:
    """The same transformed model on every rank: seeded model and seeded trainable-tensor init (FSDP2,
    unlike DDP, does not broadcast rank 0's initial values)."""
    torch.manual_seed(seed)
    model = build_model(model_name, seed).to(device)
    return qgraph.transform(model, plan)


def fresh_copy(qm: nn.Module) -> nn.Module:
    """A copy to train with the next strategy; cheaper than transforming again."""
    with warnings.catch_warnings():  # torch's own pytree specs warn about a deprecated alias when copied
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(qm)


def start_process_group() -> Replica:
    """Join the process group torchrun / accelerate launch describe in the environment, if any."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Replica(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Replica(dist.get_rank(), dist.get_world_size(), device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", nargs="+", choices=STRATEGIES, default=None,
                        help="one or more, run in turn on a fresh copy of the model (default: ddp when "
                             "launched on several processes, none on one)")
    parser.add_argument("--model", type=model_spec, default=TINY_MODEL,
                        help=f"{', '.join(MODEL_SPECS)} (as the qgraph CLI takes them; {TINY_MODEL} by default), "
                             "or a local Hugging Face model directory")
    parser.add_argument("--plan", type=plan_name, default="lrqat-w4")
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--global-batch", type=positive_int, default=4, help="rows per step over all ranks together")
    parser.add_argument("--seq-len", type=sequence_length, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory for <strategy>.pt, written by rank 0")
    args = parser.parse_args(argv)
    if args.out is not None:
        check_writable(parser, args.out, "--out")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    replica = start_process_group()
    strategies = args.strategy or (["ddp"] if replica.distributed else ["none"])
    try:
        base = transformed(args.model, args.plan, args.seed, replica.device)
        vocab = base.info.config.vocab_size
        batches = global_batches(args.steps, args.global_batch, args.seq_len, vocab, args.seed)
        for strategy in strategies:
            qm = fresh_copy(base) if len(strategies) > 1 else base
            result = train(strategy, qm, batches, replica)
            if replica.rank == 0:
                summary = f"{strategy}: {replica.world_size} rank(s), losses {[round(v, 5) for v in result.losses]}"
                if result.all_gathered_bytes_per_step is not None:
                    summary += (f", {len(result.sharded)} tensors sharded, "
                                f"{result.all_gathered_bytes_per_step} bytes all-gathered per step")
                print(summary, flush=True)
                if args.out is not None:
                    args.out.mkdir(parents=True, exist_ok=True)
                    torch.save(result.to_dict(), args.out / f"{strategy}.pt")
    finally:
        if replica.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
