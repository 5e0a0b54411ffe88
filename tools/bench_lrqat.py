"""LR-QAT against its peers on SmolLM2-135M: peak memory by category, step time, held-out perplexity.

Every configuration runs in its own process (so peak RSS is its own), on the same batches:
    python tools/bench_lrqat.py --steps 200 --out out/bench_lrqat
writes results.json, results.md (the README table) and memory_time.png. One configuration alone:
    python tools/bench_lrqat.py --run lrqat-w4 --steps 20 --json /tmp/lrqat.json

Variants: lrqat-w4-packed (Phi0 as int-packed codes), lrqat-w4-nockpt (no checkpoint boundaries:
every activation kept, nothing recomputed). Peers: full fine-tuning, torchao full-model QAT (int4
per-channel symmetric fake quantization of the same decoder linears; with and without gradient
checkpointing); baselines without training: the unquantized model and rtn-w4; peqa-w4 (scales only).
Needs the `bench` extra (peft, torchao, matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchlib import Bench, full_finetuning, main

TRAINED = ("lrqat-w4", "lrqat-w4-packed", "lrqat-w4-nockpt", "peqa-w4", "full-ft", "torchao-qat", "torchao-qat-ckpt")
EVAL_ONLY = ("fp", "rtn-w4")
CONFIGS = (*EVAL_ONLY, *TRAINED)
PEER = "torchao-qat"  # ratios are quoted against full-model QAT, as in the paper
LRQAT_VARIANTS = {"lrqat-w4-packed": ("lrqat-w4", {"phi_format": "int-packed"}),
                  "lrqat-w4-nockpt": ("lrqat-w4", {"checkpoint": "none"})}


def build(config: str, model: torch.nn.Module):
    """(module to train or score, optimizer or None) for a configuration."""
    import qgraph

    if config == "fp":
        return model, None
    if config in ("rtn-w4", "peqa-w4", "lrqat-w4", *LRQAT_VARIANTS):
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
    raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")


def torchao_qat(model: torch.nn.Module, *, checkpointing: bool):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, granularity="per_channel", is_symmetric=True)
    # the same sites qgraph rewrites: every linear inside a decoder block, not the LM head
    quantize_(model, QATConfig(weight_config=weight, step="prepare"),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and ".layers." in fqn)
    for name, param in model.named_parameters():
        param.requires_grad_(".layers." in name and "proj" in name)  # embeddings, norms, head frozen as in LR-QAT
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)


BENCH = Bench(doc=__doc__, configs=CONFIGS, trained=TRAINED, peer=PEER, peer_label="torchao QAT", build=build,
              script=__file__, default_out=Path("out/bench_lrqat"))


if __name__ == "__main__":
    main(BENCH)
