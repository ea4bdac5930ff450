"""compile_rules: how each op treats an offloaded weight, and a checker of compile health."""

from compile_rules.check import CompileReport, check
from compile_rules.table import ATEN_RULES, TORCH_FUNCTION_RULES, Rule, aten_rule

__all__ = ["ATEN_RULES", "TORCH_FUNCTION_RULES", "CompileReport", "Rule", "aten_rule", "check"]
