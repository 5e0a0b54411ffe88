"""Speed, side by side in one process: training steps in fp32 and bf16 against the peers, and greedy generation
against transformers (issue 15's table).

    python tools/bench_speed.py --out out/bench_speed

Every configuration is built first; then each round times one step (or one generation) of every configuration
in turn, so the machine's drift between processes and over minutes falls on all of them alike. Each figure
is the median over the timed rounds, after one untimed warm-up round; ratios are quoted as "x faster" than
the peer named in the row, with the issue's target beside them (checked here, not in tests).

Training (SmolLM2-135M, batch x block tokens of the pydoc text, AdamW): lrqat-w4 (qgraph), torchao's
full-model QAT (IntxFakeQuantizeConfig int4 per channel), qst-nf4 (qgraph), PEFT + bitsandbytes QLoRA (r=16,
every decoder linear), each in float32 and in bfloat16: qgraph's through `transform(..., dtype=torch.bfloat16)`
on the float32 model, the peers on `model.to(torch.bfloat16)` (bitsandbytes computing in the model's dtype);
and in mixed precision, "amp-bf16": the float32 model's steps under `torch.autocast("cpu", torch.bfloat16)`
(bf16 matmuls, float32 residual stream and master weights), as the HF Trainer's `bf16=True` runs them.
Generation: the same prompt (prompt tokens of the held-out text) and greedy new tokens from qgraph's nf4
module (KV-cached decode graph) and transformers + bitsandbytes NF4 `generate`; from qgraph's finalized
lrqat-w4 (int4) and transformers' float32 `generate`; qgraph's nf4 without its KV cache for scale. qgraph's
generations run the fused bf16 kernels `generate` uses (qgraph.ops.fused_inference); the int4 one is checked
against the same module's float32 generation (`fused_kernels=False`), nf4 against transformers +
bitsandbytes, which runs the same kernel. The table says whether each pair gave the same tokens.
`--compiled` adds each qgraph training configuration with `transform(..., compile=True)` ("fp32-compiled",
"bf16-compiled"), compiled with inductor's caches off so that its first step (the warm-up round, compile
included) is a cold compile; the table gives that first step against the issue's limit.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))

from benchlib import (SEED, check_writable, int_at_least, mixed_precision, positive_int,  # noqa: E402
                      sequence_length, train_step, write_json)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILED = "-compiled"  # a training precision's suffix for transform(..., compile=True)
COMPILABLE = ("lrqat-w4", "qst-nf4")  # qgraph's configurations (the peers are not compiled)
MIXED = {"amp-bf16": torch.bfloat16}  # training precisions: the float32 model under autocast in this dtype
TRAIN_CONFIGS = ("lrqat-w4", "torchao-qat", "qst-nf4", "qlora")
GEN_CONFIGS = ("qgraph-nf4", "transformers-bnb-nf4", "qgraph-int4", "transformers-fp32", "qgraph-nf4-nocache")


@dataclass(frozen=True)
class Target:
    """One row of the issue's table: `config` against `peer`, "x faster" (time ratio), at least `least`."""

    label: str
    config: str
    peer: str
    least: float


TARGETS = (
    Target("lrqat-w4 bf16 vs fp32 step", "lrqat-w4/bf16", "lrqat-w4/fp32", 2.5),
    Target("lrqat-w4 mixed bf16 (autocast) vs fp32 step", "lrqat-w4/amp-bf16", "lrqat-w4/fp32", 2.5),
    Target("lrqat-w4 bf16 vs torchao QAT bf16", "lrqat-w4/bf16", "torchao-qat/bf16", 2.0),
    Target("lrqat-w4 compiled vs eager step, fp32", "lrqat-w4/fp32-compiled", "lrqat-w4/fp32", 1.3),
    Target("lrqat-w4 bf16 vs fp32 step, both compiled", "lrqat-w4/bf16-compiled", "lrqat-w4/fp32-compiled", 2.5),
    Target("qst-nf4 vs QLoRA, bf16", "qst-nf4/bf16", "qlora/bf16", 2.0),
    Target("qst-nf4 vs QLoRA, fp32", "qst-nf4/fp32", "qlora/fp32", 1.8),
    Target("nf4 greedy generation vs transformers + bitsandbytes", "qgraph-nf4", "transformers-bnb-nf4", 1.0),
    Target("finalized int4 generation vs transformers fp32 generate", "qgraph-int4", "transformers-fp32", 1.0),
)
FIRST_STEP_LIMIT = 120.0  # seconds: a compiled configuration's first step, compile included (issue 15)
# qgraph-int4 runs generate's fused bf16 kernel; its reference, the float32 unpack that training's forward uses
SAME_TOKENS = {"qgraph-nf4": "transformers-bnb-nf4", "qgraph-int4": "qgraph-int4-float32-reference",
               "qgraph-nf4-nocache": "qgraph-nf4"}


@dataclass
class Report:
    settings: dict[str, int | str]
    seconds: dict[str, list[float]] = field(default_factory=dict)  # per configuration, one per timed round
    first: dict[str, float] = field(default_factory=dict)  # per training configuration, the warm-up step
    same_tokens: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def median(self, config: str) -> float:
        return statistics.median(self.seconds[config])


# --- building ---------------------------------------------------------------------------------------------


def smollm2() -> torch.nn.Module:
    """SmolLM2-135M in float32, as qgraph.models loads it."""
    from qgraph.models import load_smollm2

    model, _ = load_smollm2(progress=False)
    return model


def dtype_option(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transform's keyword for training in `dtype` from the float32 model: none for float32."""
    return {} if dtype == torch.float32 else {"dtype": dtype}


def build_training(config: str, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                   compile: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(module, optimizer) of a training configuration over the float32 `model` (which it may change in place),
    training in `dtype`: qgraph's through transform(dtype=, compile=), the peers on `model.to(dtype)`."""
    import qgraph
    from bench_lrqat import torchao_qat
    from bench_qst import lora
    from qgraph.side_network import SIDE_NETWORK_LR

    if compile and config not in COMPILABLE:
        raise ValueError(f"{config} is a peer, not compiled here; compiled configurations: {', '.join(COMPILABLE)}")
    options = {**dtype_option(dtype), "compile": compile}  # transform's keywords
    if config == "lrqat-w4":
        qm = qgraph.transform(model, "lrqat-w4", kv_cache=False, **options)
        return qm, torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=1e-3, lr_s=1e-5), betas=(0.9, 0.95))
    if config == "qst-nf4":
        qm = qgraph.transform(model, "qst-nf4", kv_cache=False, **options)
        return qm, torch.optim.AdamW(qm.trainable_parameters(), lr=SIDE_NETWORK_LR, betas=(0.9, 0.95),
                                     weight_decay=0.0)
    if config == "torchao-qat":
        return torchao_qat(model.to(dtype), checkpointing=False)
    if config == "qlora":
        return lora(model.to(dtype), quantize=True, checkpointing=False)
    raise ValueError(f"unknown training configuration {config!r}; choose from {', '.join(TRAIN_CONFIGS)}")


def build_generators(load: Callable[[], torch.nn.Module], prompt: torch.Tensor,
                     new_tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Configuration -> a call that generates `new_tokens` greedy tokens after `prompt` (1, T); `load()` gives a
    fresh float32 copy of the model."""
    import qgraph
    from bench_qst import decoder_linears, to_bnb_nf4

    mask = torch.ones_like(prompt)
    nf4 = qgraph.transform(load(), "nf4")
    int4 = qgraph.finalize(qgraph.transform(load(), "lrqat-w4"))
    bnb_model = load()
    to_bnb_nf4(bnb_model, decoder_linears(bnb_model))
    fp32_model = load()

    def hf(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        model.eval()
        return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    def qgraph_generate(qm: torch.nn.Module, use_cache: bool = True, fused: bool = True) -> Callable[[], torch.Tensor]:
        return lambda: qm.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, use_cache=use_cache,
                                   fused_kernels=fused)

    return {
        "qgraph-nf4": qgraph_generate(nf4),
        "transformers-bnb-nf4": hf(bnb_model),
        "qgraph-int4": qgraph_generate(int4),
        "qgraph-int4-float32-reference": qgraph_generate(int4, fused=False),
        "transformers-fp32": hf(fp32_model),
        "qgraph-nf4-nocache": qgraph_generate(nf4, use_cache=False),
    }


# --- measuring --------------------------------------------------------------------------------------------


def timed(call: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def training_rounds(report: Report, args: argparse.Namespace, progress: Progress) -> None:
    from qgraph.data import batches, token_blocks, train_heldout_split
    from qgraph.models import load_smollm2

    _, tokenizer = load_smollm2(progress=False)
    train_text, _ = train_heldout_split()
    blocks = token_blocks(train_text, tokenizer, args.block_len)
    stream = list(batches(blocks, args.batch_size, seed=SEED, steps=args.rounds + 1))
    modules = {}  # name -> (module, optimizer, autocast dtype or None)
    variants = training_variants(args.train, args.dtypes, args.compiled)
    task = progress.add_task("building training configurations", total=len(variants))
    for config, dtype_name in variants:
        torch.manual_seed(SEED)
        precision = dtype_name.removesuffix(COMPILED)
        model_dtype = DTYPES.get(precision, torch.float32)  # a MIXED precision trains the float32 model
        built = build_training(config, smollm2(), model_dtype, compile=dtype_name.endswith(COMPILED))
        modules[f"{config}/{dtype_name}"] = (*built, MIXED.get(precision))
        progress.advance(task)
    task = progress.add_task("training steps, every configuration in turn", total=len(stream) * len(modules))
    for round_index, input_ids in enumerate(stream):
        for name, (module, optimizer, autocast_dtype) in modules.items():
            module.train()
            with mixed_precision(autocast_dtype):
                seconds, _ = timed(lambda: train_step(module, optimizer, input_ids))
            if round_index:  # round 0 warms up (allocator, first-call caches, compiles)
                report.seconds.setdefault(name, []).append(seconds)
            else:
                report.first[name] = seconds
            progress.advance(task)
    modules.clear()
    gc.collect()


def training_variants(configs: list[str], dtypes: list[str], compiled: bool) -> list[tuple[str, str]]:
    """(configuration, precision) pairs to build, in order: each precision, then (with `compiled`) each model
    dtype compiled, for qgraph's configurations."""
    variants = [(config, dtype) for dtype in dtypes for config in configs]
    if compiled:
        variants += [(config, dtype + COMPILED) for dtype in dtypes if dtype in DTYPES
                     for config in configs if config in COMPILABLE]
    return variants


def generation_rounds(report: Report, args: argparse.Namespace, progress: Progress) -> None:
    from qgraph.data import token_blocks, train_heldout_split
    from qgraph.models import load_smollm2

    _, tokenizer = load_smollm2(progress=False)
    _, heldout_text = train_heldout_split()
    prompt = token_blocks(heldout_text, tokenizer, args.prompt_tokens)[0][None]
    task = progress.add_task("building generation configurations", total=1)
    generators = build_generators(smollm2, prompt, args.new_tokens)
    progress.advance(task)
    outputs: dict[str, torch.Tensor] = {}
    task = progress.add_task("greedy generation, every configuration in turn",
                             total=(args.gen_rounds + 1) * len(generators))
    with torch.no_grad():
        for round_index in range(args.gen_rounds + 1):
            for name, generate in generators.items():
                seconds, outputs[name] = timed(generate)
                if round_index:
                    report.seconds.setdefault(name, []).append(seconds)
                progress.advance(task)
    for name, reference in SAME_TOKENS.items():
        if name in outputs and reference in outputs:
            report.same_tokens[name] = torch.equal(outputs[name], outputs[reference])


QST_SPLIT = ("step", "side network", "head + loss", "optimizer", "backbone forward", "nf4 forward (logits)")


def build_qst_split(model: torch.nn.Module, nf4_model: torch.nn.Module, dtype: torch.dtype,
                    input_ids: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Part -> a call that runs that part of a qst-nf4 training step on `input_ids` alone: the side network's
    and the head's (with its low-rank delta, `qm.head_loss`) forward and backward replayed on the inputs they got
    in a real step, the optimizer step, the whole step; and the plain nf4 plan's forward (with its logits) for
    the backbone's cost without QST. The backbone's forward inside the step is what the step leaves when the
    other parts are taken out."""
    import qgraph
    from qgraph.side_network import side_network

    qm, optimizer = build_training("qst-nf4", model, dtype)
    qm.train()
    cast = dtype_option(dtype)
    nf4 = qgraph.transform(nf4_model, "nf4", kv_cache=False, **cast)
    side = side_network(qm)
    seen: dict[str, object] = {}
    handle = side.register_forward_hook(lambda module, args, out: seen.update(args=args, out=out))
    train_step(qm, optimizer, input_ids)  # a real step: the side network's inputs and output
    handle.remove()
    side_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in seen["args"]]
    head_input = seen["out"].detach().requires_grad_()
    side_grad = torch.randn_like(head_input)

    def side_step() -> None:
        side(*side_args).backward(side_grad)

    def head_step() -> None:
        qm.head_loss(head_input, input_ids).backward()

    def optimizer_step() -> None:
        for param in qm.trainable_parameters():  # the step's gradients, as after a backward
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def nf4_forward() -> None:
        with torch.no_grad():
            nf4(input_ids=input_ids)

    return {"step": lambda: train_step(qm, optimizer, input_ids), "side network": side_step,
            "head + loss": head_step, "optimizer": optimizer_step, "nf4 forward (logits)": nf4_forward}


def qst_split_rounds(report: Report, args: argparse.Namespace, progress: Progress) -> None:
    from qgraph.data import batches, token_blocks, train_heldout_split
    from qgraph.models import load_smollm2

    _, tokenizer = load_smollm2(progress=False)
    train_text, _ = train_heldout_split()
    input_ids = next(iter(batches(token_blocks(train_text, tokenizer, args.block_len), args.batch_size, seed=SEED,
                                  steps=1)))
    for dtype_name in (d for d in args.dtypes if d in DTYPES):  # the split of a model in one dtype
        parts = build_qst_split(smollm2(), smollm2(), DTYPES[dtype_name], input_ids)
        task = progress.add_task(f"qst-nf4 step split ({dtype_name})", total=(args.rounds + 1) * len(parts))
        for round_index in range(args.rounds + 1):
            for part, call in parts.items():
                seconds, _ = timed(call)
                if round_index:
                    report.seconds.setdefault(f"qst-split/{dtype_name}/{part}", []).append(seconds)
                progress.advance(task)
        parts.clear()
        gc.collect()


def split_table(report: Report) -> list[str]:
    """The qst-nf4 step taken apart, per dtype: median seconds and the share of the step."""
    dtypes = [d for d in DTYPES if f"qst-split/{d}/step" in report.seconds]
    if not dtypes:
        return []
    rows = ["", "| qst-nf4 step, part | " + " | ".join(f"{d} (s) | {d} share" for d in dtypes) + " |",
            "|---|" + "---:|---:|" * len(dtypes)]
    medians = {d: {part: report.median(f"qst-split/{d}/{part}") for part in QST_SPLIT if part != "backbone forward"}
               for d in dtypes}
    for d in dtypes:
        parts = medians[d]
        parts["backbone forward"] = parts["step"] - parts["side network"] - parts["head + loss"] - parts["optimizer"]
    for part in QST_SPLIT:
        cells = [f"{medians[d][part]:.3f} | {medians[d][part] / medians[d]['step']:.0%}" for d in dtypes]
        rows.append(f"| {part} | " + " | ".join(cells) + " |")
    return rows


# --- the table --------------------------------------------------------------------------------------------


def tokens_per_second(report: Report, config: str) -> float:
    return int(report.settings["new_tokens"]) / report.median(config)


def markdown_table(report: Report) -> str:
    rows = ["| row | configuration | peer | configuration (s) | peer (s) | x faster | target | met |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for target in TARGETS:
        if target.config not in report.seconds or target.peer not in report.seconds:
            continue
        mine, theirs = report.median(target.config), report.median(target.peer)
        ratio = theirs / mine
        same = report.same_tokens.get(target.config)
        met = "yes" if ratio >= target.least and same is not False else "no"
        if same is False:
            met += " (different tokens)"
        rows.append(f"| {target.label} | {target.config} | {target.peer} | {mine:.3f} | {theirs:.3f} | "
                    f"{ratio:.2f}x | >= {target.least:g}x | {met} |")
    compiled = [c for c in report.first if c.endswith(COMPILED)]
    if compiled:
        rows += ["", "| compiled configuration | first step, compile included (s) | target | met |", "|---|---:|---:|---|"]
        for config in compiled:
            met = "yes" if report.first[config] <= FIRST_STEP_LIMIT else "no"
            rows.append(f"| {config} | {report.first[config]:.1f} | <= {FIRST_STEP_LIMIT:g} s | {met} |")
    generation = [c for c in GEN_CONFIGS if c in report.seconds]
    if generation:
        rows += ["", "| generation | tokens/s | same tokens as |", "|---|---:|---|"]
        for config in generation:
            same = report.same_tokens.get(config)
            check = "" if same is None else f"{SAME_TOKENS[config]}: {'yes' if same else 'NO'}"
            rows.append(f"| {config} | {tokens_per_second(report, config):.1f} | {check} |")
    return "\n".join(rows + split_table(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="*", default=list(TRAIN_CONFIGS), choices=TRAIN_CONFIGS)
    parser.add_argument("--dtypes", nargs="+", default=[*DTYPES, *MIXED], choices=[*DTYPES, *MIXED],
                        help="training precisions: a model dtype, or amp-bf16 (the float32 model under autocast)")
    parser.add_argument("--rounds", type=positive_int, default=4, help="timed training rounds (after one warm-up)")
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--block-len", type=sequence_length, default=128)
    parser.add_argument("--compiled", action="store_true",
                        help="also train qgraph's configurations with compile=True (inductor's caches off: each first "
                             "step is a cold compile)")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--qst-split", action="store_true",
                        help="also take a qst-nf4 step apart (side network, head and loss, optimizer, backbone)")
    parser.add_argument("--gen-rounds", type=positive_int, default=3,
                        help="timed generation rounds (after one warm-up)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_speed"))
    args = parser.parse_args(argv)
    check_writable(parser, args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compiled:
        torch.compiler.config.force_disable_caches = True  # a first step that says what a fresh machine pays
    settings = {"batch_size": args.batch_size, "block_len": args.block_len, "rounds": args.rounds,
                "gen_rounds": args.gen_rounds, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(), "device": "cpu"}
    report = Report(settings)
    console = Console()
    with Progress(console=console) as progress:
        if args.train:
            training_rounds(report, args, progress)
        if args.qst_split:
            qst_split_rounds(report, args, progress)
        if not args.no_generation:
            generation_rounds(report, args, progress)
    table = markdown_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table + "\n")
    write_json(args.out / "results.json", asdict(report))
    console.print(table, markup=False, highlight=False)


if __name__ == "__main__":
    main()
