"""Memory measurement: MemTracker's per-category peak, and the process's peak RSS.

torch's MemTracker breaks peak memory into parameters, buffers, gradients, optimizer state and
activations (the breakdown both papers plot), but it hooks every parameter and fails on frozen
ones; `FrozenAwareMemTracker` hooks only the parameters that train.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

CATEGORIES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")


class FrozenAwareMemTracker(MemTracker):
    """MemTracker that installs gradient hooks only on parameters that require grad."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._track_grad),
                        param.register_post_accumulate_grad_hook(lambda p: self._track_grad(p.grad)),
                    )
        return memory

    def _track_grad(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


def peak_breakdown(tracker: MemTracker, device: torch.device | str = "cpu") -> dict[str, int]:
    """Bytes per category at the tracked peak, and their total under "Total"."""
    snapshot = tracker.get_tracker_snapshot("peak")
    per_device = snapshot.get(torch.device(device), {})
    breakdown = {category: int(per_device.get(category, 0)) for category in CATEGORIES}
    breakdown["Total"] = int(per_device.get("Total", sum(breakdown.values())))
    return breakdown


def reset_peak_rss() -> None:
    """Start VmHWM over from the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS needs Linux)")
