"""offload_tensor: run models larger than GPU memory, offloaded and compiled.

Public API only; `docs/design.md` explains the picture behind it. Names load on first use, so
`import offload_tensor` (and the command line's --help) does not import torch.
"""

from __future__ import annotations

import importlib

_API = {
    "wrap_model_for_offload": "offload_tensor.wrap",
    "unwrap_model": "offload_tensor.wrap",
    "set_budget": "offload_tensor.wrap",
    "is_wrapped": "offload_tensor.wrap",
    "wrap_pipeline_for_offload": "offload_tensor.integrations.diffusers",
    "unwrap_pipeline": "offload_tensor.integrations.diffusers",
    "from_pretrained": "offload_tensor.integrations.diffusers",
    "offload_report": "offload_tensor.report",
    "OffloadReport": "offload_tensor.report",
    "plan": "offload_tensor.planner",
    "Plan": "offload_tensor.planner",
    "Tier": "offload_tensor.policy",
    "OffloadedTensor": "offload_tensor.tensor",
    "RefusedOpError": "compile_rules.table",
    "CheckpointError": "offload_tensor.checkpoint",
    "Engine": "offload_tensor.engine",
    "SynchronousEngine": "offload_tensor.engine",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'offload_tensor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
