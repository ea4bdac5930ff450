"""transformers: a model's `_no_split_modules` are its repeated blocks (decoder layers); a model
loaded from a checkpoint is tied first, as transformers' own loading ties it."""

from __future__ import annotations

from torch import nn

from offload_tensor.integrations import Integration, from_library, register


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


INTEGRATION = register(Integration("transformers", "transformers", blocks=blocks, before_load=before_load))
