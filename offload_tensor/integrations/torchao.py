"""torchao: its quantized weights (quantize_, diffusers TorchAoConfig) are payloads offloaded as
their inner tensors; torchao's own kernels run on them once fetched."""

from __future__ import annotations

from offload_tensor.integrations.registry import Integration, register

INTEGRATION = register(Integration("torchao", "torchao", carries=lambda cls: cls.__module__.startswith("torchao.")))
