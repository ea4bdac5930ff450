"""accelerate: its hooks (enable_model_cpu_offload, enable_sequential_cpu_offload, cpu_offload,
device_map offloading) move weights themselves; a model carrying them is refused."""

from __future__ import annotations

from torch import nn

from offload_tensor.integrations.registry import Integration, register


def check(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "_hf_hook", None) is not None:
            raise ValueError(
                f"{name or type(model).__name__} carries an accelerate hook (enable_model_cpu_offload, "
                "enable_sequential_cpu_offload, cpu_offload or device_map offloading), which moves weights itself; "
                "remove it (accelerate.hooks.remove_hook_from_module(model, recurse=True), or load without "
                "device_map) before wrap_model_for_offload."
            )


INTEGRATION = register(Integration("accelerate", "accelerate", check=check))
