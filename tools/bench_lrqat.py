"""LR-QAT against its peers on SmolLM2-135M: peak memory by category, step time, held-out perplexity.

Every configuration runs in its own process (so peak RSS is its own), on the same batches:
    python tools/bench_lrqat.py --steps 200 --out out/bench_lrqat
writes results.json, results.md (the README table) and memory_time.png. One configuration alone:
    python tools/bench_lrqat.py --run lrqat-w4 --steps 20 --json /tmp/lrqat.json

Variants: lrqat-w4-packed (Phi0 as int-packed codes), lrqat-w4-nockpt (no checkpoint boundaries:
every activation kept, nothing recomputed). Peers: full fine-tuning, torchao full-model QAT (int4
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
Needs the `bench` extra (peft, torchao, matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchlib import Bench, full_finetuning, main

TRAINED = ("lrqat-w4", "lrqat-w4-packed", "lrqat-w4-nockpt", "lrqat-w4a8", "peqa-w4", "full-ft", "torchao-qat",
           "torchao-qat-ckpt", "torchao-8da4w-qat", "torchao-8da4w-qat-ckpt")
EVAL_ONLY = ("fp", "rtn-w4")
CONFIGS = (*EVAL_ONLY, *TRAINED)
PEER = "torchao-qat"  # ratios are quoted against full-model QAT, as in the paper
# like for like: the 8da4w configurations against torchao's 8da4w QAT, not its weight-only one
PAIRS = {"lrqat-w4a8": "torchao-8da4w-qat", "torchao-8da4w-qat-ckpt": "torchao-8da4w-qat"}
LRQAT_VARIANTS = {"lrqat-w4-packed": ("lrqat-w4", {"phi_format": "int-packed"}),
                  "lrqat-w4-nockpt": ("lrqat-w4", {"checkpoint": "none"})}
GROUP_SIZE_8DA4W = 32  # lrqat-w4a8's weight group size, and ExecuTorch's 8da4w default


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


BENCH = Bench(doc=__doc__, configs=CONFIGS, trained=TRAINED, peer=PEER, peer_label="torchao QAT", build=build,
              script=__file__, default_out=Path("out/bench_lrqat"), pairs=PAIRS, deployed=deployed)


if __name__ == "__main__":
    main(BENCH)
