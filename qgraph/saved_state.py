"""The saved form of a transformed module's trained state: what `qm.save_pretrained(dir)` writes and
`qgraph.from_pretrained` reads.

A save is a directory of two files:

- `qgraph_pretrained.json`: the format version, the plan as it ran (every pass with its options), the
  options that differ from the named plan, the qgraph version, the base model's class, config and a
  digest of its weights, a digest of the module's frozen tensors, and the name, size and sha256 of
- `trainable-<sha256 prefix>.safetensors`: the trainable tensors only (LR-QAT A, B and scales, the
  QST side network, PEQA scales), under their graph-module names.

Writes are atomic: each file is written to a temporary file in the directory and renamed into place,
the tensors first and the JSON last. The JSON is the commit: it names the tensor file by its content,
so a process killed at any point leaves the previous JSON naming the previous, complete tensor file.
Tensor files no JSON names are removed after the commit.

This module knows the module it saves by its attributes (graph_module, plan, report, info), not by
class: qgraph.module imports it for `save_pretrained`, so it cannot import qgraph.module back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from qgraph.errors import PlanError, PretrainedError
from qgraph.fingerprint import tensors_digest
from qgraph.plans import PassConfig, Plan, get_plan, resolve_steps

FORMAT = 1
# the JSON fields the loader reads before it can check anything else, and the types save_pretrained writes
FIELD_TYPES = {
    "trainable": {"file": str, "bytes": int, "sha256": str},
    "base_model": {"class": str, "config": (dict, type(None)), "weights_digest": str},
}
CONFIG_FILE = "qgraph_pretrained.json"
TENSOR_PREFIX, TENSOR_SUFFIX = "trainable-", ".safetensors"
# Config keys that describe how a model was loaded or is called, not what it computes.
IGNORED_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                                 "output_attentions", "output_hidden_states", "return_dict"})




def config_fingerprint(config: Any) -> dict[str, Any] | None:
    """The model config as JSON data, without the keys that do not change what the model computes."""
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    kept = {key: value for key, value in data.items() if not key.startswith("_") and key not in IGNORED_CONFIG_KEYS}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def trainable_tensors(qm: nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable parameters under their graph-module names (tied ones once)."""
    return {name: param for name, param in qm.graph_module.named_parameters() if param.requires_grad}


def frozen_digest(qm: nn.Module) -> str:
    """Digest of everything in the graph module's state but the trainable tensors: what the plan made
    of the base model. Equal at save and load unless the plan's numerics changed (another qgraph
    version, another device's rounding): then the loaded model is not the trained one bit for bit."""
    trainable = set(trainable_tensors(qm))
    return tensors_digest((name, t) for name, t in qm.graph_module.state_dict().items() if name not in trainable)


# --- the plan as it ran ----------------------------------------------------------------------------


def applied_plan(qm: nn.Module) -> Plan:
    """The plan as it ran: every pass with the options it ran with (overrides included), skips left out."""
    passes = tuple(PassConfig(report.name, dict(report.options)) for report in qm.report.passes if report.ran)
    return Plan(qm.plan.name, qm.plan.description, passes)


def plan_data(plan: Plan) -> dict[str, Any]:
    """The plan as JSON data (tuples as lists), the form two plans are saved and compared in."""
    try:
        return json.loads(plan.to_json())
    except TypeError as exc:
        raise PretrainedError(f"plan {plan.name!r} has an option value that JSON cannot hold ({exc}); pass options "
                              "as numbers, strings, lists or dicts") from exc


def plan_overrides(plan: Plan) -> dict[str, Any]:
    """`pass.option: value` for each option that differs from the built-in plan of the same name
    (what the user passed to transform); empty for a plan that is not built in."""
    try:
        defaults = {spec.name: _options_data(options) for spec, options in resolve_steps(get_plan(plan.name), {})}
    except PlanError:  # a plan that is not built in: there is nothing to compare against
        return {}
    ran = plan_data(plan)["passes"]
    return {f"{p['name']}.{key}": value for p in ran if p["name"] in defaults
            for key, value in p["options"].items() if defaults[p["name"]].get(key) != value}


def _options_data(options: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(options), default=str))


def plan_differences(saved: Plan, current: Plan) -> list[str]:
    """What differs between two plans' passes, in words (empty when they are the same)."""
    saved_passes, current_passes = plan_data(saved)["passes"], plan_data(current)["passes"]
    saved_names, current_names = [p["name"] for p in saved_passes], [p["name"] for p in current_passes]
    if saved_names != current_names:
        return [f"passes: saved {saved_names}, this module {current_names}"]
    return [f"{a['name']}.{key}: saved {a['options'].get(key)!r}, this module {b['options'].get(key)!r}"
            for a, b in zip(saved_passes, current_passes) for key in sorted(a["options"].keys() | b["options"].keys())
            if a["options"].get(key) != b["options"].get(key)]


# --- save ------------------------------------------------------------------------------------------


def save_pretrained(qm: nn.Module, directory: str | Path) -> Path:
    """Write `qm`'s trainable tensors and how to rebuild the rest to `directory` (atomically); returns it.

    Everything is checked and serialised in memory before the first byte is written.
    """
    directory = as_directory(directory, "save_pretrained")
    tensors = _tensors_to_save(qm)
    existing = next(path for path in (directory, *directory.absolute().parents) if path.exists())
    if not existing.is_dir():
        where = "it is a file" if existing == directory else f"{existing} is a file"
        raise PretrainedError(f"cannot save into {directory}: {where}; name a directory")
    payload = safetensors.torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                                     metadata={"format": "pt", "qgraph_format": str(FORMAT)})
    sha256 = hashlib.sha256(payload).hexdigest()
    tensor_file = f"{TENSOR_PREFIX}{sha256[:16]}{TENSOR_SUFFIX}"
    plan = applied_plan(qm)
    meta = {
        "format": FORMAT,
        "qgraph_version": _qgraph_version(),
        "plan": plan_data(plan),
        "options": plan_overrides(plan),
        "dtype": dtype_name(qm.info.cast_to),
        "base_model": {"class": qm.info.model_class, "config": config_fingerprint(qm.info.config),
                       "weights_digest": qm.info.weights_digest},
        "frozen_digest": frozen_digest(qm),
        "trainable": {"file": tensor_file, "bytes": len(payload), "sha256": sha256, "tensors": len(tensors),
                      "params": sum(t.numel() for t in tensors.values())},
    }
    text = json.dumps(meta, indent=2)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / tensor_file, payload)
    write_atomic(directory / CONFIG_FILE, text.encode())  # the commit
    for stale in directory.glob(f"{TENSOR_PREFIX}*{TENSOR_SUFFIX}"):
        if stale.name != tensor_file:
            stale.unlink(missing_ok=True)
    return directory


def _tensors_to_save(qm: nn.Module) -> dict[str, torch.Tensor]:
    if not all(hasattr(qm, name) for name in ("graph_module", "plan", "report", "info")):
        raise PretrainedError(f"save_pretrained takes the module qgraph.transform returned, got {type(qm).__name__}")
    tensors = trainable_tensors(qm)
    if not tensors:
        raise PretrainedError(
            f"plan {qm.plan.name!r} left nothing trainable in this module, so there is no trained state to save: "
            "save the module transform returned for a training plan (lrqat-w4, qst-nf4, peqa-w4) before "
            "finalize, or rebuild this one with qgraph.transform(model, plan)")
    return tensors


def _qgraph_version() -> str:
    try:
        return metadata.version("qgraph")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename: a reader
    sees the old file or the new one, never part of one, and so does a process killed mid-write."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- load ------------------------------------------------------------------------------------------


@dataclass
class SavedState:
    """A save read and verified from disk; nothing in it refers to a model."""

    directory: Path
    meta: dict[str, Any]
    plan: Plan
    tensors: dict[str, torch.Tensor]

    @property
    def tensor_path(self) -> Path:
        return self.directory / self.meta["trainable"]["file"]


def as_directory(directory: object, caller: str) -> Path:
    """A directory argument as a Path; anything but a str or os.PathLike is refused by name (pathlib's own
    TypeError names no argument)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{caller} takes a directory path (a str or os.PathLike), got {directory!r}")
    return Path(directory)


def read_saved(directory: str | Path) -> SavedState:
    """Read and verify a save: its JSON, its format, the tensor file's size and sha256, the tensors."""
    directory = as_directory(directory, "from_pretrained")
    meta = _read_meta(directory)
    trainable = meta["trainable"]
    name = trainable.get("file", "")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(TENSOR_SUFFIX):
        raise PretrainedError(f"{directory / CONFIG_FILE} names the tensor file {name!r}, which is not a file name "
                              "save_pretrained writes; the JSON is corrupt: save again")
    path = directory / name
    if not path.is_file():
        raise PretrainedError(f"{path} is missing: {directory / CONFIG_FILE} names it as the trained tensors; "
                              "copy the whole directory, or save again")
    data = path.read_bytes()
    if len(data) != trainable.get("bytes"):
        state = "truncated" if len(data) < trainable.get("bytes", 0) else "longer than saved"
        raise PretrainedError(f"{path} is {state}: {len(data)} bytes, the save wrote {trainable.get('bytes')}; "
                              "copy it again, or save again")
    if hashlib.sha256(data).hexdigest() != trainable.get("sha256"):
        raise PretrainedError(f"{path} is corrupt: its sha256 differs from the one saved in {CONFIG_FILE}; "
                              "copy it again, or save again")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types vary by version
        raise PretrainedError(f"{path} is not a readable safetensors file ({exc}); save again") from exc
    try:
        plan = Plan.from_json(json.dumps(meta["plan"]))
    except (KeyError, TypeError) as exc:
        raise PretrainedError(f"{directory / CONFIG_FILE} holds no readable plan ({exc!r}); save again") from exc
    return SavedState(directory, meta, plan, tensors)


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"holds no {CONFIG_FILE}"
        raise PretrainedError(f"{directory} {what}: it is not a qgraph save; write one with "
                              "qm.save_pretrained(directory)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PretrainedError(f"{path} is not valid JSON ({exc}): it is truncated or corrupt; save again") from exc
    version = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(version, int) and version > FORMAT:
        raise PretrainedError(f"{path} has format {version}, written by a newer qgraph; this qgraph "
                              f"({_qgraph_version()}) reads format {FORMAT}: upgrade qgraph")
    if version != FORMAT:
        raise PretrainedError(f"{path} has format {version!r}; this qgraph reads format {FORMAT} "
                              "(a file qm.save_pretrained wrote)")
    missing = [key for key in ("plan", "base_model", "trainable", "frozen_digest") if key not in meta]
    if missing or not all(isinstance(meta[key], dict) for key in ("plan", "base_model", "trainable")):
        raise PretrainedError(f"{path} lacks {', '.join(missing) or 'the fields save_pretrained writes'}: "
                              "it is corrupt; save again")
    wrong = [f"{section}.{key}" for section, fields in FIELD_TYPES.items() for key, kinds in fields.items()
             if not isinstance(meta[section].get(key), kinds) or isinstance(meta[section].get(key), bool)]
    if wrong:
        raise PretrainedError(f"{path} holds {', '.join(wrong)} of another type than save_pretrained writes: it was "
                              "edited or is corrupt; save again")
    return meta


def check_base_model(saved: SavedState, model_class: str, config: Any, digest: str) -> None:
    """Raise, naming what differs, unless the model is the one the save was trained on."""
    base = saved.meta["base_model"]
    where = saved.directory
    if model_class != base.get("class"):
        raise PretrainedError(f"{where} was trained on a {base.get('class')}; this model is a {model_class}: "
                              "load it into the model it was trained on")
    differences = _dict_differences(base.get("config"), config_fingerprint(config))
    if differences:
        raise PretrainedError(f"{where} was trained on a {model_class} of another config ("
                              + "; ".join(differences[:5]) + "): load it into the model it was trained on")
    if digest != base.get("weights_digest"):
        raise PretrainedError(f"{where} was trained on a {model_class} with other weights (same config and shapes, "
                              f"weights digest {base.get('weights_digest')} saved, {digest} here; the digest reads "
                              "values and dtypes, so a cast model differs too): load it into the checkpoint it was "
                              "trained on, as it was loaded then")


def _dict_differences(saved: dict | None, current: dict | None) -> list[str]:
    saved, current = saved or {}, current or {}
    return [f"{key}: saved {saved.get(key, '<absent>')!r}, this model {current.get(key, '<absent>')!r}"
            for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def saved_dtype(saved: SavedState) -> torch.dtype | None:
    """The dtype the saved run was transformed with (transform(dtype=)), None for the model's own."""
    name = saved.meta.get("dtype")
    if name is None:
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PretrainedError(f"{saved.directory / CONFIG_FILE}: its \"dtype\" field is {name!r}, not the name of a "
                              "torch dtype (such as \"bfloat16\"); the file was edited or damaged. Fix: save the "
                              "module again")
    return dtype


def check_plan(saved: SavedState, qm: nn.Module) -> None:
    if saved.meta.get("dtype") != dtype_name(qm.info.cast_to):
        raise PretrainedError(f"{saved.directory} was saved from a module transformed with dtype="
                              f"{saved.meta.get('dtype')}, this one with dtype={dtype_name(qm.info.cast_to)}: load it "
                              "into the base model instead, qgraph.from_pretrained(model, directory), which re-applies "
                              "the saved plan and dtype")
    differences = plan_differences(saved.plan, applied_plan(qm))
    if differences:
        raise PretrainedError(f"{saved.directory} was saved from plan {saved.plan.name!r} run otherwise than this "
                              f"module's ({'; '.join(differences[:5])}): load it into the base model instead, "
                              "qgraph.from_pretrained(model, directory), which re-applies the saved plan")


def check_tensors(saved: SavedState, qm: nn.Module) -> None:
    """Every trainable tensor of `qm` is in the file with its shape and dtype, and the file has no others."""
    expected = trainable_tensors(qm)
    path = saved.tensor_path
    missing = sorted(expected.keys() - saved.tensors.keys())
    if missing:
        raise PretrainedError(f"{path} lacks {len(missing)} trainable tensor(s) of this module, first {missing[0]!r}; "
                              "it was saved from another plan or model")
    unexpected = sorted(saved.tensors.keys() - expected.keys())
    if unexpected:
        raise PretrainedError(f"{path} holds {len(unexpected)} tensor(s) this module does not train, first "
                              f"{unexpected[0]!r}; it was saved from another plan or model")
    for name, param in expected.items():
        tensor = saved.tensors[name]
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise PretrainedError(f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} in the file, "
                                  f"{param.dtype} {tuple(param.shape)} in this module; it was saved from another "
                                  "model or options (or the module was cast: cast it the same way before loading)")


def load_tensors(saved: SavedState, qm: nn.Module) -> None:
    """Copy the saved tensors into `qm`'s trainable parameters in place (optimizers keep their references)."""
    check_tensors(saved, qm)
    with torch.no_grad():
        for name, param in trainable_tensors(qm).items():
            param.copy_(saved.tensors[name])
    if frozen_digest(qm) != saved.meta["frozen_digest"]:
        warnings.warn(f"the plan re-applied to the base model made other frozen tensors than those {saved.directory} "
                      f"was trained with (saved by qgraph {saved.meta.get('qgraph_version')}, this is "
                      f"{_qgraph_version()}; or rounding on another device): the loaded model is close to the "
                      "trained one but not equal to it bit for bit", stacklevel=3)
