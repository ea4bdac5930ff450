"""What a wrapped model's modules do differently: the patches wrapping installs and unwrap_model
removes.

- `_apply` (`.to()`, `.half()`, `.cuda()`, ...): an instance attribute on every module, which
  never passes offloaded weights to the function (a device move is ignored with a warning, a dtype
  change refused, a memory format not applied, with a warning); buffers follow it as usual.
- `state_dict()`: a post-hook hands out plain tensors for offloaded weights (`keep_vars=True`:
  the parameters themselves).
- Assigning a parameter over an offloaded weight (`load_state_dict(assign=True)`,
  `module.weight = nn.Parameter(t)`): a global parameter-registration hook writes the value into
  the offloaded weight instead, on wrapped modules only.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import nn

from compile_rules.table import RefusedOpError
from offload_tensor.tensor import OffloadedTensor


def install(model: nn.Module, dtypes: tuple[torch.dtype, ...], device: torch.device) -> list:
    """Patch every module of `model`; returns the state-dict hooks' handles (for `remove`)."""
    handles = []
    for module in model.modules():
        # An instance attribute shadows nn.Module._apply for .to()/.half()/.cuda() on this module.
        module.__dict__["_apply"] = functools.partial(_guarded_apply, module, dtypes, device)
        module.__dict__[_WRAPPED_MODULE] = True
        if any(isinstance(p, OffloadedTensor) for p in module._parameters.values()):
            handles.append(module.register_state_dict_post_hook(_plain_state_dict))
    _install_assignment_hook()
    return handles


def remove(model: nn.Module, handles: list) -> None:
    """Undo `install`: plain weights assigned after this are not written through."""
    for module in model.modules():
        module.__dict__.pop("_apply", None)
        module.__dict__.pop(_WRAPPED_MODULE, None)
    for handle in handles:
        handle.remove()


def _guarded_apply(module: nn.Module, dtypes: tuple[torch.dtype, ...], device: torch.device, fn, recurse=True):
    """nn.Module._apply for a wrapped module (`.to()`, `.half()`, `.cuda()`, ...).

    Offloaded weights are never passed to `fn`: a device move is ignored with a warning (the
    weights are fetched to the compute device anyway; a move to a device this torch lacks too),
    a dtype change is refused (it would be lost on the payload, or silently unwrap the weights),
    a memory format (`channels_last`) is not applied to them, with a warning. Buffers follow `fn`
    as usual.
    """
    for dtype in dtypes:
        probe = torch.empty(0, dtype=dtype, device=device)
        try:
            moved = fn(probe)
        except (RuntimeError, AssertionError) as e:  # .cuda() on a torch built without CUDA: AssertionError
            moved, failed = None, e
        if moved is not None and moved.dtype != dtype:
            raise RuntimeError(
                f"{type(module).__name__} is wrapped by offload_tensor; changing its dtype ({dtype} -> {moved.dtype}) "
                "after wrapping is not supported. Call unwrap_model(model), convert, and wrap again, or use "
                "storage_dtype= to store the weights in fp8."
            )
        if moved is None or moved.device != device:
            target = f".to({moved.device})" if moved is not None else f" move ({str(failed).splitlines()[0]})"
            warnings.warn(
                f"{type(module).__name__}{target} ignored: its weights are managed by offload_tensor, "
                f"which computes on {device}. To change the compute device, unwrap_model(model) and wrap again "
                "with device=.",
                stacklevel=4,
            )
            return module
    if _first_time(fn) and _changes_layout(fn, device):
        warnings.warn(
            f"{type(module).__name__}.to(memory_format=...) is not applied to offloaded weights: they keep the layout "
            "they were wrapped with (outputs are the same; a GPU may run the convolutions slower). Convert the model "
            "before wrap_model_for_offload, which keeps a weight's layout.",
            stacklevel=4,
        )
    if recurse:
        for child in module.children():
            child._apply(fn)
    for name, buf in module._buffers.items():
        if buf is not None:
            module._buffers[name] = fn(buf)
    return module


_seen_apply: weakref.WeakSet = (
    weakref.WeakSet()
)  # the functions of _apply calls checked (once per call, not per module)


def _first_time(fn) -> bool:
    try:
        if fn in _seen_apply:
            return False
        _seen_apply.add(fn)
    except TypeError:  # not weakly referenceable: checked at every module
        pass
    return True


def _changes_layout(fn, device: torch.device) -> bool:
    """Whether `fn` converts 4-d or 5-d tensors to another memory format (channels_last)."""
    for probe in (torch.empty(1, 2, 2, 2, device=device), torch.empty(1, 2, 2, 2, 2, device=device)):
        if fn(probe).stride() != probe.stride():
            return True
    return False


def _plain_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Hands out plain tensors (the payload, or its decoded value) on the offload device, so
    # safetensors can save them and a plain model can load them. A payload an engine fetches is
    # handed out as a copy: a write into it would reach the payload without the engine knowing
    # (its device copy stale). `state_dict(keep_vars=True)` hands out the parameters themselves,
    # whose writes land or are refused like any other.
    for name, param in module._parameters.items():
        key = prefix + name
        if isinstance(param, OffloadedTensor) and key in state_dict and state_dict[key] is not param:
            state_dict[key] = param.payload_value(copy=param.fetches).detach()


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
