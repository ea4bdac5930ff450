"""compile_rules.check: compile a model or function and report its compile health.

Counts what users of torch.compile care about: graph breaks (with reasons), recompiles (with
reasons), unique graphs, and how many fetches of offloaded weights one compiled forward makes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters


class FetchStats:
    """Run-time count of fetches of offloaded weights (eager and compiled); the fetch op counts."""

    calls = 0


@dataclass
class CompileReport:
    graph_breaks: int
    graphs: int
    recompiles: int
    fetches_per_forward: int
    compile_seconds: float
    break_reasons: list[str] = field(default_factory=list)
    recompile_reasons: list[str] = field(default_factory=list)
    output: Any = field(default=None, repr=False)  # what the last compiled call returned

    def __str__(self) -> str:
        lines = [
            f"graph breaks: {self.graph_breaks}, graphs: {self.graphs}, recompiles: {self.recompiles}, "
            f"fetches per forward: {self.fetches_per_forward}, compile: {self.compile_seconds:.1f} s"
        ]
        lines += [f"  break: {r}" for r in self.break_reasons]
        lines += [f"  recompile: {r}" for r in self.recompile_reasons]
        return "\n".join(lines)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check(
    fn_or_module: Callable | nn.Module,
    *args,
    repeated_blocks: bool = False,
    backend: str = "inductor",
    fullgraph: bool = False,
    **kwargs,
) -> CompileReport:
    """Compile `fn_or_module`, call it twice with `args`/`kwargs`, and report compile health.

    `repeated_blocks=True` compiles a diffusers model with `compile_repeated_blocks` instead of
    `torch.compile` of the whole. The second call measures fetches per forward. This resets
    dynamo's caches (so counts belong to this call), leaves the module uncompiled, and resets
    torch's log settings (`torch._logging.set_logs()`) when it is done.

    Example:
        >>> print(compile_rules.check(model, hidden_states, repeated_blocks=True))
        graph breaks: 0, graphs: 3, recompiles: 1, fetches per forward: 24, compile: 41.2 s
    """
    torch._dynamo.reset()
    counters.clear()
    capture = _Capture()
    recompile_log = logging.getLogger("torch._dynamo.guards.__recompiles")
    torch._logging.set_logs(recompiles=True)
    recompile_log.addHandler(capture)
    recompile_log.propagate = False  # collected here, not printed (set_logs resets propagation)
    compiled_modules: list[nn.Module] = []
    try:
        start = time.perf_counter()
        if repeated_blocks:
            if not isinstance(fn_or_module, nn.Module) or not hasattr(fn_or_module, "compile_repeated_blocks"):
                raise TypeError("repeated_blocks=True needs a diffusers model (one with compile_repeated_blocks).")
            fn_or_module.compile_repeated_blocks(backend=backend, fullgraph=fullgraph)
            compiled_modules = [m for m in fn_or_module.modules() if m._compiled_call_impl is not None]
            compiled = fn_or_module
        else:
            compiled = torch.compile(fn_or_module, backend=backend, fullgraph=fullgraph)
        with torch.no_grad():
            compiled(*args, **kwargs)
            compile_seconds = time.perf_counter() - start
            before = FetchStats.calls
            out = compiled(*args, **kwargs)
            fetches = FetchStats.calls - before
    finally:
        torch._logging.set_logs()
        recompile_log.removeHandler(capture)
        recompile_log.propagate = True
        for module in compiled_modules:
            module._compiled_call_impl = None
    breaks = counters["graph_break"]
    return CompileReport(
        graph_breaks=sum(breaks.values()),
        graphs=counters["stats"]["unique_graphs"],
        recompiles=len(capture.messages),
        fetches_per_forward=fetches,
        compile_seconds=compile_seconds,
        break_reasons=list(breaks),
        recompile_reasons=capture.messages,
        output=out,
    )
