"""Whole pipelines, and the plan of a model or a pipeline: one budget across a pipeline's
components, wrapping and unwrapping them together, and `from_pretrained` for a model that should
never be in RAM whole.

This module sits above `wrap` (it wraps component by component); what it knows of diffusers
(which components a pipeline holds, which one is the denoiser, which of its methods are refused
on a wrapped pipeline) comes from `offload_tensor.integrations`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from offload_tensor import integrations
from offload_tensor.checkpoint import index
from offload_tensor.integrations.diffusers import REFUSED_ON_PIPELINES, Refused, denoiser
from offload_tensor.planner import check_ram, format_bytes, format_table, make_plan, measured_bandwidth
from offload_tensor.policy import Placement, Storage, Streaming, parse_bandwidth, settings
from offload_tensor.wrap import is_wrapped, unwrap_model, wrap_model_for_offload


@dataclass(frozen=True)
class PipelinePlan:
    """A pipeline's plan: one Plan per component under one budget."""

    names: tuple[str, ...]
    plans: tuple  # of offload_tensor.planner.Plan, one per name
    budget: int | None = None
    bandwidth: float | None = None

    def __getitem__(self, name: str):
        return self.plans[self.names.index(name)]

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.plans)

    @property
    def resident_bytes(self) -> int:
        return sum(p.resident_bytes for p in self.plans)

    @property
    def streamed_bytes(self) -> int:
        return sum(p.streamed_bytes for p in self.plans)

    @property
    def device_bytes(self) -> int:
        return sum(p.device_bytes for p in self.plans)

    @property
    def minimum_budget(self) -> int:
        return sum(p.minimum_budget for p in self.plans)

    def table(self, bandwidth: float | None = None) -> str:
        return format_table(list(self.plans), bandwidth or self.bandwidth, list(self.names), self.budget)

    def __str__(self) -> str:
        return self.table()


def plan_pipeline(pipe, storage, streaming, where, only: list[str] | None = None) -> PipelinePlan:
    """One budget across a pipeline: the components used once per call (text encoders, VAE)
    stream; the denoiser keeps resident as many groups as fit beside everyone's slots."""
    found = integrations.components(pipe)
    names = list(found)
    if only is not None:
        unknown = [n for n in only if n not in found]
        if unknown:
            raise ValueError(
                f"{type(pipe).__name__} has no component {unknown} with weights; its components are {names}."
            )
        names = [n for n in names if n in only]
    main = denoiser(names)
    if where.budget is None:
        return PipelinePlan(tuple(names), tuple(make_plan(found[n], storage, streaming, where) for n in names))
    streamed_only = replace(where, budget=None, reserve=0)
    plans = {n: make_plan(found[n], storage, streaming, streamed_only) for n in names if n != main}
    others = sum(p.device_bytes for p in plans.values())  # every group streamed: slots and the group in use
    if main is not None:
        share = where.budget - others
        try:
            plans[main] = make_plan(found[main], storage, streaming, replace(where, budget=share))
        except ValueError as e:
            minimum = others + make_plan(found[main], storage, streaming, streamed_only).minimum_budget + where.reserve
            raise ValueError(
                f"budget={format_bytes(where.budget)} is below the minimum for {type(pipe).__name__}: "
                f"{format_bytes(minimum)} (every component streamed: each one's slots, and the reserve). Raise the "
                f"budget, lower prefetch, or use granularity='leaf'. ({main}: {e})"
            ) from e
    elif others + where.reserve > where.budget:
        raise ValueError(f"budget={format_bytes(where.budget)} is below the minimum for {type(pipe).__name__}: "
                         f"{format_bytes(others + where.reserve)}.")  # fmt: skip
    return PipelinePlan(tuple(names), tuple(plans[n] for n in names), where.budget)


def plan(
    model_or_pipeline,
    *,
    budget: int | str | None = None,
    max_memory: dict | None = None,
    ram: int | str | None = None,
    bandwidth: float | str | None = None,
    device: str | torch.device | None = None,
    offload: str | os.PathLike | None = None,
    disk_path: str | os.PathLike | None = None,
    reserve: int | str | None = None,
    storage_dtype: torch.dtype | str | None = None,
    fp8_scale: str | None = None,
    prefetch: int | None = None,
    pin_memory: bool | None = None,
    granularity: str | None = None,
    storage: Storage | None = None,
    streaming: Streaming | None = None,
    placement: Placement | None = None,
):
    """The plan wrap_model_for_offload (or wrap_pipeline_for_offload) would build, without
    building it, printable as a table. Works on a model on the `meta` device (plan before
    loading) and for a device this machine does not have (`device=None` plans for CUDA). The
    settings are wrap_model_for_offload's; `ram` bounds the host RAM the weights may take.

    Example:
        >>> from offload_tensor.catalog import meta_model
        >>> print(offload_tensor.plan(meta_model("flux-dev"), budget="12GiB").table(bandwidth=25e9))
    """
    wanted = settings(
        storage=storage, streaming=streaming, placement=placement, max_memory=max_memory, ram=ram, for_plan=True,
        device=device, offload=offload, disk_path=disk_path, budget=budget, reserve=reserve,
        storage_dtype=storage_dtype, fp8_scale=fp8_scale, prefetch=prefetch, pin_memory=pin_memory,
        granularity=granularity,
    )  # fmt: skip
    where = wanted.placement
    if integrations.components(model_or_pipeline) is None:
        result = make_plan(model_or_pipeline, wanted.storage, wanted.streaming, where)
        plans = [result]
    else:
        result = plan_pipeline(model_or_pipeline, wanted.storage, wanted.streaming, where)
        plans = result.plans
    if wanted.ram is not None:
        check_ram(sum(p.host_bytes for p in plans), wanted.ram, where)
    rate = parse_bandwidth(bandwidth, "bandwidth") if bandwidth is not None else measured_bandwidth(where)
    return replace(result, bandwidth=rate)


def wrap_pipeline_for_offload(pipe, *, components: list[str] | None = None, max_memory: dict | None = None,
                              ram=None, storage: Storage | None = None, streaming: Streaming | None = None,
                              placement: Placement | None = None, **kwargs):  # fmt: skip
    """Wrap every component of a diffusers pipeline that has weights (transformer or unet, text
    encoders, VAE, ...) under one budget, in place; `pipe(...)` then runs as usual, also with
    `pipe.transformer.compile_repeated_blocks(fullgraph=True)`. The components used once per call
    stream; the denoiser keeps resident as much as the budget allows. `components=` wraps only
    those. The settings are wrap_model_for_offload's (device, offload, disk_path, budget, reserve,
    storage_dtype, prefetch, ..., or the policies); each component gets a disk_path folder of its
    own.

    Example:
        >>> pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
        >>> wrap_pipeline_for_offload(pipe, budget="12GiB")
        >>> pipe.transformer.compile_repeated_blocks(fullgraph=True)
        >>> image = pipe("a cat on the moon").images[0]
        >>> print(offload_report(pipe))
    """
    found = _pipeline_components(pipe, "wrap_pipeline_for_offload")
    wrapped_already = [n for n, c in found.items() if is_wrapped(c)]
    if getattr(pipe, "_offload_tensor_components", None) or wrapped_already:
        raise ValueError(
            f"{type(pipe).__name__} is already wrapped (components "
            f"{wrapped_already or pipe._offload_tensor_components}); "
            "call unwrap_pipeline(pipe) before wrapping it again."
        )
    wanted = settings(
        storage=storage, streaming=streaming, placement=placement, max_memory=max_memory, ram=ram, **kwargs
    )
    where = wanted.placement
    where.check_has_a_tier()
    planned = plan_pipeline(pipe, wanted.storage, wanted.streaming, where, components)
    if wanted.ram is not None:
        check_ram(sum(p.host_bytes for p in planned.plans), wanted.ram, where)
    main = denoiser(planned.names)
    done = []
    try:
        for name, p in zip(planned.names, planned.plans):
            folder = None if where.disk_path is None else where.disk_path / name
            reserve = p.placement.reserve if name == main else 0
            component = replace(where, disk_path=folder, budget=p.placement.budget, reserve=reserve)
            wrap_model_for_offload(found[name], storage=wanted.storage, streaming=wanted.streaming, placement=component)
            done.append(name)
    except BaseException:
        for name in done:  # nothing half-wrapped: the components wrapped so far go back
            unwrap_model(found[name])
        raise
    pipe.__dict__["_offload_tensor_components"] = done
    for method in REFUSED_ON_PIPELINES:
        if hasattr(pipe, method):
            pipe.__dict__[method] = Refused(method, type(pipe).__name__, "unwrap_pipeline(pipe)")
    return pipe


def unwrap_pipeline(pipe):
    """Give every wrapped component of a pipeline its plain weights back, in place."""
    names = pipe.__dict__.get("_offload_tensor_components")
    if not names:
        raise ValueError(f"unwrap_pipeline: {type(pipe).__name__} is not wrapped by wrap_pipeline_for_offload.")
    found = integrations.components(pipe)
    for name in names:
        unwrap_model(found[name])
    for method in REFUSED_ON_PIPELINES:
        pipe.__dict__.pop(method, None)
    del pipe.__dict__["_offload_tensor_components"]
    return pipe


def _pipeline_components(pipe, caller: str) -> dict[str, nn.Module]:
    found = integrations.components(pipe)
    if found is None:
        raise TypeError(
            f"{caller} expects a diffusers pipeline, got {type(pipe).__name__}; for a model use wrap_model_for_offload."
        )
    return found




def from_pretrained(cls, path, *, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                    **kwargs) -> nn.Module:  # fmt: skip
    """`cls.from_pretrained` for a model that should never be in RAM whole: `cls` (a diffusers
    model class) is built from its config with its weights on the meta device (buffers real,
    as accelerate.init_empty_weights builds them), each weight in the dtype its checkpoint
    holds, or converted to `torch_dtype` while reading (modules the model keeps in float32 stay
    there, as diffusers loads them), then wrapped with `checkpoint=` the safetensors under
    `path[/subfolder]` (the rest of the keyword arguments are wrap_model_for_offload's: budget,
    offload, ...). Local folders only: nothing is downloaded.

    Example:
        >>> transformer = from_pretrained(FluxTransformer2DModel, "FLUX.1-dev", subfolder="transformer",
        ...                               torch_dtype=torch.bfloat16, budget="12GiB")
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        raise ValueError(f"{os.fspath(folder)!r} is not a local folder; offload_tensor loads local checkpoints only.")
    from accelerate import init_empty_weights

    # Weights on the meta device, buffers real: non-persistent ones (rotary tables) are in no
    # checkpoint, so they keep the values the constructor computed.
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder)).eval()
    stored = index(folder)
    for name, param in model.named_parameters():
        if name in stored and stored[name].dtype != param.dtype:
            param.data = torch.empty_like(param, dtype=stored[name].dtype)  # as the checkpoint holds it
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():  # persistent buffers too: their values come from the checkpoint
            key = f"{module_name}.{name}" if module_name else name
            if buf is not None and key in stored and stored[key].dtype != buf.dtype:
                module._buffers[name] = buf.to(stored[key].dtype)
    return wrap_model_for_offload(model, checkpoint=folder, torch_dtype=torch_dtype, **kwargs)
