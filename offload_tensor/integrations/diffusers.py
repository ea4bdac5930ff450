"""diffusers: repeated blocks, hooks that move or cast weights, and `dequantize()`.

- A model's `_repeated_blocks` (else its `_no_split_modules`) are its blocks: one copy each.
- Group offloading and layerwise casting hooks move or cast weights themselves: a model carrying
  them is refused.
- `model.dequantize()` on a wrapped quantized model: diffusers' own walks the modules for weights
  that are torchao tensors, finds none (they are offloaded wrappers), and would report success
  with the payloads still quantized. A wrapped model gets an instance `dequantize` that
  dequantizes the payloads where they live, then lets diffusers finish its bookkeeping.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import nn

from offload_tensor.integrations import Integration, RemoveAttributes, from_library, register

_FOREIGN_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker", "layerwise_casting")


def check(model: nn.Module) -> None:
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        foreign = [h for h in getattr(registry, "hooks", {}) if h in _FOREIGN_HOOKS]
        if foreign:
            raise ValueError(
                f"{name or type(model).__name__} carries diffusers hooks {foreign} (enable_group_offload or "
                "enable_layerwise_casting), which move or cast weights themselves; remove them "
                "(model.disable_group_offload(), or reload the model) before wrap_model_for_offload, which "
                "replaces them."
            )


def blocks(model: nn.Module) -> list[str]:
    if not from_library(model, "diffusers"):
        return []
    return list(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or ())


def install(model: nn.Module):
    """Instance methods on a wrapped diffusers model: `dequantize` (quantized models), and a clear
    refusal of diffusers' own offloading and casting, and of fusing QKV projections (which would
    build plain fused weights outside the offload and the budget)."""
    if not from_library(model, "diffusers"):
        return None
    added = []
    if getattr(model, "hf_quantizer", None) is not None:
        model.__dict__["dequantize"] = functools.partial(dequantize, model)
        added.append("dequantize")
    for method in (*_REFUSED_ON_MODELS, _FUSE):
        if hasattr(model, method):
            model.__dict__[method] = _Refused(method, type(model).__name__, "unwrap_model(model)")
            added.append(method)
    fusing = [m for m in model.modules() if m is not model and callable(getattr(m, "fuse_projections", None))]
    for module in fusing:  # each attention module's own: what fuse_qkv_projections calls
        module.__dict__["fuse_projections"] = _Refused("fuse_projections", type(module).__name__, "unwrap_model(model)")
    return _Undo([RemoveAttributes([model], tuple(added)), RemoveAttributes(fusing, ("fuse_projections",))])


class _Undo:
    """Several undos as one value (pickles, deep-copies)."""

    def __init__(self, undos: list) -> None:
        self.undos = undos

    def __call__(self) -> None:
        for undo in self.undos:
            undo()


def dequantize(model: nn.Module) -> nn.Module:
    """ModelMixin.dequantize for a wrapped model: every quantized payload is replaced, where it
    lives, by a plain payload holding its dequantized value; then diffusers deletes its quantizer
    as usual. Checked before anything changes."""
    from offload_tensor.payloads import PLAIN, Subclass
    from offload_tensor.tensor import OffloadedTensor
    from offload_tensor.wrap import named_parameter_slots, offload_state

    state = offload_state(model, "dequantize")
    from diffusers.quantizers.base import DiffusersQuantizer

    if type(model.hf_quantizer)._dequantize is DiffusersQuantizer._dequantize:  # quanto and others: diffusers cannot
        DiffusersQuantizer._dequantize(model.hf_quantizer, model)  # raises diffusers' own error, before any change
    quantized = {
        id(p): p for _, _, _, p in named_parameter_slots(model) if isinstance(p, OffloadedTensor) and isinstance(p._kind, Subclass)
    }
    if quantized and hasattr(state.engine, "prepare"):
        raise RuntimeError(
            f"dequantize() on a streamed {type(model).__name__}: its host arenas are sized for the quantized weights. "
            "Call unwrap_model(model), model.dequantize(), then wrap_model_for_offload(model) again."
        )
    for p in quantized.values():
        if not hasattr(p._kind.cls, "dequantize"):
            raise NotImplementedError(f"{p._kind.cls.__name__} weights cannot be dequantized.")
    with torch.inference_mode(False):
        plain = {}
        for i, p in quantized.items():
            value = p.payload_value().dequantize().to(p.dtype)
            tensor = OffloadedTensor((value,), PLAIN, p.dtype, p._compute_device, p._key, p.shape, p.stride())
            plain[i] = nn.Parameter(tensor, requires_grad=False)
    for _, module, name, p in named_parameter_slots(model):
        if id(p) in plain:
            setattr(module, name, plain[id(p)])
            if isinstance(module, nn.Linear) and getattr(module.extra_repr, "__func__", None) is not nn.Linear.extra_repr:
                module.extra_repr = types.MethodType(nn.Linear.extra_repr, module)  # as diffusers does
    state.weights = {n: plain.get(id(w), w) for n, w in state.weights.items()}
    for n, w in state.weights.items():
        state.built.kinds[n] = w._kind
    model.__dict__.pop("dequantize", None)
    return type(model).dequantize(model)  # finds no quantized weight left; deletes the quantizer




# -- pipelines ---------------------------------------------------------------------------------
DENOISERS = ("transformer", "unet", "prior", "decoder")  # components run every step, in this order of preference
_REFUSED_ON_PIPELINES = (
    "enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload", "fuse_qkv_projections",
)  # fmt: skip
_REFUSED_ON_MODELS = ("enable_group_offload", "enable_layerwise_casting")
_FUSE = "fuse_qkv_projections"


def components(obj) -> dict[str, nn.Module] | None:
    """A diffusers pipeline's models with weights, by component name (None for anything else)."""
    if not from_library(obj, "diffusers") or isinstance(obj, nn.Module) or not hasattr(obj, "components"):
        return None
    return {
        name: c for name, c in obj.components.items() if isinstance(c, nn.Module) and next(c.parameters(), None) is not None
    }


def _denoiser(names) -> str | None:
    return next((n for n in DENOISERS if n in names), None)


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
        from offload_tensor.planner import format_table

        return format_table(list(self.plans), bandwidth or self.bandwidth, list(self.names), self.budget)

    def __str__(self) -> str:
        return self.table()


def plan_pipeline(pipe, storage, streaming, where, only: list[str] | None = None) -> PipelinePlan:
    """One budget across a pipeline: the components used once per call (text encoders, VAE)
    stream; the denoiser keeps resident as many groups as fit beside everyone's slots."""
    from dataclasses import replace

    from offload_tensor.planner import format_bytes, make_plan

    found = components(pipe)
    names = list(found)
    if only is not None:
        unknown = [n for n in only if n not in found]
        if unknown:
            raise ValueError(
                f"{type(pipe).__name__} has no component {unknown} with weights; its components are {names}."
            )
        names = [n for n in names if n in only]
    denoiser = _denoiser(names)
    if where.budget is None:
        return PipelinePlan(tuple(names), tuple(make_plan(found[n], storage, streaming, where) for n in names))
    streamed_only = replace(where, budget=None, reserve=0)
    plans = {n: make_plan(found[n], storage, streaming, streamed_only) for n in names if n != denoiser}
    others = sum(p.slot_bytes for p in plans.values())
    if denoiser is not None:
        share = where.budget - others
        try:
            plans[denoiser] = make_plan(found[denoiser], storage, streaming, replace(where, budget=share))
        except ValueError:
            minimum = others + make_plan(found[denoiser], storage, streaming, streamed_only).minimum_budget + where.reserve
            raise ValueError(
                f"budget={format_bytes(where.budget)} is below the minimum for {type(pipe).__name__}: "
                f"{format_bytes(minimum)} (every component streamed: each one's slots, and the reserve). Raise the "
                "budget, lower prefetch, or use granularity='leaf'."
            ) from None
    elif others + where.reserve > where.budget:
        raise ValueError(f"budget={format_bytes(where.budget)} is below the minimum for {type(pipe).__name__}: "
                         f"{format_bytes(others + where.reserve)}.")  # fmt: skip
    return PipelinePlan(tuple(names), tuple(plans[n] for n in names), where.budget)


def wrap_pipeline_for_offload(pipe, *, components: list[str] | None = None, budget=None, max_memory=None,
                              reserve=0, **kwargs):  # fmt: skip
    """Wrap every component of a diffusers pipeline that has weights (transformer or unet, text
    encoders, VAE, ...) under one budget, in place; `pipe(...)` then runs as usual, also with
    `pipe.transformer.compile_repeated_blocks(fullgraph=True)`. The components used once per call
    stream; the denoiser keeps resident as much as the budget allows. `components=` wraps only
    those. Other keyword arguments are wrap_model_for_offload's (device, offload, disk_path,
    storage_dtype, prefetch, ...); each component gets a disk_path folder of its own.

    Example:
        >>> pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
        >>> wrap_pipeline_for_offload(pipe, budget="12GiB")
        >>> pipe.transformer.compile_repeated_blocks(fullgraph=True)
        >>> image = pipe("a cat on the moon").images[0]
        >>> print(offload_report(pipe))
    """
    from pathlib import Path

    from offload_tensor.planner import budget_and_ram
    from offload_tensor.policy import Storage, Streaming, compute_device, placement
    from offload_tensor.wrap import is_wrapped, unwrap_model, wrap_model_for_offload

    found = _pipeline_components(pipe, "wrap_pipeline_for_offload")
    wrapped_already = [n for n, c in found.items() if is_wrapped(c)]
    if getattr(pipe, "_offload_tensor_components", None) or wrapped_already:
        raise ValueError(
            f"{type(pipe).__name__} is already wrapped (components {wrapped_already or pipe._offload_tensor_components}); "
            "call unwrap_pipeline(pipe) before wrapping it again."
        )
    device = kwargs.pop("device", None)
    budget, ram = budget_and_ram(budget, None, max_memory, device if device is not None else compute_device(None))
    disk_path = kwargs.pop("disk_path", None)
    offload = kwargs.get("offload", "cpu")
    where = placement(device, offload, disk_path, budget, reserve)
    storage = Storage(kwargs.get("storage_dtype"), kwargs.get("fp8_scale", "channel"))
    streaming = Streaming(kwargs.get("prefetch", 1), kwargs.get("pin_memory", True), kwargs.get("granularity", "block"))
    if where.budget is not None and where.device.type == "cpu" and where.offload == "cpu":
        raise ValueError(
            "budget= limits what stays where the model computes, but computing on the CPU with offload='cpu' every "
            "weight is there already; to keep part of the pipeline on disk, pass offload='disk' (disk_path=...)."
        )
    planned = plan_pipeline(pipe, storage, streaming, where, components)
    if ram is not None:
        from offload_tensor.planner import check_ram

        check_ram(sum(p.host_bytes for p in planned.plans), ram, where)
    kwargs["offload"] = where.offload
    denoiser = _denoiser(planned.names)
    done = []
    try:
        for name, p in zip(planned.names, planned.plans):
            folder = None if where.disk_path is None else Path(where.disk_path) / name
            wrap_model_for_offload(found[name], device=where.device, disk_path=folder, budget=p.placement.budget,
                                   reserve=p.placement.reserve if name == denoiser else 0, **kwargs)  # fmt: skip
            done.append(name)
    except BaseException:
        for name in done:  # nothing half-wrapped: the components wrapped so far go back
            unwrap_model(found[name])
        raise
    pipe.__dict__["_offload_tensor_components"] = done
    for method in _REFUSED_ON_PIPELINES:
        if hasattr(pipe, method):
            pipe.__dict__[method] = _Refused(method, type(pipe).__name__, "unwrap_pipeline(pipe)")
    return pipe


def unwrap_pipeline(pipe):
    """Give every wrapped component of a pipeline its plain weights back, in place."""
    from offload_tensor.wrap import unwrap_model

    names = pipe.__dict__.get("_offload_tensor_components")
    if not names:
        raise ValueError(f"unwrap_pipeline: {type(pipe).__name__} is not wrapped by wrap_pipeline_for_offload.")
    found = components(pipe)
    for name in names:
        unwrap_model(found[name])
    for method in _REFUSED_ON_PIPELINES:
        pipe.__dict__.pop(method, None)
    del pipe.__dict__["_offload_tensor_components"]
    return pipe


def _pipeline_components(pipe, caller: str) -> dict[str, nn.Module]:
    found = components(pipe)
    if found is None:
        raise TypeError(f"{caller} expects a diffusers pipeline, got {type(pipe).__name__}; for a model use wrap_model_for_offload.")
    return found


class _Refused:
    """Stands in for a method that would work behind the offload's back on a wrapped model or
    pipeline: another offloader's, or QKV fusion's."""

    def __init__(self, method: str, owner: str, fix: str) -> None:
        self.method, self.owner, self.fix = method, owner, fix

    def __call__(self, *args, **kwargs):
        from compile_rules.table import RefusedOpError

        if "fuse" in self.method:
            raise RefusedOpError(
                f"{self.method}() on {self.owner} after wrapping would build plain fused weights (torch.cat of the "
                "offloaded ones) outside the offload and the budget. Fuse before wrap_model_for_offload (the fused "
                f"weights are then offloaded like the others), or call {self.fix} first."
            )
        raise RefusedOpError(
            f"{self.method}() on {self.owner}: its weights are already offloaded by offload_tensor, whose engine moves "
            f"them; combining two offloaders would move weights behind each other's back. Call {self.fix} first."
        )


def keep_in_fp32(model: nn.Module, dtype) -> list[str]:
    """diffusers loads the modules a model names in `_keep_in_fp32_modules` in float32, whatever `torch_dtype`."""
    if not from_library(model, "diffusers"):
        return []
    names = getattr(model, "_keep_in_fp32_modules", None) or ()
    return [names] if isinstance(names, str) else list(names)


INTEGRATION = register(
    Integration("diffusers", "diffusers", check=check, install=install, blocks=blocks, components=components,
                keep_in_fp32=keep_in_fp32)  # fmt: skip
)


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
    import os
    from pathlib import Path

    from offload_tensor.checkpoint import index
    from offload_tensor.wrap import wrap_model_for_offload

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
