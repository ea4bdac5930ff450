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
    if engine is not None:
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


# [Note: one fetch per group]
# A streamed weight belongs to a group (a repeated block, or a module's own weights) that moves
# in one copy; its payload tensors are regions of the group's bytes. So a weight of a streamed
# group reads the whole group with `fetch_group` and takes views of its regions:
# - Compiled code: every weight calls the op where it is used (with its own `after`), and an
#   inductor pass (`OneFetchPerGroup`) keeps the first call per group key in a graph and points
#   the others at it, so a graph copies each group once. The group's bytes live from the first to
#   the last use of its weights (the plan counts one group for it). The op hands its output over
#   as `fetch` does.
# - Eager code: the engine copies the group once per visit and the group's weights read views of
#   that copy until compute moves on (`Engine.group_bytes`); eager code keeps nothing it reads.
@torch.library.custom_op("offload_tensor::fetch_group", mutates_args=(), tags=_TAGS)
def fetch_group(group_key: torch.Tensor, after: torch.Tensor | None, device: torch.device, nbytes: int) -> torch.Tensor:
    """All `nbytes` bytes of the group `group_key`, copied to `device` (see the note above)."""
    FetchStats.calls += 1
    k = int(group_key)
    engine = _engines.get(k)
    if engine is None:
        raise RuntimeError(f"no engine serves the weight group {k}: its model was unwrapped, or re-planned since")
    return engine.fetch_group(k, device)


@fetch_group.register_fake
def _(group_key, after, device, nbytes) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


fetch_group.register_autograd(lambda ctx, grad: (None,) * 4, setup_context=lambda ctx, inputs, output: None)


def group_bytes(group_key: torch.Tensor) -> torch.Tensor:
    """Eager code's read of a group's bytes (see [Note: one fetch per group]); counted as a fetch
    when the engine copied the group for it (not when it served its copy of this visit again)."""
    k = int(group_key)
    engine = _engines.get(k)
    if engine is None:
        raise RuntimeError(f"no engine serves the weight group {k}: its model was unwrapped, or re-planned since")
    group, copied = engine.group_bytes(k)
    FetchStats.calls += copied
    return group


def _install_group_pass() -> None:
    """Inductor's post-grad pass that keeps one `fetch_group` per group key in a graph (chained
    after a pass the user set before offload_tensor was imported)."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class OneFetchPerGroup(CustomGraphPass):
        def __init__(self, then=None) -> None:
            self.then = then

        def __call__(self, graph: torch.fx.Graph) -> None:
            first: dict = {}
            for node in list(graph.nodes):
                if node.op == "call_function" and node.target is torch.ops.offload_tensor.fetch_group.default:
                    if node.args[0] in first:
                        node.replace_all_uses_with(first[node.args[0]])
                        graph.erase_node(node)
                    else:
                        first[node.args[0]] = node
            if self.then is not None:
                self.then(graph)

        def uuid(self):
            return (get_hash_for_files((__file__,)), self.then.uuid() if hasattr(self.then, "uuid") else None)

    current = config.post_grad_custom_pre_pass
    if not isinstance(current, OneFetchPerGroup) and type(current).__name__ != "OneFetchPerGroup":
        config.post_grad_custom_pre_pass = OneFetchPerGroup(current)


_install_group_pass()


# [Note: backward fetches again, compiled]
# AOTAutograd traces forward and backward as one joint graph, then partitions it: whatever the
# backward reads of the forward is saved, so every fetched weight a backward op needs (F.linear's
# input gradient reads its weight) would live from the forward's fetch to its backward use, most
# of the model at the turn. Before partitioning, this pass gives each backward op that reads a
# forward value computed from fetched weights alone (a fetch, views of its bytes, a decode) a copy
# of that computation of its own, whose fetch is ordered (`after`) behind one of the op's backward
# inputs: backward fetches where it uses a weight, the partitioner saves no fetched weight (only
# the graph's inputs: payloads and keys), and the post-grad pass keeps one fetch per group in the
# backward graph as in the forward one. The same as eager code's saved-tensor hooks (see [Note:
# backward fetches again] in compile_rules.table), for compiled code.
_AFTER_ARG = {torch.ops.offload_tensor.fetch.default: 2, torch.ops.offload_tensor.fetch_group.default: 1}


def refetch_in_backward(gm: torch.fx.GraphModule) -> int:
    """Rewrite a joint graph as the note above says; the number of backward reads rewritten."""
    graph = gm.graph
    backward: set = set()
    from_weights: set = set()  # forward nodes computed from fetched weights alone
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(a in backward for a in inputs):
            backward.add(node)
        elif node.op == "call_function" and (
            node.target in _AFTER_ARG or (inputs and all(a in from_weights for a in inputs))
        ):
            from_weights.add(node)
    rewritten = 0
    for user in [n for n in graph.nodes if n in backward and n.op == "call_function"]:
        used = [a for a in user.all_input_nodes if a in from_weights]
        anchor = next((a for a in user.all_input_nodes if a in backward), None)
        if not used or anchor is None:
            continue
        copies: dict = {}
        for node in used:
            user.replace_input_with(node, _replay(graph, node, user, anchor, copies))
            rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return rewritten


def _replay(graph: torch.fx.Graph, node, user, anchor, copies: dict):
    """A copy of `node`, computed from fetched weights alone, before `user`; its fetches ordered
    behind `anchor`."""
    if node not in copies:
        if node.target in _AFTER_ARG:
            args = list(node.args)
            args[_AFTER_ARG[node.target]] = anchor
            with graph.inserting_before(user):
                copy = graph.call_function(node.target, tuple(args), dict(node.kwargs))
            copy.meta = {k: v for k, v in node.meta.items() if k != "eager_input_vals"}
        else:
            for a in node.all_input_nodes:
                _replay(graph, a, user, anchor, copies)
            with graph.inserting_before(user):
                copy = graph.node_copy(node, lambda a: copies[a])
        copies[node] = copy
    return copies[node]


def _install_joint_pass() -> None:
    """AOTAutograd's joint-graph pass (chained before one set before offload_tensor was imported).
    AOTAutograd's cache key leaves the pass out; a graph with offloaded inputs has the source of
    this module in its key (`OffloadedTensor._stable_hash_for_caching`)."""
    from torch._functorch import config

    current = config.joint_custom_pass
    if getattr(current, "__name__", None) == "refetching_in_backward":
        return

    def refetching_in_backward(gm, joint_inputs):
        refetch_in_backward(gm)
        return current(gm, joint_inputs) if callable(current) else gm

    config.joint_custom_pass = refetching_in_backward


_install_joint_pass()


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


# Training through an opaque linear: the input gradient is `grad @ weight` with the payload's own
# kernel (quanto's QuantizedLinearFunction.backward computes the same matmul). The inner tensors it
# needs are fetched values, which the joint-graph pass fetches again in backward ([Note: backward
# fetches again, compiled]); the weight itself is frozen, so no weight gradient.
@torch.library.custom_op("offload_tensor::subclass_linear_input_grad", mutates_args=(), tags=_TAGS)
def subclass_linear_input_grad(grad: torch.Tensor, inner: list[torch.Tensor], spec: str) -> torch.Tensor:
    """grad @ <payload rebuilt from inner by spec>: F.linear's gradient for its input."""
    return torch.matmul(grad, _rebuild(json.loads(spec), inner)[0])


@subclass_linear_input_grad.register_fake
def _(grad, inner, spec):
    return torch.matmul(grad, _rebuild(json.loads(spec), inner)[0])


def _subclass_linear_setup(ctx, inputs, output) -> None:
    _, inner, _, spec = inputs
    ctx.save_for_backward(*inner)
    ctx.spec = spec


def _subclass_linear_backward(ctx, grad):
    input_grad = bias_grad = None
    if ctx.needs_input_grad[0]:
        input_grad = subclass_linear_input_grad(grad, list(ctx.saved_tensors), ctx.spec)
    if ctx.needs_input_grad[2]:
        bias_grad = grad.reshape(-1, grad.shape[-1]).sum(0)
    return input_grad, [None] * len(ctx.saved_tensors), bias_grad, None


subclass_linear.register_autograd(_subclass_linear_backward, setup_context=_subclass_linear_setup)
