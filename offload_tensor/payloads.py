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
from dataclasses import dataclass
from typing import ClassVar

import torch

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Plain:
    """The weight itself, in its compute dtype."""

    inner_names: ClassVar[tuple[str, ...]] = ("payload",)
    name: ClassVar[str] = "plain"

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (weight,)

    def __deepcopy__(self, memo):  # immutable: dynamo's guard keeps a deepcopy and compares it per call
        return self

    def decode(self, inner: tuple[torch.Tensor, ...], compute_dtype: torch.dtype) -> torch.Tensor:
        return inner[0]

    def write(self, inner: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
        inner[0].copy_(value)


@dataclass(frozen=True)
class Float8:
    """fp8 values and a float32 scale: per output channel (dim 0) or one per tensor.

    Dequantizes as `(qdata.float() * scale).to(compute_dtype)`, computed in float32 and cast
    back so the exposed dtype stays the compute dtype.
    """

    storage_dtype: torch.dtype
    per_channel: bool = True

    inner_names: ClassVar[tuple[str, ...]] = ("qdata", "scale")
    name: ClassVar[str] = "fp8"

    def __deepcopy__(self, memo):
        return self

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = weight.detach().float()
        fmax = torch.finfo(self.storage_dtype).max
        if self.per_channel:
            amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
        else:
            amax = w.abs().amax()
        # An all-zero channel gets the smallest normal scale instead of a division by zero.
        scale = (amax / fmax).clamp(min=torch.finfo(torch.float32).tiny)
        qdata = (w / scale).clamp(-fmax, fmax).to(self.storage_dtype)
        return qdata, scale

    def decode(self, inner: tuple[torch.Tensor, ...], compute_dtype: torch.dtype) -> torch.Tensor:
        qdata, scale = inner
        return (qdata.float() * scale).to(compute_dtype)

    def write(self, inner: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
        qdata, scale = self.encode(value.to(inner[0].device))
        inner[0].copy_(qdata)
        inner[1].copy_(scale)


PayloadKind = Plain | Float8


PLAIN = Plain()


@functools.cache
def _float8(storage_dtype: torch.dtype, per_channel: bool) -> Float8:
    return Float8(storage_dtype, per_channel)


def kind_for(weight: torch.Tensor, storage_dtype: torch.dtype | None, per_channel: bool) -> PayloadKind:
    """fp8 for floating matrices and conv kernels; biases, norms and other 1-d tensors stay plain.

    Kinds are interned: every weight of a kind shares one instance, so the per-call metadata
    guard compares by identity.
    """
    if storage_dtype is None or weight.ndim < 2 or not weight.is_floating_point():
        return PLAIN
    return _float8(storage_dtype, per_channel)
