"""offload_tensor: run models larger than GPU memory, offloaded and compiled.

Public API only; `docs/design.md` explains the picture behind it.
"""

from compile_rules.table import RefusedOpError
from offload_tensor.engine import Engine, SynchronousEngine
from offload_tensor.integrations import accelerate, diffusers, quanto, torchao, transformers  # noqa: F401, I001 (they register)
from offload_tensor.report import OffloadReport, offload_report
from offload_tensor.tensor import OffloadedTensor
from offload_tensor.wrap import is_wrapped, unwrap_model, wrap_model_for_offload

__all__ = [
    "Engine",
    "OffloadReport",
    "OffloadedTensor",
    "RefusedOpError",
    "SynchronousEngine",
    "is_wrapped",
    "offload_report",
    "unwrap_model",
    "wrap_model_for_offload",
]
