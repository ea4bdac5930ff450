"""offload_report: where a wrapped model's bytes are, in the terms users reason with."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from offload_tensor import integrations
from offload_tensor.planner import format_bytes
from offload_tensor.policy import Tier
from offload_tensor.state import is_wrapped, offload_state
from offload_tensor.tensor import OffloadedTensor


@dataclass(frozen=True)
class OffloadReport:
    """Bytes of a wrapped model's weights and buffers.

    `by_tier`: weight bytes where compute reads them from, by `Tier` ("gpu", "ram", "disk"), the
    plan's names (`Plan.bytes_in`).
    `by_kind`: weight bytes per payload kind ("plain", "fp8", "torchao", ...), buffers under
    "buffer", weights added after wrapping (adapters) under "unwrapped".
    `resident_bytes`: used where the model computes (no fetch), buffers included;
    `offloaded_bytes`: fetched to the compute device on use; `offloaded_by_tier`: the same bytes by
    the tier they stream from.
    `pinned_bytes`: page-locked host memory the engine holds.
    `streamed_per_step`: bytes one forward moves (each streamed group once).
    `by_device`: bytes held on each device (disk-tier payloads under "disk").
    """

    compute_device: str
    by_tier: dict[Tier, int]
    by_kind: dict[str, int]
    resident_bytes: int
    offloaded_bytes: int
    pinned_bytes: int
    streamed_per_step: int
    by_device: dict[str, int]
    offloaded_by_tier: dict[Tier, int] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """What stays where the model computes and what streams from where, e.g. "3.0 GiB resident
        on cuda:0, 20.8 GiB stream from ram" or "all 1.2 MiB of weights stream from disk to cpu"."""
        device = self.compute_device
        if not self.offloaded_bytes:
            return f"all {format_bytes(self.resident_bytes)} resident on {device}; nothing streams"
        sources = [(t, b) for t, b in sorted(self.offloaded_by_tier.items()) if b]
        where = " and ".join(f"{t}" if len(sources) == 1 else f"{t} ({format_bytes(b)})" for t, b in sources)
        weights = sum(self.by_tier.values())
        if self.offloaded_bytes == weights:
            return f"all {format_bytes(weights)} of weights stream from {where} to {device}"
        resident, offloaded = format_bytes(self.resident_bytes), format_bytes(self.offloaded_bytes)
        return f"{resident} resident on {device}, {offloaded} stream from {where}"

    def __str__(self) -> str:
        tiers = ", ".join(f"{t} {format_bytes(b)}" for t, b in sorted(self.by_tier.items()) if b)
        devices = ", ".join(f"{d} {format_bytes(b)}" for d, b in sorted(self.by_device.items()))
        kinds = ", ".join(f"{k} {format_bytes(b)}" for k, b in sorted(self.by_kind.items()))
        lines = [self.summary, f"  weights by tier: {tiers}", f"  by device: {devices}", f"  by kind: {kinds}"]
        if self.offloaded_bytes:
            lines.append(
                f"  streamed per step: {format_bytes(self.streamed_per_step)}, pinned host memory: "
                f"{format_bytes(self.pinned_bytes)}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class PipelineReport:
    """A pipeline's report: each component's, and their total (`total`)."""

    components: dict[str, OffloadReport]
    total: OffloadReport

    @property
    def summary(self) -> str:
        return self.total.summary

    def __str__(self) -> str:
        lines = [f"pipeline total: {self.total.summary}"]
        lines += [f"  {name}: {report.summary}" for name, report in self.components.items()]
        return "\n".join(lines)


def _total(reports: list[OffloadReport]) -> OffloadReport:
    def add(key: str) -> dict[str, int]:
        out: Counter[str] = Counter()
        for r in reports:
            out.update(getattr(r, key))
        return dict(out)

    return OffloadReport(
        compute_device=", ".join(sorted({r.compute_device for r in reports})),
        by_tier=add("by_tier"),
        by_kind=add("by_kind"),
        resident_bytes=sum(r.resident_bytes for r in reports),
        offloaded_bytes=sum(r.offloaded_bytes for r in reports),
        pinned_bytes=sum(r.pinned_bytes for r in reports),
        streamed_per_step=sum(r.streamed_per_step for r in reports),
        by_device=add("by_device"),
        offloaded_by_tier=add("offloaded_by_tier"),
    )


def offload_report(model):
    """Where the bytes of a wrapped model are; for a pipeline, of each wrapped component and in
    total (a PipelineReport).

    Example:
        >>> print(offload_report(wrap_model_for_offload(model)).summary)
        all 45.8 MiB of weights stream from ram to cuda:0
    """
    parts = integrations.components(model)
    if parts is not None:
        wrapped = {name: offload_report(c) for name, c in parts.items() if is_wrapped(c)}
        if not wrapped:
            raise ValueError(
                f"offload_report: no component of {type(model).__name__} is wrapped; call "
                "wrap_pipeline_for_offload(pipe) first."
            )
        return PipelineReport(wrapped, _total(list(wrapped.values())))
    state = offload_state(model, "offload_report")
    compute = str(state.compute_device)
    resident_tier = state.plan.placement.resident_tier
    by_tier: Counter[Tier] = Counter()
    by_kind: Counter[str] = Counter()
    by_device: Counter[str] = Counter()
    offloaded_by_tier: Counter[Tier] = Counter()
    offloaded = resident = 0
    for param in model.parameters():  # unique, so tied weights count once
        if isinstance(param, OffloadedTensor):
            nbytes = param.payload_bytes
            tier = state.tier_of_key.get(int(param._key), resident_tier) if param._key is not None else resident_tier
            by_tier[tier] += nbytes
            by_kind[param._kind.name] += nbytes
            by_device["disk" if tier == "disk" else str(param._inner[0].device)] += nbytes
            if param._key is not None:
                offloaded += nbytes
                offloaded_by_tier[tier] += nbytes
            else:
                resident += nbytes
        else:
            nbytes = param.numel() * param.element_size()
            by_kind["unwrapped"] += nbytes
            by_device[str(param.device)] += nbytes
            resident += nbytes if str(param.device) == compute else 0
    for buf in model.buffers():
        nbytes = buf.numel() * buf.element_size()
        by_device[str(buf.device)] += nbytes
        by_kind["buffer"] += nbytes
        resident += nbytes
    return OffloadReport(
        compute_device=compute,
        by_tier=dict(by_tier),
        by_kind=dict(by_kind),
        resident_bytes=resident,
        offloaded_bytes=offloaded,
        pinned_bytes=state.engine.pinned_bytes,
        streamed_per_step=state.plan.streamed_bytes,
        by_device=dict(by_device),
        offloaded_by_tier=dict(offloaded_by_tier),
    )
