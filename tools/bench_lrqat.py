"""LR-QAT against its peers on SmolLM2-135M: peak memory by category, step time, held-out perplexity.

Every configuration runs in its own process (so peak RSS is its own), on the same batches:
    python tools/bench_lrqat.py --steps 200 --out out/bench_lrqat
writes results.json, results.md (the README table) and memory_time.png. One configuration alone:
    python tools/bench_lrqat.py --run lrqat-w4 --steps 20 --json /tmp/lrqat.json

Variants: lrqat-w4-packed (Phi0 as int-packed codes), lrqat-w4-nockpt (no checkpoint boundaries:
every activation kept, nothing recomputed), lrqat-w4-bf16 (transform(dtype=torch.bfloat16): the whole model
in bf16), lrqat-w4-autocast (the float32 model trained and scored under torch.autocast("cpu", bf16): bf16
matmuls, float32 residual stream, norms and master weights; scored again outside autocast, the
float32 module as it deploys). Peers: full fine-tuning, torchao full-model QAT (int4
per-channel symmetric fake quantization of the same decoder linears; with and without gradient
checkpointing); baselines without training: the unquantized model and rtn-w4; peqa-w4 (scales only).

ExecuTorch's 8da4w (int8 per-token asymmetric dynamic activations x int4 symmetric weights, one scale per
32 input columns): lrqat-w4a8 is quoted against its own peer, torchao-8da4w-qat (torchao's QATConfig with
those two fake quantizers on the same decoder linears, every linear weight trained; -ckpt with gradient
checkpointing), not against torchao-qat. Both also get a "deployed ppl": lrqat-w4a8 after qgraph.finalize
(int4 weights, the activation fake-quant kept), torchao after its convert step
(QATConfig(Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32)), step="convert"): int4 weights, int8
dynamic activations). Their "held-out ppl" is the trained module's own forward, for torchao the
fake-quantized one, which is what its convert step deploys.

With --pte (off by default: each SmolLM2 export takes minutes) each 8da4w configuration's deployed form is
also written as OUT/CONFIG.pte, its linears on XNNPACK as 8da4w: lrqat-w4a8 through qgraph's executorch
target, torchao's converted model the way torchao and ExecuTorch document (torch.export of logits-only
forward, to_edge_transform_and_lower with the XnnpackPartitioner). ExecuTorch's runtime then loads each,
and the table gains its size, median 1x128 prefill latency, and logits against the deployed PyTorch module
on the same held-out tokens, with lrqat-w4a8's ratios against torchao's. A program XNNPACK does not fully
lower is not written; its row says why.
Needs the `bench` extra (peft, torchao, matplotlib), and for --pte the `executorch` one.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from benchlib import Bench, PteFigures, full_finetuning, logits_of, main

TRAINED = ("lrqat-w4", "lrqat-w4-packed", "lrqat-w4-nockpt", "lrqat-w4-bf16", "lrqat-w4-autocast", "lrqat-w4a8",
           "peqa-w4", "full-ft", "torchao-qat", "torchao-qat-ckpt", "torchao-8da4w-qat", "torchao-8da4w-qat-ckpt")
EVAL_ONLY = ("fp", "rtn-w4")
CONFIGS = (*EVAL_ONLY, *TRAINED)
PEER = "torchao-qat"  # ratios are quoted against full-model QAT, as in the paper
# like for like: the 8da4w configurations against torchao's 8da4w QAT, not its weight-only one
PAIRS = {"lrqat-w4a8": "torchao-8da4w-qat", "torchao-8da4w-qat-ckpt": "torchao-8da4w-qat"}
LRQAT_VARIANTS = {"lrqat-w4-packed": ("lrqat-w4", {"phi_format": "int-packed"}),
                  "lrqat-w4-nockpt": ("lrqat-w4", {"checkpoint": "none"}),
                  "lrqat-w4-bf16": ("lrqat-w4", {"dtype": torch.bfloat16}),
                  # float32 model, steps under torch.autocast(bf16): bf16 matmuls, float32 residual stream
                  "lrqat-w4-autocast": ("lrqat-w4", {})}
AUTOCAST = {"lrqat-w4-autocast": torch.bfloat16}
GROUP_SIZE_8DA4W = 32  # lrqat-w4a8's weight group size, and ExecuTorch's 8da4w default
PREFILL_TOKENS = 128  # the .pte prefill timed and compared: 1 x 128 held-out tokens, as tools/bench_export.py
PREFILL_REPEATS = 5  # timed .pte prefills after one warm-up; the median is reported


def build(config: str, model: torch.nn.Module):
    """(module to train or score, optimizer or None) for a configuration."""
    import qgraph

    if config == "fp":
        return model, None
    if config in ("rtn-w4", "peqa-w4", "lrqat-w4", "lrqat-w4a8", *LRQAT_VARIANTS):
        plan, options = LRQAT_VARIANTS.get(config, (config, {}))
        qm = qgraph.transform(model, plan, **options)
        if config == "rtn-w4":
            return qm, None
        # PEQA trains scales alone: the LR-QAT scale rate (1e-5) would barely move them
        lr_s = 1e-4 if config == "peqa-w4" else 1e-5
        return qm, torch.optim.AdamW(qgraph.param_groups(qm, lr_ab=1e-3, lr_s=lr_s), betas=(0.9, 0.95))
    if config == "full-ft":
        return full_finetuning(model)
    if config.startswith("torchao-qat"):
        return torchao_qat(model, checkpointing=config.endswith("ckpt"))
    if config.startswith("torchao-8da4w-qat"):
        return torchao_8da4w_qat(model, checkpointing=config.endswith("ckpt"))
    raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")


def is_decoder_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The sites qgraph rewrites: every linear inside a decoder block, not the LM head."""
    return isinstance(module, torch.nn.Linear) and ".layers." in fqn


def torchao_qat(model: torch.nn.Module, *, checkpointing: bool):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, granularity="per_channel", is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weight, step="prepare"), filter_fn=is_decoder_linear)
    return train_decoder_linears(model, checkpointing=checkpointing)


def torchao_8da4w_qat(model: torch.nn.Module, *, checkpointing: bool):
    """torchao's 8da4w QAT: int8 per-token asymmetric activations and int4 symmetric weights, one scale per 32
    input columns, fake-quantized on every decoder linear (what `torchao_8da4w_base_config` converts to)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=GROUP_SIZE_8DA4W, is_symmetric=True)
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
              filter_fn=is_decoder_linear)
    return train_decoder_linears(model, checkpointing=checkpointing)


def torchao_8da4w_base_config():
    """The PTQ config torchao's convert step applies to an 8da4w-trained model (its ExecuTorch path): from it
    torchao infers the same two fake quantizers torchao_8da4w_qat prepares (their scale precision aside: None
    there, float32 here, which is the same on this float32 model)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE_8DA4W))


def train_decoder_linears(model: torch.nn.Module, *, checkpointing: bool):
    """Every decoder linear weight trains; embeddings, norms and the head stay frozen, as in LR-QAT."""
    for name, param in model.named_parameters():
        param.requires_grad_(".layers." in name and "proj" in name)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)


def deployed(config: str, module: torch.nn.Module) -> torch.nn.Module | None:
    """What an 8da4w configuration deploys as, after training (None for the others: not scored twice).
    torchao's is converted in place (its last use: the trained module has been scored already)."""
    if config == "lrqat-w4a8":
        import qgraph

        return qgraph.finalize(module)
    if config.startswith("torchao-8da4w-qat"):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(module, QATConfig(torchao_8da4w_base_config(), step="convert"), filter_fn=is_decoder_linear)
        return module
    return None


# --- the deployed forms as ExecuTorch .pte files (--pte) ------------------------------------------------------


class LogitsOnly(torch.nn.Module):
    """A Hugging Face causal LM as (input_ids, attention_mask) -> logits, no KV cache: the interface of
    qgraph's .pte too, so both programs are run and timed alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def write_qgraph_pte(finalized: torch.nn.Module, path: Path) -> str:
    """lrqat-w4a8's finalized module through qgraph's executorch target (its writer alone: qgraph.export's
    runtime check is what this bench measures itself); what XNNPACK delegated."""
    from qgraph.errors import ExportError
    from qgraph.export import ExportJob
    from qgraph.export.executorch import INT4_LINEAR, TARGET, ExecuTorchOptions
    from qgraph.export.program import INPUT_NAMES

    options = ExecuTorchOptions()
    problem = TARGET.unsupported(finalized, options)
    if problem:
        raise ExportError(problem)
    example = {name: finalized.info.example_inputs[name] for name in INPUT_NAMES}
    artifact = TARGET.write(ExportJob(finalized, path, options, example))  # raises unless every linear is delegated
    n_linears = sum(n.target == INT4_LINEAR for n in finalized.graph_module.graph.nodes)
    return f"XNNPACK: {n_linears} of {n_linears} 8da4w linears delegated; {artifact.op_mapping['XNNPACK delegate']}"


def write_torchao_pte(model: torch.nn.Module, path: Path) -> str:
    """torchao's converted 8da4w model lowered to XNNPACK as torchao and ExecuTorch document it; what XNNPACK
    delegated. Raises (nothing written) when a quantized linear is left outside the delegates."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from qgraph.errors import ExportError
    from qgraph.export.executorch import ExecuTorchOptions, dynamic_shapes, lowered_op_counts
    from qgraph.export.program import INPUT_NAMES

    # the bounds qgraph's target uses, so that both programs are planned for the same shapes
    options = ExecuTorchOptions()
    # batch 2 in the example: export would specialize a batch of 1 to a constant
    example = {name: torch.ones(2, options.max_seq_len, dtype=torch.long) for name in INPUT_NAMES}
    exported = torch.export.export(LogitsOnly(model).eval(), (), kwargs=example,
                                   dynamic_shapes=dynamic_shapes(options), strict=False)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    delegated, outside, calls = lowered_op_counts(edge)
    n_quantized = sum(is_decoder_linear(m, fqn) for fqn, m in model.named_modules())
    problem = torchao_delegation_problem(delegated, outside, n_quantized)
    if problem:
        raise ExportError(f"{problem}; no .pte written")
    path.write_bytes(edge.to_executorch().buffer)
    return (f"XNNPACK: {n_quantized} of {n_quantized} 8da4w linears delegated; {calls} delegate call(s) holding "
            f"{sum(delegated.values())} ops; {sum(outside.values()) - calls} ops left to portable kernels")


def torchao_delegation_problem(delegated: Counter[str], outside: Counter[str], n_quantized: int) -> str | None:
    """Why torchao's lowered program is not 8da4w on XNNPACK, or None. Each 8da4w linear quantizes its own
    input (one choose_qparams inside a delegate per linear); a linear or a dequantization left outside would
    run in the portable kernels, in float or not at all."""
    left = {name: count for name, count in outside.items()
            if name.startswith(("aten.linear", "aten.addmm", "aten.mm")) or "dequantize" in name}
    dynamic = sum(count for name, count in delegated.items() if "choose_qparams" in name)
    if left or dynamic != n_quantized:
        return (f"XNNPACK did not lower torchao's 8da4w program: {n_quantized} quantized linears, {dynamic} "
                f"activation quantizations delegated; left to the portable kernels: {left or 'none'}")
    return None


def prefill_block(heldout: torch.Tensor, tokens: int = PREFILL_TOKENS) -> torch.Tensor:
    """The first `tokens` held-out tokens as one row (the blocks are slices of one running text)."""
    flat = heldout.reshape(1, -1)
    if flat.shape[1] < tokens:
        raise ValueError(f"the held-out blocks hold {flat.shape[1]} tokens, fewer than the {tokens} of a prefill")
    return flat[:, :tokens].contiguous()


def measure_pte(path: Path, reference: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                note: str, repeats: int = PREFILL_REPEATS) -> PteFigures:
    """Size, median prefill latency over `repeats` runs after a warm-up, and logits against `reference` (the
    deployed PyTorch module) on `input_ids`, of the .pte at `path` run by ExecuTorch's runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    inputs = [input_ids, torch.ones_like(input_ids)]
    method.execute(inputs)  # warm-up: XNNPACK sets its kernels up on the first run
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = method.execute(inputs)
        seconds.append(time.perf_counter() - start)
    logits = outputs[0].clone().float()  # a copy: the runtime reuses its output memory on the next run
    with torch.no_grad():
        expected = reference(input_ids).float()
    return PteFigures(file_bytes=path.stat().st_size, prefill_ms=1e3 * statistics.median(seconds),
                      max_abs_diff=(logits - expected).abs().max().item(),
                      top1_agreement=(logits.argmax(-1) == expected.argmax(-1)).float().mean().item(), note=note)


def pte(config: str, deployed_module: torch.nn.Module, heldout: torch.Tensor, path: Path) -> PteFigures | None:
    """An 8da4w configuration's deployed form written as a .pte at `path` and measured (None for the others).
    An export or a run that fails gives a row with the reason and no figures: the configuration's training
    figures are kept (they took the longest), and the other configurations still run."""
    if config == "lrqat-w4a8":
        write = write_qgraph_pte
    elif config.startswith("torchao-8da4w-qat"):
        write = write_torchao_pte
    else:
        return None
    input_ids = prefill_block(heldout)
    path.unlink(missing_ok=True)  # a file left by an earlier run must not be measured as this one's
    try:
        note = write(deployed_module, path)
    except Exception as exc:  # any exporter failure: reported in the row, not a lost run
        return PteFigures(note=f"not written: {_first_line(exc)}")
    try:
        return measure_pte(path, lambda ids: logits_of(deployed_module, ids), input_ids, note)
    except Exception as exc:  # a program ExecuTorch cannot load or run: the same
        return PteFigures(note=f"written, but ExecuTorch's runtime failed on it: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


BENCH = Bench(doc=__doc__, configs=CONFIGS, trained=TRAINED, peer=PEER, peer_label="torchao QAT", build=build,
              script=__file__, default_out=Path("out/bench_lrqat"), pairs=PAIRS, deployed=deployed, pte=pte,
              autocast=AUTOCAST)


if __name__ == "__main__":
    main(BENCH)
