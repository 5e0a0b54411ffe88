"""Save and load a QST side network alone: its weights (safetensors) and the plan that placed it (JSON).

The backbone is the user's pretrained model, quantized again on load; only what trained is written,
a few MB for SmolLM2-135M rather than the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from qgraph.errors import QGraphError
from qgraph.module import QGraphModule
from qgraph.plans import PassConfig, Plan
from qgraph.side_network import SIDE_MODULE, SideConfig, SideNetwork

WEIGHTS_FILE = "side_network.safetensors"
PLAN_FILE = "side_plan.json"
FORMAT_VERSION = 1


def side_network(qm: QGraphModule) -> SideNetwork:
    """The side network inside a module that a QST plan (attach_side_taps) made."""
    side = getattr(qm.graph_module, SIDE_MODULE, None) if isinstance(qm, QGraphModule) else None
    if not isinstance(side, SideNetwork):
        plan = getattr(getattr(qm, "plan", None), "name", None)
        raise QGraphError(f"this module has no QST side network (plan {plan!r}); transform the model with a plan "
                          "that runs attach_side_taps, such as 'qst-nf4'")
    return side


def applied_plan(qm: QGraphModule) -> Plan:
    """The plan as it ran: every pass with the options it ran with (overrides included), skips left out."""
    passes = tuple(PassConfig(report.name, dict(report.options)) for report in qm.report.passes if report.ran)
    return Plan(qm.plan.name, qm.plan.description, passes)


def save_side(qm: QGraphModule, directory: str | Path) -> Path:
    """Write the side network's weights and the applied plan to `directory`; returns the directory."""
    side = side_network(qm)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in side.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": str(FORMAT_VERSION)})
    meta = {"format": FORMAT_VERSION, "side_config": asdict(side.config),
            "plan": json.loads(applied_plan(qm).to_json())}
    (directory / PLAN_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_side(target: QGraphModule | nn.Module, directory: str | Path) -> QGraphModule:
    """Restore a saved side network.

    `target` is a module a QST plan made (its side network is overwritten in place and returned), or
    the pretrained model itself (transformed with the saved plan first). Refuses a side network whose
    sizes differ from the target's (another backbone, other options).
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    if not isinstance(target, QGraphModule):
        from qgraph.api import transform

        target = transform(target, Plan.from_json(json.dumps(meta["plan"])))
    side = side_network(target)
    saved = SideConfig(**meta["side_config"])
    if saved != side.config:
        raise QGraphError(f"the side network in {directory} does not fit this model: saved {saved}, this model's "
                          f"{side.config}; load it into the model (and plan options) it was trained on")
    state = load_file(str(directory / WEIGHTS_FILE), device=str(side.upsample.weight.device))
    side.load_state_dict(state, strict=True)
    return target


def _read_meta(directory: Path) -> dict:
    missing = [name for name in (WEIGHTS_FILE, PLAN_FILE) if not (directory / name).is_file()]
    if missing:
        raise QGraphError(f"{directory} holds no saved side network (missing {', '.join(missing)}); "
                          "write one with qgraph.save_side(qm, directory)")
    meta = json.loads((directory / PLAN_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise QGraphError(f"{directory / PLAN_FILE} has format {meta.get('format')!r}; this qgraph reads "
                          f"format {FORMAT_VERSION}")
    return meta
