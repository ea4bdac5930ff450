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

import types

import torch
from torch import nn

from offload_tensor.integrations import Integration, from_library, register

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
    if getattr(model, "hf_quantizer", None) is None:
        return None
    model.__dict__["dequantize"] = types.MethodType(dequantize, model)
    return lambda: model.__dict__.pop("dequantize", None)


def dequantize(model: nn.Module) -> nn.Module:
    """ModelMixin.dequantize for a wrapped model: every quantized payload is replaced, where it
    lives, by a plain payload holding its dequantized value; then diffusers deletes its quantizer
    as usual. Checked before anything changes."""
    from offload_tensor.payloads import PLAIN, Subclass
    from offload_tensor.tensor import OffloadedTensor
    from offload_tensor.wrap import named_parameter_slots, offload_state

    state = offload_state(model, "dequantize")
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
            module._parameters[name] = plain[id(p)]
            if isinstance(module, nn.Linear) and getattr(module.extra_repr, "__func__", None) is not nn.Linear.extra_repr:
                module.extra_repr = types.MethodType(nn.Linear.extra_repr, module)  # as diffusers does
    model.__dict__.pop("dequantize", None)
    return type(model).dequantize(model)  # finds no quantized weight left; deletes the quantizer


INTEGRATION = register(Integration("diffusers", "diffusers", check=check, install=install, blocks=blocks))
