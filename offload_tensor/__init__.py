"""offload_tensor: run models larger than GPU memory, offloaded and compiled.

Public API only; see DESIGN.md for the picture behind it.
"""

from offload_tensor.engine import Engine, RecordingEngine, SynchronousEngine
from offload_tensor.report import OffloadReport, offload_report
from offload_tensor.tensor import OffloadedTensor, RefusedOpError
from offload_tensor.wrap import is_wrapped, unwrap_model, wrap_model_for_offload

__all__ = [
    "Engine",
    "OffloadReport",
    "OffloadedTensor",
    "RecordingEngine",
    "RefusedOpError",
    "SynchronousEngine",
    "is_wrapped",
    "offload_report",
    "unwrap_model",
    "wrap_model_for_offload",
]
