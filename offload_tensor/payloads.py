"""Payload kinds: how an offloaded weight is stored on the offload device and rebuilt for compute.

A kind is a small frozen value (hashable, equal across all weights of the same kind) that travels
in `OffloadedTensor.__tensor_flatten__`'s context; dynamo guards on it, so it must never carry
per-weight identity. A kind declares its inner tensors by name (as torchao's subclasses declare
`tensor_data_names`), encodes a weight into them at wrap time, and rebuilds the compute-dtype
weight from (fetched) inner tensors with traceable torch ops, so inductor can fuse the rebuild
into its consumer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from compile_rules.table import RefusedOpError
from offload_tensor import integrations

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class _Kind:
    """What every kind answers. `in_place_exact`: an in-place op on the payload gives exactly
    what it gives on the weight's value (only a plain payload). `opaque`: dynamo cannot rebuild
    the payload inside a graph (see [Note: opaque linear] in ops.py)."""

    in_place_exact: ClassVar[bool] = False
    opaque: ClassVar[bool] = False

    def __deepcopy__(self, memo):  # immutable: dynamo's guard keeps a deepcopy and compares it per call
        return self

    def logical_size(self, inner: Sequence[torch.Tensor]) -> torch.Size:
        return inner[0].shape

    def logical_stride(self, inner: Sequence[torch.Tensor]) -> tuple[int, ...]:
        return inner[0].stride()


@dataclass(frozen=True)
class Plain(_Kind):
    """The weight itself, in its compute dtype."""

    inner_names: ClassVar[tuple[str, ...]] = ("payload",)
    name: ClassVar[str] = "plain"
    in_place_exact: ClassVar[bool] = True

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (weight,)

    def decode(self, inner: Sequence[torch.Tensor], compute_dtype: torch.dtype) -> torch.Tensor:
        return inner[0]


@dataclass(frozen=True)
class Float8(_Kind):
    """fp8 values and a float32 scale: per output channel (dim 0) or one per tensor.

    Dequantizes as `(qdata.float() * scale).to(compute_dtype)`, computed in float32 and cast
    back so the exposed dtype stays the compute dtype.
    """

    storage_dtype: torch.dtype
    per_channel: bool = True

    inner_names: ClassVar[tuple[str, ...]] = ("qdata", "scale")
    name: ClassVar[str] = "fp8"

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = weight.detach().float()
        fmax = torch.finfo(self.storage_dtype).max
        if w.numel() == 0:  # nothing to scale (amax refuses empty reductions)
            amax = torch.zeros((w.shape[0], *[1] * (w.ndim - 1)) if self.per_channel else ())
        elif self.per_channel:
            amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
        else:
            amax = w.abs().amax()
        # An all-zero channel gets the smallest normal scale instead of a division by zero.
        scale = (amax / fmax).clamp(min=torch.finfo(torch.float32).tiny)
        qdata = (w / scale).clamp(-fmax, fmax).to(self.storage_dtype)
        return qdata, scale

    def decode(self, inner: Sequence[torch.Tensor], compute_dtype: torch.dtype) -> torch.Tensor:
        qdata, scale = inner
        return (qdata.float() * scale).to(compute_dtype)



@dataclass(frozen=True, eq=False)
class Subclass(_Kind):
    """A quantized tensor subclass (torchao, optimum-quanto), kept as its inner tensors.

    The payload's own `__tensor_flatten__` names its inner tensors (`qdata`, `scale`, ... or
    `_data`, `_scale`), recursively where an inner tensor is itself a subclass (quanto's packed
    int4 data); the plain tensors at the leaves become the wrapper's inner tensors, so every one
    of them lives on the offload device and is fetched with the others. `decode` rebuilds the
    payload on the compute device with `__tensor_unflatten__`, and the op then runs through the
    payload's own kernels. The payload's non-tensor attributes (its flatten context) are
    constants here.
    """

    cls: type
    ctx: Any
    top_names: tuple[str, ...]
    children: tuple[tuple[str, Subclass], ...]  # top-level inner tensors that are subclasses
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @functools.cached_property
    def inner_names(self) -> tuple[str, ...]:
        children = dict(self.children)
        names: list[str] = []
        for name in self.top_names:
            if name in children:
                names += [f"{name}__{sub}" for sub in children[name].inner_names]
            else:
                names.append(name)
        return tuple(names)

    @functools.cached_property
    def name(self) -> str:
        carrier = integrations.carrier(self.cls)
        return carrier.name if carrier is not None else self.cls.__module__.split(".")[0]

    @functools.cached_property
    def opaque(self) -> bool:
        """Rebuilt at run time by an opaque op under compile (see [Note: opaque linear] in ops.py)."""
        return integrations.opaque(self.cls)

    @functools.cached_property
    def spec(self) -> str:
        """This kind as a JSON string: the constant argument of `offload_tensor::subclass_linear`."""
        return json.dumps(self._spec(), sort_keys=True)

    def _spec(self) -> dict:
        return {
            "cls": f"{self.cls.__module__}:{self.cls.__qualname__}",
            "ctx": self.ctx,
            "names": list(self.top_names),
            "children": {name: child._spec() for name, child in self.children},
            "size": list(self.size),
            "stride": list(self.stride),
        }

    def __eq__(self, other) -> bool:
        return self is other or (type(other) is Subclass and self._key() == other._key() and self.ctx == other.ctx)

    def _key(self) -> tuple:
        return (self.cls, self.top_names, self.children, self.size, self.stride)

    def __hash__(self) -> int:
        return hash((*self._key(), repr(self.ctx)))

    def __repr__(self) -> str:
        return f"Subclass({self.cls.__qualname__}, {self.inner_names}, size={self.size})"

    def logical_size(self, inner: Sequence[torch.Tensor]) -> torch.Size:
        return torch.Size(self.size)  # packed payloads (quanto int4) have smaller inner tensors

    def logical_stride(self, inner: Sequence[torch.Tensor]) -> tuple[int, ...]:
        return self.stride

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inner tensors of `weight`, which must be quantized exactly as this kind (a write of
        anything else would need a re-quantization offload_tensor does not do)."""
        try:
            same = subclass_kind(weight) == self
        except TypeError:
            same = False
        if not same:
            raise RefusedOpError(
                f"cannot write a {type(weight).__name__} into an offloaded {self.cls.__qualname__} weight quantized "
                f"as {self!r}: load a state dict quantized the same way."
            )
        return self._leaves(weight)

    def _leaves(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        children = dict(self.children)
        inner: list[torch.Tensor] = []
        for name in self.top_names:
            t = getattr(weight, name)
            inner += children[name]._leaves(t) if name in children else [t]
        return tuple(inner)

    def decode(self, inner: Sequence[torch.Tensor], compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        children = dict(self.children)
        parts: dict[str, torch.Tensor] = {}
        i = 0
        for name in self.top_names:
            if name in children:
                n = len(children[name].inner_names)
                parts[name] = children[name].decode(tuple(inner[i : i + n]))
                i += n
            else:
                parts[name] = inner[i]
                i += 1
        return self.cls.__tensor_unflatten__(parts, self.ctx, self.size, self.stride)


PayloadKind = Plain | Float8 | Subclass

SUPPORTED = (
    "plain weights (stored as they are, or in fp8 with storage_dtype=), torchao quantized weights "
    "(quantize_ or diffusers TorchAoConfig) and optimum-quanto frozen weights (or diffusers QuantoConfig)"
)
_subclass_kinds: dict[int, list[Subclass]] = {}


def subclass_kind(weight: torch.Tensor) -> Subclass:
    """The interned kind of a quantized payload, or TypeError when offload_tensor cannot carry it."""
    cls = type(weight)
    if integrations.carrier(cls) is None or not hasattr(weight, "__tensor_flatten__"):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not supported; offload_tensor supports {SUPPORTED}.")
    names, ctx = weight.__tensor_flatten__()
    children = []
    for name in names:
        inner = getattr(weight, name)
        if type(inner) is not torch.Tensor:
            children.append((name, subclass_kind(inner)))
    kind = Subclass(cls, ctx, tuple(names), tuple(children), tuple(weight.shape), tuple(weight.stride()))
    interned = _subclass_kinds.setdefault(hash(kind), [])
    for existing in interned:
        if existing == kind:
            return existing
    interned.append(kind)
    return kind


def stored_bytes(weight: torch.Tensor, kind: PayloadKind) -> int:
    """Bytes `weight` takes stored as `kind` (works on meta tensors: plans are made before loading)."""
    if isinstance(kind, Float8):
        return weight.numel() + (weight.shape[0] if kind.per_channel and weight.ndim else 1) * 4
    return sum(t.numel() * t.element_size() for t in leaves(weight))


def leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data: `t` itself, or a subclass's inner tensors, recursively."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    return [leaf for name in t.__tensor_flatten__()[0] for leaf in leaves(getattr(t, name))]


PLAIN = Plain()


@functools.cache
def _float8(storage_dtype: torch.dtype, per_channel: bool) -> Float8:
    return Float8(storage_dtype, per_channel)


def kind_for(weight: torch.Tensor, storage_dtype: torch.dtype | None, per_channel: bool) -> PayloadKind:
    """fp8 for floating matrices and conv kernels; biases, norms and other 1-d tensors stay plain;
    a weight that is already quantized (a torchao or quanto subclass) keeps its own encoding.

    Kinds are interned: every weight of a kind shares one instance, so the per-call metadata
    guard compares by identity.
    """
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return subclass_kind(weight)
    if storage_dtype is None or weight.ndim < 2 or not weight.is_floating_point() or weight.numel() == 0:
        return PLAIN
    return _float8(storage_dtype, per_channel)
