"""transformers: a model's `_no_split_modules` are its repeated blocks (decoder layers)."""

from __future__ import annotations

from torch import nn

from offload_tensor.integrations import Integration, from_library, register


def blocks(model: nn.Module) -> list[str]:
    if not from_library(model, "transformers"):
        return []
    return list(getattr(model, "_no_split_modules", None) or ())


INTEGRATION = register(Integration("transformers", "transformers", blocks=blocks))
