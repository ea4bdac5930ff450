"""compile_rules: how each op treats an offloaded weight, and a checker of compile health.

Depends on torch only; offload_tensor implements the `Offloaded` protocol the rules talk to.
"""

from compile_rules.check import CompileReport, FetchStats, check
from compile_rules.table import (
    ATEN_RULES,
    TORCH_FUNCTION_RULES,
    Offloaded,
    RefusedOpError,
    aten_rule,
    implements,
    implements_torch_function,
)

__all__ = [
    "ATEN_RULES",
    "TORCH_FUNCTION_RULES",
    "CompileReport",
    "FetchStats",
    "Offloaded",
    "RefusedOpError",
    "aten_rule",
    "check",
    "implements",
    "implements_torch_function",
]
