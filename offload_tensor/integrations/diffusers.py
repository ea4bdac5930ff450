"""diffusers: repeated blocks, hooks that move or cast weights, `dequantize()`, QKV fusion, the
models a pipeline holds, the modules a model keeps in float32.

- A model's `_repeated_blocks` (else its `_no_split_modules`) are its blocks: one copy each.
- Group offloading and layerwise casting hooks move or cast weights themselves: a model carrying
  them is refused; on a wrapped model (and pipeline) their methods are refused.
- QKV fusion (`fuse_qkv_projections`, an attention module's `fuse_projections`, and unfusing):
  diffusers builds the fused projections from the offloaded weights as plain parameters; on a
  wrapped model they are then offloaded like the others (and removed ones let go of).
- `model.dequantize()` on a wrapped quantized model: diffusers' own walks the modules for weights
  that are torchao tensors, finds none (they are offloaded wrappers), and would report success
  with the payloads still quantized. A wrapped model gets an instance `dequantize` that
  dequantizes the payloads where they live, then lets diffusers finish its bookkeeping.

Pipelines are planned and wrapped by offload_tensor.pipeline; this module only names their parts.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from offload_tensor.integrations.registry import Integration, RemoveAttributes, WrapOps, from_library, register

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


def install(model: nn.Module, ops: WrapOps):
    """Instance methods on a wrapped diffusers model: `dequantize` (quantized models), QKV fusion
    whose fused weights are offloaded like the others, and a clear refusal of diffusers' own
    offloading and casting."""
    if not from_library(model, "diffusers"):
        return None
    added = []
    if getattr(model, "hf_quantizer", None) is not None:
        model.__dict__["dequantize"] = functools.partial(_dequantize, model, ops)
        added.append("dequantize")
    for method in _REFUSED_ON_MODELS:
        if hasattr(model, method):
            model.__dict__[method] = Refused(method, type(model).__name__, "unwrap_model(model)")
            added.append(method)
    undo = [RemoveAttributes([model], tuple(added))]
    repeated = tuple(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in repeated and "forward" not in m.__dict__]
    for block in blocks:
        block.__dict__["forward"] = _own_outputs(block)
    undo.append(RemoveAttributes(blocks, ("forward",)))
    for owner, methods in [(model, _FUSION), *((m, _MODULE_FUSION) for m in model.modules() if m is not model)]:
        present = tuple(name for name in methods if callable(getattr(owner, name, None)))
        for name in present:
            owner.__dict__[name] = _Fusing(model, owner, name, ops)
        if present:
            undo.append(RemoveAttributes([owner], present))
    return _Undo(undo)


class _OwnOutputs:
    """A repeated block's forward on a wrapped model: the block's own, whose outputs, in compiled
    code that trains, share no memory with one another.

    [Note: aliased outputs of a compiled block]
    `compile_repeated_blocks` compiles each block's forward. A Flux single-stream block returns two
    slices of one tensor; when they require grad, AOTAutograd returns their base as an extra
    output and regenerates the slices from it, and it refuses that whenever any input of the
    graph is a tensor subclass ("output aliasing ... if there are any subclass outputs": its check
    counts subclass inputs too). The block's offloaded weights are its graph's inputs, so a
    wrapped block that trains was refused, where the plain one compiles. So in compiled code with
    grad, every output that is a view requiring grad except the last is cloned: the last is then
    the only output aliasing its base (which AOTAutograd hides from autograd without an extra
    output), the graph has no aliased outputs, and inductor writes the clone from the kernel that
    computes its base. Eager code, and inference, get the block's outputs as they are.

    Dynamo keeps compiled code per code object, and compiles this `__call__` where it compiled the
    block's forward: each block class gets a subclass whose `__call__` is a code object of its
    own (`_own_outputs`), or the classes would share one cache and recompile for one another.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block, self.forward = block, type(block).forward  # the function: dynamo traces it

    def __call__(self, *args, **kwargs):
        out = self.forward(self.block, *args, **kwargs)
        if not torch.compiler.is_compiling() or not torch.is_grad_enabled() or not isinstance(out, tuple):
            return out
        views = [i for i, o in enumerate(out) if _differentiable_view(o)]
        return tuple(o.clone() if i in views[:-1] else o for i, o in enumerate(out))

    def __reduce__(self):  # pickles and deep-copies as the block it serves
        return _own_outputs, (self.block,)


_OWN_OUTPUTS: dict[type, type] = {}


def _own_outputs(block: nn.Module) -> _OwnOutputs:
    kind = _OWN_OUTPUTS.get(type(block))
    if kind is None:
        call = _OwnOutputs.__call__
        code = call.__code__.replace(co_name=f"{type(block).__name__}_forward")
        own_call = types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)
        kind = _OWN_OUTPUTS[type(block)] = type(f"_OwnOutputs_{type(block).__name__}", (_OwnOutputs,),
                                                {"__call__": own_call})  # fmt: skip
    return kind(block)


def _differentiable_view(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and t._base is not None


class _Fusing:
    """A QKV fusion method of a wrapped model or of one of its attention modules: diffusers' own
    (it builds the fused projections from the offloaded weights, or removes them), after which the
    weights it built are offloaded like the others and those it removed are let go of; once per
    call from the outermost (the model's own calls each module's)."""

    def __init__(self, root: nn.Module, owner: nn.Module, method: str, ops: WrapOps) -> None:
        self.root, self.owner, self.method, self.ops = root, owner, method, ops

    def __call__(self, *args, **kwargs):
        run = getattr(type(self.owner), self.method)
        if self.root.__dict__.get(_FUSING):
            return run(self.owner, *args, **kwargs)
        before = {id(p) for p in self.root.parameters()}
        self.root.__dict__[_FUSING] = True
        try:
            return run(self.owner, *args, **kwargs)
        finally:
            del self.root.__dict__[_FUSING]
            self.ops.update_weights(self.root, before)  # also after a failure midway: nothing left plain


class _Undo:
    """Several undos as one value (pickles, deep-copies)."""

    def __init__(self, undos: list) -> None:
        self.undos = undos

    def __call__(self) -> None:
        for undo in self.undos:
            undo()


def _dequantize(model: nn.Module, ops: WrapOps) -> nn.Module:
    """ModelMixin.dequantize for a wrapped model: every quantized payload is replaced, where it
    lives, by its dequantized value (`ops`, the wrap's own operation), then diffusers deletes its
    quantizer as usual. A quantizer diffusers cannot dequantize raises diffusers' own error first,
    before anything changed."""
    from diffusers.quantizers.base import DiffusersQuantizer

    if type(model.hf_quantizer)._dequantize is DiffusersQuantizer._dequantize:  # quanto and others
        DiffusersQuantizer._dequantize(model.hf_quantizer, model)  # raises, nothing changed
    ops.dequantize_payloads(model)
    for module in model.modules():
        if isinstance(module, nn.Linear) and getattr(module.extra_repr, "__func__", None) is not nn.Linear.extra_repr:
            module.extra_repr = types.MethodType(nn.Linear.extra_repr, module)  # as diffusers' dequantize does
    model.__dict__.pop("dequantize", None)
    return type(model).dequantize(model)  # finds no quantized weight left; deletes the quantizer


# -- pipelines ---------------------------------------------------------------------------------
DENOISERS = ("transformer", "unet", "prior", "decoder")  # components run every step, in this order of preference
REFUSED_ON_PIPELINES = ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload")
_REFUSED_ON_MODELS = ("enable_group_offload", "enable_layerwise_casting")
_FUSION = ("fuse_qkv_projections", "unfuse_qkv_projections")  # a model's (AttentionMixin)
_MODULE_FUSION = ("fuse_projections", "unfuse_projections")  # an attention module's
_FUSING = "_offload_tensor_fusing"


def components(obj) -> dict[str, nn.Module] | None:
    """A diffusers pipeline's models with weights, by component name (None for anything else)."""
    if not from_library(obj, "diffusers") or isinstance(obj, nn.Module) or not hasattr(obj, "components"):
        return None
    return {
        name: c
        for name, c in obj.components.items()
        if isinstance(c, nn.Module) and next(c.parameters(), None) is not None
    }


def denoiser(names) -> str | None:
    """The component run every step (the others run once per call)."""
    return next((n for n in DENOISERS if n in names), None)


class Refused:
    """Stands in for another offloader's method on a wrapped model or pipeline."""

    def __init__(self, method: str, owner: str, fix: str) -> None:
        self.method, self.owner, self.fix = method, owner, fix

    def __call__(self, *args, **kwargs):
        from compile_rules.table import RefusedOpError

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
