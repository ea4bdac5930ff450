"""offload_report: where a wrapped model's bytes are, in the terms users reason with."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from offload_tensor.tensor import OffloadedTensor
from offload_tensor.wrap import offload_state


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class OffloadReport:
    """Bytes of a wrapped model's weights and buffers.

    `by_device`: bytes held on each device (payloads where they live, buffers).
    `by_kind`: payload bytes per payload kind ("plain", "fp8"), buffers under "buffer".
    `resident_bytes`: on the compute device; `offloaded_bytes`: elsewhere, fetched on use.
    """

    compute_device: str
    by_device: dict[str, int]
    by_kind: dict[str, int]
    resident_bytes: int
    offloaded_bytes: int

    @property
    def summary(self) -> str:
        state = "partially" if self.offloaded_bytes else "completely"
        return (
            f"loaded {state}: {format_bytes(self.resident_bytes)} resident on {self.compute_device}, "
            f"{format_bytes(self.offloaded_bytes)} offloaded"
        )

    def __str__(self) -> str:
        devices = ", ".join(f"{d} {format_bytes(b)}" for d, b in sorted(self.by_device.items()))
        kinds = ", ".join(f"{k} {format_bytes(b)}" for k, b in sorted(self.by_kind.items()))
        return f"{self.summary}\n  by device: {devices}\n  by kind: {kinds}"


def offload_report(model: nn.Module) -> OffloadReport:
    """Where the bytes of a wrapped model are.

    Example:
        >>> print(offload_report(wrap_model_for_offload(model)).summary)
        loaded partially: 12.0 KB resident on cuda:0, 45.8 MB offloaded
    """
    state = offload_state(model, "offload_report")
    by_device: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for param in model.parameters():  # unique, so tied weights count once
        if isinstance(param, OffloadedTensor):
            for t in param._inner:
                by_device[str(t.device)] += t.numel() * t.element_size()
            by_kind[param._kind.name] += param.payload_bytes
        else:
            by_device[str(param.device)] += param.numel() * param.element_size()
            by_kind["unwrapped"] += param.numel() * param.element_size()
    for buf in model.buffers():
        by_device[str(buf.device)] += buf.numel() * buf.element_size()
        by_kind["buffer"] += buf.numel() * buf.element_size()
    compute = str(state.compute_device)
    resident = by_device.get(compute, 0)
    return OffloadReport(compute, dict(by_device), dict(by_kind), resident, sum(by_device.values()) - resident)
