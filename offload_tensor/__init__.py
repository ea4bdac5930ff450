"""offload_tensor: run models larger than GPU memory, offloaded and compiled.

Public API only; `docs/design.md` explains the picture behind it. Names load on first use, so
`import offload_tensor` (and the command line's --help) does not import torch.
"""

from __future__ import annotations

import importlib

_API = {
    "wrap_model_for_offload": "offload_tensor.wrap",
    "unwrap_model": "offload_tensor.wrap",
    "set_budget": "offload_tensor.replan",
    "is_wrapped": "offload_tensor.state",
    "wrap_pipeline_for_offload": "offload_tensor.pipeline",
    "unwrap_pipeline": "offload_tensor.pipeline",
    "from_pretrained": "offload_tensor.pipeline",
    "plan": "offload_tensor.pipeline",
    "PipelinePlan": "offload_tensor.pipeline",
    "offload_report": "offload_tensor.report",
    "OffloadReport": "offload_tensor.report",
    "Plan": "offload_tensor.planner",
    "Storage": "offload_tensor.policy",
    "Streaming": "offload_tensor.policy",
    "Placement": "offload_tensor.policy",
    "Tier": "offload_tensor.policy",
    "OffloadedTensor": "offload_tensor.tensor",
    "RefusedOpError": "compile_rules.table",
    "CheckpointError": "offload_tensor.checkpoint",
    "Engine": "offload_tensor.engine",
    "SynchronousEngine": "offload_tensor.engine",
}
__all__ = [  # the names of _API
    "CheckpointError",
    "Engine",
    "OffloadReport",
    "OffloadedTensor",
    "PipelinePlan",
    "Placement",
    "Plan",
    "RefusedOpError",
    "Storage",
    "Streaming",
    "SynchronousEngine",
    "Tier",
    "from_pretrained",
    "is_wrapped",
    "offload_report",
    "plan",
    "set_budget",
    "unwrap_model",
    "unwrap_pipeline",
    "wrap_model_for_offload",
    "wrap_pipeline_for_offload",
]



def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'offload_tensor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
