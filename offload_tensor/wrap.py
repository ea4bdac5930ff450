"""wrap_model_for_offload / unwrap_model: validate everything first, then mutate.

Invariant: a model is either untouched or completely wrapped. Every check (arguments, hooks of
other offloaders, meta or unsupported weights) runs before the first change, and the new
parameters are all built before any is assigned, so an error leaves nothing half-wrapped.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from offload_tensor import integrations, ops
from offload_tensor.engine import Engine, SynchronousEngine
from offload_tensor.payloads import FLOAT8_DTYPES, SUPPORTED, kind_for, leaves, subclass_kind
from offload_tensor.tensor import OffloadedTensor, RefusedOpError

log = logging.getLogger("offload_tensor")

@dataclass
class OffloadState:
    """What wrapping changed, kept on the root module so unwrap_model can undo exactly that."""

    compute_device: torch.device
    engine: Engine
    # qualified name of each parameter's first slot -> (device, requires_grad) before wrapping;
    # by name, not id, so that a deep copy of the model can be unwrapped too
    originals: dict[str, tuple[torch.device, bool, bool]]  # (device, requires_grad, is_inference)
    # (module, buffer name) -> device before wrapping
    buffer_devices: dict[tuple[nn.Module, str], torch.device]
    hook_handles: list = field(default_factory=list)
    undo: list = field(default_factory=list)  # what the integrations installed, undone by unwrap


def named_parameter_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every place a parameter is held: (qualified name, owning module, attribute, parameter).
    Tied parameters appear once per place."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                yield (f"{module_name}.{name}" if module_name else name), module, name, param


def weight_groups(model: nn.Module, weights: list[torch.Tensor], granularity: str) -> list[list[int]]:
    """Indices into `weights`, grouped: one group per repeated block (granularity="block"), and
    one per module for the weights of modules outside blocks (or for all, granularity="leaf")."""
    block_names = integrations.block_names(model)
    index = {id(w): i for i, w in enumerate(weights)}
    groups: list[list[int]] = []
    placed: set[int] = set()

    def take(params) -> list[int]:
        found = [index[id(p)] for p in params if id(p) in index and index[id(p)] not in placed]
        placed.update(found)
        return found

    for module in model.modules():
        if granularity == "block" and type(module).__name__ in block_names:
            group = take(module.parameters())
        else:
            group = take(p for p in module._parameters.values() if p is not None)
        if group:
            groups.append(group)
    return groups


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("_offload_state"), OffloadState)


def wrap_model_for_offload(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    offload: str | torch.device = "cpu",
    storage_dtype: torch.dtype | None = None,
    fp8_scale: str = "channel",
    prefetch: int = 1,
    pin_memory: bool = True,
    granularity: str = "block",
    engine: Engine | None = None,
) -> nn.Module:
    """Replace every parameter of `model` by an `OffloadedTensor`, in place, and return `model`.

    Args:
        device: the compute device; `None` means CUDA when available, else the CPU (logged once).
        offload: where the weights live between uses ("cpu").
        storage_dtype: `torch.float8_e4m3fn` or `torch.float8_e5m2` stores matrices and conv
            kernels in fp8 with a float32 scale, dequantized on fetch; biases, norms and other 1-d
            weights keep their dtype. The exposed dtype stays the compute dtype.
        fp8_scale: "channel" (one scale per output channel) or "tensor" (one per weight).
        prefetch: how many groups the streaming engine fetches ahead (0: none).
        pin_memory: keep host payloads in pinned memory for the streaming engine's asynchronous
            copies; the synchronous engine copies from pageable memory either way.
        granularity: "block" (the model's repeated blocks, from diffusers' `_repeated_blocks` or
            transformers' `_no_split_modules`, move as one copy each; other weights by module) or
            "leaf" (each module's own weights move together). Used by engines that group.
        engine: who serves fetches. By default the synchronous engine, and no fetch at all when
            the offload device is the compute device (zero-copy). An explicit engine serves every
            fetch, even on the same device (tests, tracing); one with `prepare` (the streaming
            engine) receives the weights grouped and keeps them in one host arena per group.

    Example:
        >>> model = wrap_model_for_offload(model, device="cuda", storage_dtype=torch.float8_e4m3fn)
        >>> model.compile_repeated_blocks(fullgraph=True)
        >>> print(offload_report(model))
    """
    # -- validate: nothing below this block may fail after the first mutation ---------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model_for_offload expects an nn.Module, got {type(model).__name__}.")
    compute_device = _compute_device(device)
    offload_device = _offload_device(offload)
    if storage_dtype is not None and storage_dtype not in FLOAT8_DTYPES:
        raise ValueError(
            f"storage_dtype={storage_dtype} is not supported; use torch.float8_e4m3fn, torch.float8_e5m2 "
            "or None (keep the weights' own dtype)."
        )
    if fp8_scale not in ("channel", "tensor"):
        raise ValueError(f"fp8_scale={fp8_scale!r} is not supported; use 'channel' or 'tensor'.")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be an int >= 0 (the number of groups fetched ahead).")
    if not isinstance(pin_memory, bool):
        raise ValueError(f"pin_memory={pin_memory!r} must be True or False.")
    if granularity not in ("block", "leaf"):
        raise ValueError(f"granularity={granularity!r} is not supported; use 'block' or 'leaf'.")
    if is_wrapped(model):
        raise ValueError(
            f"{type(model).__name__} is already wrapped by offload_tensor; call unwrap_model(model) before "
            "wrapping it again with other settings."
        )
    integrations.check(model)
    slots = list(named_parameter_slots(model))
    for qualname, _, _, param in slots:
        _check_parameter(qualname, param)

    # -- build: new parameters and buffer copies, nothing assigned yet ---------------------
    # Built as normal tensors even under torch.inference_mode(): the model must stay writable
    # (load_state_dict) outside it, as it was.
    with torch.inference_mode(False):
        fetches = engine is not None or offload_device != compute_device
        if engine is None:
            engine = _default_engine(compute_device, offload_device, pin_memory)
        per_channel = fp8_scale == "channel"
        unique = list({id(param): param for _, _, _, param in slots}.values())  # tied weights once
        kinds = [kind_for(param, storage_dtype, per_channel) for param in unique]
        payloads = [tuple(t.to(offload_device) for t in k.encode(p.detach())) for k, p in zip(kinds, unique)]
        keys = [ops.new_key() if fetches else None for _ in unique]
        if hasattr(engine, "prepare"):
            groups = weight_groups(model, unique, granularity)
            grouped = engine.prepare(
                [[payloads[i] for i in group] for group in groups],
                prefetch,
                [[int(keys[i]) for i in group] for group in groups],
            )
            for group, group_payloads in zip(groups, grouped):
                for i, payload in zip(group, group_payloads):
                    payloads[i] = payload
        wrapped: dict[int, nn.Parameter] = {}
        for param, kind, inner, key in zip(unique, kinds, payloads, keys):
            tensor = OffloadedTensor(inner, kind, param.dtype, compute_device, key)
            wrapped[id(param)] = nn.Parameter(tensor, requires_grad=False)
    first_name: dict[int, str] = {}
    for qualname, _, _, param in slots:
        first_name.setdefault(id(param), qualname)
    originals = {first_name[id(p)]: (leaves(p)[0].device, p.requires_grad, p.is_inference()) for p in unique}
    buffers = [
        (module, name, buf, buf.to(compute_device))
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]

    # -- mutate ------------------------------------------------------------------------------
    state = OffloadState(
        compute_device=compute_device,
        engine=engine,
        originals=originals,
        buffer_devices={(module, name): buf.device for module, name, buf, _ in buffers},
    )
    for _, module, name, param in slots:
        setattr(module, name, wrapped[id(param)])  # as modules expect (nn.RNN refreshes its weight list)
    for module, name, _, moved in buffers:
        module._buffers[name] = moved
    dtypes = tuple({p.dtype for p in wrapped.values() if p.is_floating_point()} | {torch.float32})
    for module in model.modules():
        # An instance attribute shadows nn.Module._apply for .to()/.half()/.cuda() on this module.
        module.__dict__["_apply"] = functools.partial(_guarded_apply, module, dtypes, compute_device)
        module.__dict__[_WRAPPED_MODULE] = True
        if any(isinstance(p, OffloadedTensor) for p in module._parameters.values()):
            state.hook_handles.append(module.register_state_dict_post_hook(_plain_state_dict))
    state.undo = integrations.install(model)
    if fetches:
        ops.register_engine((int(p._key) for p in wrapped.values()), engine)
    _install_assignment_hook()
    model.__dict__["_offload_state"] = state
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """Give `model` plain `nn.Parameter`s back on their original devices, in place.

    Plain payloads come back bit-exact (the same storage when the device did not change); fp8
    payloads come back dequantized, i.e. the values the model computed with.

    Example:
        >>> unwrap_model(wrap_model_for_offload(model)).state_dict()  # equal to the original
    """
    state = offload_state(model, "unwrap_model")
    plain: dict[int, nn.Parameter] = {}
    slots = list(named_parameter_slots(model))
    for qualname, _, _, param in slots:  # build every parameter before changing anything
        if id(param) in plain or not isinstance(param, OffloadedTensor):
            continue
        # A weight moved to another module since wrapping has no recorded origin: it stays where
        # its payload is.
        device, requires_grad, inference = state.originals.get(qualname, (param._inner[0].device, False, False))
        # A weight created under inference_mode (diffusers' tests build models so) comes back as one.
        with torch.inference_mode(inference):
            value = param.payload_value().to(device)
            if inference and not value.is_inference():
                value = value.clone()
            plain[id(param)] = nn.Parameter(value, requires_grad=requires_grad)
    for _, _, _, param in slots:
        if isinstance(param, OffloadedTensor) and param._key is not None:
            ops.unregister_engine(int(param._key), state.engine)
    for module in model.modules():
        module.__dict__.pop("_apply", None)
        module.__dict__.pop(_WRAPPED_MODULE, None)  # before assigning: plain weights are not written through
    for _, module, name, param in slots:
        if id(param) in plain:
            setattr(module, name, plain[id(param)])
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # plain weights again: one chunk for cuDNN, as before wrapping
    for (module, name), device in state.buffer_devices.items():
        if module._buffers.get(name) is not None:
            module._buffers[name] = module._buffers[name].to(device)
    for handle in state.hook_handles:
        handle.remove()
    for undo in state.undo:
        undo()
    if hasattr(state.engine, "close"):
        state.engine.close()
    del model.__dict__["_offload_state"]
    return model


def _default_engine(compute_device: torch.device, offload_device: torch.device, pin_memory: bool) -> Engine:
    """Streaming from pinned host memory when computing on CUDA; nothing to move otherwise."""
    if compute_device.type == "cuda" and offload_device.type == "cpu":
        from offload_tensor.engine.cuda import CudaBackend
        from offload_tensor.engine.streaming import StreamingEngine

        return StreamingEngine(CudaBackend(compute_device, pin_memory=pin_memory))
    return SynchronousEngine()


def offload_state(model: nn.Module, caller: str) -> OffloadState:
    if not is_wrapped(model):
        raise ValueError(
            f"{caller}: {type(model).__name__} is not wrapped by offload_tensor (never wrapped, or already "
            "unwrapped); call wrap_model_for_offload(model) first."
        )
    return model.__dict__["_offload_state"]


_announced_cpu = False


def _compute_device(device: str | torch.device | None) -> torch.device:
    global _announced_cpu
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not _announced_cpu:
            _announced_cpu = True
            log.info("offload_tensor: CUDA is not available; computing on the CPU (pass device= to choose).")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'.") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asks for CUDA, which is not available here; use device='cpu' or None.")
        return torch.device("cuda", torch.cuda.current_device() if resolved.index is None else resolved.index)
    if resolved.type != "cpu":
        raise ValueError(f"device={device!r}: offload_tensor computes on 'cuda' or 'cpu'.")
    return resolved


def _offload_device(offload: str | torch.device) -> torch.device:
    if isinstance(offload, torch.device):
        resolved = offload
    elif isinstance(offload, (str, os.PathLike)) and (os.sep in os.fspath(offload) or os.path.isdir(offload)):
        raise ValueError(
            f"offload={os.fspath(offload)!r} names a folder: the disk tier comes with the streaming engine and "
            "is not available yet; use offload='cpu'."
        )
    else:
        try:
            resolved = torch.device(offload)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"offload={offload!r} is not understood; use offload='cpu'.") from e
    if resolved.type != "cpu":
        raise ValueError(f"offload={offload!r}: weights are offloaded to 'cpu' (the host); got {resolved}.")
    return torch.device("cpu")


def _check_parameter(qualname: str, param: torch.Tensor) -> None:
    if isinstance(param, OffloadedTensor):
        raise ValueError(
            f"{qualname} is already an OffloadedTensor (this module is part of a wrapped model); wrap a model "
            "once, from its root, or unwrap_model the outer model first."
        )
    if any(t.is_meta for t in leaves(param)):  # a quantized wrapper may be on meta with real data
        raise ValueError(
            f"{qualname} is on the meta device (the model was created without weights, e.g. under "
            "init_empty_weights or low_cpu_mem_usage); load its weights before wrap_model_for_offload."
        )
    if type(param) is nn.Parameter and type(param.data) is torch.Tensor:
        return
    if type(param) is not nn.Parameter and is_traceable_wrapper_subclass(param):
        try:
            subclass_kind(param)
            return
        except TypeError as e:
            reason = str(e)
    else:
        cls = type(param) if type(param) is not nn.Parameter else type(param.data)
        reason = f"{cls.__module__}.{cls.__qualname__} is not supported; offload_tensor supports {SUPPORTED}."
    raise TypeError(f"{qualname}: {reason} Load the model without that quantization backend, or quantize it with torchao.")


def _guarded_apply(module: nn.Module, dtypes: tuple[torch.dtype, ...], device: torch.device, fn, recurse=True):
    """nn.Module._apply for a wrapped module (`.to()`, `.half()`, `.cuda()`, ...).

    Offloaded weights are never passed to `fn`: a device move is ignored with a warning (the
    weights are fetched to the compute device anyway), a dtype change is refused (it would be
    lost on the payload, or silently unwrap the weights). Buffers follow `fn` as usual.
    """
    for dtype in dtypes:
        probe = torch.empty(0, dtype=dtype, device=device)
        try:
            moved = fn(probe)
        except RuntimeError:  # e.g. .cuda() on a machine without CUDA
            moved = torch.empty(0, dtype=dtype, device="meta")
        if moved.dtype != dtype:
            raise RuntimeError(
                f"{type(module).__name__} is wrapped by offload_tensor; changing its dtype ({dtype} -> {moved.dtype}) "
                "after wrapping is not supported. Call unwrap_model(model), convert, and wrap again, or use "
                "storage_dtype= to store the weights in fp8."
            )
        if moved.device != device:
            warnings.warn(
                f"{type(module).__name__}.to({moved.device}) ignored: its weights are managed by offload_tensor, "
                f"which computes on {device}. To change the compute device, unwrap_model(model) and wrap again "
                "with device=.",
                stacklevel=4,
            )
            return module
    if recurse:
        for child in module.children():
            child._apply(fn)
    for name, buf in module._buffers.items():
        if buf is not None:
            module._buffers[name] = fn(buf)
    return module


def _plain_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Hands out plain tensors (the payload, or its dequantized value) on the offload device, so
    # safetensors can save them and a plain model can load them.
    for name, param in module._parameters.items():
        if isinstance(param, OffloadedTensor) and prefix + name in state_dict:
            state_dict[prefix + name] = param.payload_value().detach()


_WRAPPED_MODULE = "_offload_tensor_wrapped"
_assignment_hook = None


def _install_assignment_hook() -> None:
    global _assignment_hook
    if _assignment_hook is None:
        _assignment_hook = nn.modules.module.register_module_parameter_registration_hook(_assigned_parameter)


def _assigned_parameter(module: nn.Module, name: str, param: torch.Tensor | None):
    """A parameter assigned to a wrapped module in place of an offloaded weight
    (`load_state_dict(sd, assign=True)`, `module.weight = nn.Parameter(t)`): its value is written
    into the offloaded weight, which stays in place, so the model never silently holds a plain
    weight while it reports itself wrapped (an fp8 model computing at full precision, or a weight
    the engine never streams). Parameters under new names (adapters) stay as they are."""
    if param is None or isinstance(param, OffloadedTensor) or not module.__dict__.get(_WRAPPED_MODULE):
        return None
    current = module._parameters.get(name)
    if not isinstance(current, OffloadedTensor):
        return None
    if param.shape != current.shape or param.dtype != current.dtype:
        raise RefusedOpError(
            f"assigning a {tuple(param.shape)} {param.dtype} parameter to {type(module).__name__}.{name}, an offloaded "
            f"{tuple(current.shape)} {current.dtype} weight, would change its shape or dtype after wrapping; "
            "unwrap_model(model) first, or assign a value of the same shape and dtype (it is written into the weight)."
        )
    with torch.no_grad():
        current.copy_(param.detach())
    return current
