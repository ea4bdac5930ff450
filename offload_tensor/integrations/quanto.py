"""optimum-quanto: route frozen weight-only quanto modules through their functional op.

A quanto module reads `self.qweight`, which returns the weight only if it is a quanto `QTensor`
and otherwise *quantizes it again* (every call). An offloaded weight is not a `QTensor`, so the
module would silently re-quantize, and dynamo fails inside that path. For frozen weight-only
modules `qweight` is just `self.weight`, so the module's forward is `F.linear(input, self.weight,
self.bias)` (QLinear) or `self._conv_forward(input, self.weight, self.bias)` (QConv2d): wrap sets
that forward on each such module (an instance attribute, removed by unwrap_model).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _quanto_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from optimum.quanto.nn import QModuleMixin
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QModuleMixin)]


def check(model: nn.Module) -> None:
    """Refuse quanto modules offload_tensor cannot run exactly (before anything changes)."""
    from optimum.quanto import QTensor
    from optimum.quanto.nn import QConv2d, QLinear

    for name, module in _quanto_modules(model):
        if module.weight_qtype is None:
            continue
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


def route(model: nn.Module) -> list[nn.Module]:
    """Set the weight-only forward on every quanto module with a quantized weight; returns them."""
    from optimum.quanto.nn import QLinear

    routed = []
    for _, module in _quanto_modules(model):
        if module.weight_qtype is None:
            continue
        forward = _linear_forward if isinstance(module, QLinear) else _conv_forward
        # A bound method, not a partial: dynamo guards on the function, shared by every block,
        # where it would guard on the identity of a per-module partial (a recompile per block).
        module.__dict__["forward"] = types.MethodType(forward, module)
        routed.append(module)
    return routed


def unroute(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)
