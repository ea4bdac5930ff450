"""optimum-quanto: frozen weight-only quanto modules, their forward, and their state dicts.

- Forward: a quanto module reads `self.qweight`, which returns the weight only if it is a quanto
  `QTensor` and otherwise *quantizes it again* (every call). An offloaded weight is not a
  `QTensor`, so the module would silently re-quantize, and dynamo fails inside that path. For
  frozen weight-only modules `qweight` is just `self.weight`, so the module's forward is
  `F.linear(input, self.weight, self.bias)` (QLinear) or `self._conv_forward(...)` (QConv2d):
  wrap sets that forward on each such module.
- State dicts: quanto saves a frozen weight flattened (`weight._data`, `weight._scale`, ...) only
  when the weight is a `QTensor`; the wrapped module saves and loads those keys itself, with
  quanto's own (de)serializers, so checkpoints round trip with and without offload_tensor.
- Payloads: quanto tensors take a `qtype` object in their constructor, which dynamo cannot put in
  a graph; they are opaque (see [Note: opaque linear] in ops.py).

Everything set here is an instance attribute of the module, removed by unwrap_model.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from offload_tensor.integrations.registry import Integration, RemoveAttributes, WrapOps, register


def _quanto_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from optimum.quanto.nn import QModuleMixin

    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, QModuleMixin) and m.weight_qtype is not None
    ]


def check(model: nn.Module) -> None:
    """Refuse quanto modules offload_tensor cannot run exactly (before anything changes)."""
    from optimum.quanto import QTensor
    from optimum.quanto.nn import QConv2d, QLinear

    for name, module in _quanto_modules(model):
        problem = None
        if not isinstance(module.weight, QTensor):
            problem = "is quantized but not frozen (call optimum.quanto.freeze(model) first)"
        elif module.activation_qtype is not None:
            problem = "quantizes its activations; offload_tensor supports weight-only quanto modules"
        elif not isinstance(module, (QLinear, QConv2d)):
            problem = f"is a {type(module).__name__}; offload_tensor supports quanto QLinear and QConv2d"
        if problem:
            raise TypeError(f"{name} {problem}.")


def _linear_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(input, module.weight, module.bias)


def _conv_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    return module._conv_forward(input, module.weight, module.bias)


def _save_to_state_dict(module: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    type(module)._save_to_state_dict(module, destination, prefix, keep_vars)  # saves `weight` unflattened
    weight = destination[prefix + "weight"]
    if weight._kind.name != "quanto":
        return  # dequantized (model.dequantize()): a plain weight, saved as one
    del destination[prefix + "weight"]
    weight.payload_value(copy=weight.fetches).save_to_state_dict(destination, prefix + "weight.", keep_vars)


def _load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    from optimum.quanto import WeightQBitsTensor, WeightQBytesTensor

    key = prefix + "weight"
    weight = module._parameters["weight"]
    if key not in state_dict and any(k.startswith(key + ".") for k in state_dict):
        # quanto's own deserializer, with the module's settings and the weight's logical shape;
        # the QTensor is then written into the offloaded weight like any value (copy_).
        common = dict(
            qtype=module.weight_qtype, axis=0, size=weight.size(), stride=weight.stride(), missing_keys=missing
        )
        if module.weight_qtype.bits == 8:
            value = WeightQBytesTensor.load_from_state_dict(
                state_dict, key + ".", activation_qtype=module.activation_qtype, **common
            )
        else:
            value = WeightQBitsTensor.load_from_state_dict(
                state_dict, key + ".", group_size=module.weight_group_size, **common
            )
        if value is None:
            return  # quanto recorded the missing keys
        state_dict[key] = value.to(weight._inner[0].device).optimize()  # laid out as the offloaded payload is
    type(module)._load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


_ROUTED = ("forward", "_save_to_state_dict", "_load_from_state_dict")


def install(model: nn.Module, ops: WrapOps):
    from optimum.quanto.nn import QLinear

    modules = [m for _, m in _quanto_modules(model)]
    for module in modules:
        forward = _linear_forward if isinstance(module, QLinear) else _conv_forward
        # Bound methods, not partials: dynamo guards on the function, shared by every block, where
        # it would guard on the identity of a per-module partial (a recompile per block).
        module.__dict__["forward"] = types.MethodType(forward, module)
        module.__dict__["_save_to_state_dict"] = types.MethodType(_save_to_state_dict, module)
        module.__dict__["_load_from_state_dict"] = types.MethodType(_load_from_state_dict, module)

    return RemoveAttributes(modules, _ROUTED) if modules else None


def _is_quanto(cls: type) -> bool:
    return cls.__module__.startswith("optimum.quanto.")


INTEGRATION = register(
    Integration("quanto", "optimum.quanto", check=check, install=install, carries=_is_quanto, opaque=_is_quanto)
)
