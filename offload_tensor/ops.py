"""The registered custom op that materializes an offloaded weight, and the engine registry it asks.

Invariant: `offload_tensor::fetch(payload, key, after, device)` returns `payload` copied to
`device`. It is a pure function of its inputs; which engine serves it (and whether the copy was prefetched) is
invisible to the compiler and never changes the result.

[Note: fetch hands over ownership]
Inductor treats the op's outputs as buffers of its own and may reuse their memory for later
kernels once the weight is dead. So an engine must hand over tensors that nobody else keeps
(pop a prefetched entry, never return a view of a cache or the payload itself); the op never
returns an alias of its inputs.

[Note: fetch order]
Inductor may reorder independent calls and drops calls whose results are unused, so the engine
looks weights up by key, never by call order or count. To keep a fetch from being hoisted to the
top of a graph (which would make every weight resident at once), the op takes `after`: the
activation the weight is about to meet. That data dependency pins each fetch behind the compute
that produced its input, so fetches run in execution order.
"""

from __future__ import annotations

import importlib
import itertools
import json
import weakref
from collections.abc import Iterable

import torch

from compile_rules.check import FetchStats
from offload_tensor.engine import Engine, SynchronousEngine

# [Note: weight identity]
# Each fetched weight carries a key: a 0-d int64 tensor assigned at wrap from one counter, so keys
# are unique in the process (zero-size weights, weights sharing storage and payloads freed and
# reallocated at the same address all keep their own). It is one of the wrapper's inner tensors,
# so under compile it is a graph input like the payload, never a constant in the graph or the
# flatten context (a constant would be guarded on: a recompile per block, or a block served
# another block's weights). An alias of a weight (detach, `.data`) shares its key; a clone gets
# a new one.
_keys = itertools.count(1)

# key -> the engine of the model that owns the weight. A key that is not registered is served by
# the synchronous engine: correct, just not prefetched. Weak values: the model (its OffloadState)
# owns its engine; a model dropped without unwrap_model must not stay alive here with its host
# arenas.
_engines: weakref.WeakValueDictionary[int, Engine] = weakref.WeakValueDictionary()
_synchronous = SynchronousEngine()


def new_key() -> torch.Tensor:
    return torch.tensor(next(_keys), dtype=torch.int64)


def register_engine(keys: Iterable[int], engine: Engine) -> None:
    for key in keys:
        _engines[key] = engine


def unregister_engine(key: int, engine: Engine) -> None:
    """Forget `key`, if `engine` is the one serving it."""
    if _engines.get(key) is engine:
        del _engines[key]


def before_write(key: torch.Tensor) -> None:
    """A weight's payload is about to change in place: the engine serving it must finish reading
    its host copy and forget any device copy it holds (they would be stale)."""
    engine = _engines.get(int(key))
    if engine is not None and hasattr(engine, "invalidate"):
        engine.invalidate()


# cudagraph_unsafe: inductor keeps the op out of captured CUDA-graph partitions (a replayed fetch
# would serve stale weights); torch versions without the tag get the backend's capture check.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("offload_tensor::fetch", mutates_args=(), tags=_TAGS)
def fetch(
    payload: list[torch.Tensor], key: torch.Tensor, after: torch.Tensor | None, device: torch.device
) -> list[torch.Tensor]:
    """Copy the payload tensors of the weight `key` to `device` (see the notes above)."""
    FetchStats.calls += 1
    k = int(key)
    return _engines.get(k, _synchronous).fetch(k, payload, device)


@fetch.register_fake
def _(payload, key, after, device) -> list[torch.Tensor]:
    return [torch.empty_like(t, device=device) for t in payload]


def _remember_payload_count(ctx, inputs, output) -> None:
    ctx.payload_count = len(inputs[0])


def _no_gradient(ctx, grads):
    # Offloaded weights are frozen, and `after` is an ordering dependency, not a value the
    # result depends on: nothing flows back. Registered so that training an adapter on top of
    # offloaded weights (the activations require grad) can run backward through the fetch.
    return [None] * ctx.payload_count, None, None, None


fetch.register_autograd(_no_gradient, setup_context=_remember_payload_count)


# [Note: opaque linear]
# Some payload subclasses cannot be rebuilt inside a compiled graph: optimum-quanto's tensors take
# a `qtype` object in their constructor, which dynamo cannot put in a graph. For those, a compiled
# F.linear runs as this op: it rebuilds the payload from its fetched inner tensors at run time and
# calls F.linear on it, so the payload's own kernel runs exactly as in eager. Everything that
# identifies the payload type travels as strings, stable across processes (inductor's caches).


def _rebuild(spec: dict, inner: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    module, qualname = spec["cls"].split(":")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    parts, used = {}, 0
    for name in spec["names"]:
        if name in spec["children"]:
            parts[name], n = _rebuild(spec["children"][name], inner[used:])
            used += n
        else:
            parts[name] = inner[used]
            used += 1
    return cls.__tensor_unflatten__(parts, spec["ctx"], spec["size"], spec["stride"]), used


@torch.library.custom_op("offload_tensor::subclass_linear", mutates_args=(), tags=_TAGS)
def subclass_linear(
    input: torch.Tensor, inner: list[torch.Tensor], bias: torch.Tensor | None, spec: str
) -> torch.Tensor:
    """F.linear(input, <payload rebuilt from inner by spec>, bias) (see [Note: opaque linear])."""
    return torch.nn.functional.linear(input, _rebuild(json.loads(spec), inner)[0], bias)


@subclass_linear.register_fake
def _(input, inner, bias, spec):
    return torch.nn.functional.linear(input, _rebuild(json.loads(spec), inner)[0], bias)
