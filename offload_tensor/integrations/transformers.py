"""transformers: a model's `_no_split_modules` are its repeated blocks (decoder layers); a model
loaded from a checkpoint is tied first, as transformers' own loading ties it; the modules it keeps
in float32 when loaded in another dtype."""

from __future__ import annotations

import torch
from torch import nn

from offload_tensor.integrations.registry import Integration, from_library, register


def blocks(model: nn.Module) -> list[str]:
    if not from_library(model, "transformers"):
        return []
    return list(getattr(model, "_no_split_modules", None) or ())


def before_load(model: nn.Module) -> None:
    # transformers ties the output embedding to the input one when it loads (`tie_weights`,
    # following the config); a model built under init_empty_weights is not tied yet, and its
    # checkpoint (save_pretrained) holds the tied weight under one name only.
    if from_library(model, "transformers") and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()


def keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> list[str]:
    # As transformers loads: `_keep_in_fp32_modules_strict` in float16 and bfloat16,
    # `_keep_in_fp32_modules` in float16 only.
    if not from_library(model, "transformers") or dtype not in (torch.float16, torch.bfloat16):
        return []
    names = list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return names + list(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else names


INTEGRATION = register(
    Integration("transformers", "transformers", blocks=blocks, before_load=before_load, keep_in_fp32=keep_in_fp32)
)
