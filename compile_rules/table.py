"""How each op treats an offloaded weight: one row per op, naming the function that handles it.

Rows are registered the way torchao registers its subclass ops: a small function per behaviour,
under decorators that list the ops it handles (`@implements(aten.copy_)`,
`@implements_torch_function(F.linear)`). There are two levels. Torch-function rows catch calls
before they decompose (`F.linear` reaches the dispatcher as `aten.t` + `aten.addmm`; a quantized
payload implements `F.linear` but not `aten.t`), so the payload's own kernel runs on the fetched
payload. Aten rows catch everything that reaches `__torch_dispatch__`.

The behaviours:
    materialize     fetch the offloaded arguments, run the op on the fetched tensors
    metadata        answer from the weight's shape, stride, dtype and device; fetch nothing
    alias           another wrapper of the same weight (detach, alias: nn.Parameter, `.data`)
    clone           a new, independent weight: the payload copied where it lives (deepcopy)
    view            eager: a lazy view that reads and writes through its weight; traced: materialize
    copy_into       re-encode a value into the payload (copy_: load_state_dict)
    write_in_place  an in-place or out= op writing a weight: runs on the payload when that is
                    exact (plain payloads), else refused; lands whole or not at all
    set_data        `w.data = v`: another offloaded weight of the same kind is written through
    set_item        `w[index] = v`: written into a plain payload
    frozen          `requires_grad_(True)` is refused: offloaded weights are frozen
    refuse          raise RefusedOpError, naming what to do instead

An aten op without a row: a view gets `view`, an op that writes an offloaded argument (in place,
or through `out=`, as its schema says) gets `write_in_place`, anything else `materialize` (the
safe default: a copy, never a wrong answer), logged once at debug level.

This package does not import offload_tensor: handlers talk to an offloaded weight through the
`Offloaded` protocol below, which `offload_tensor.OffloadedTensor` implements.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

aten = torch.ops.aten
log = logging.getLogger("compile_rules")

Handler = Callable[[Any, tuple, dict], Any]
TORCH_FUNCTION_RULES: dict[Callable, Handler] = {}
ATEN_RULES: dict[torch._ops.OpOverloadPacket, Handler] = {}
_RESOLVED: dict[torch._ops.OpOverload, Handler] = {}  # aten_rule's answers, cleared when a row is added


class RefusedOpError(RuntimeError):
    """An op would change an offloaded weight in a way offload_tensor does not carry out. Raised
    before anything changed."""


class Offloaded(torch.Tensor):
    """What the rules ask of an offloaded weight (offload_tensor.OffloadedTensor implements it).

    The wrapper's own shape, stride, dtype and device are the ones the model computes with.
    """

    # The tensor to compute with when nothing needs fetching or decoding (a zero-copy plain
    # payload), else None: the eager fast path reads it without a call.
    _direct: torch.Tensor | None
    # Whether an in-place op on the payload gives exactly what it gives on the weight's value
    # (a plain payload); an encoded payload (fp8, quantized) would be re-encoded, so it is not.
    in_place_exact: bool

    def materialize(self, after: torch.Tensor | None = None) -> torch.Tensor:
        """The weight on the compute device, in the compute dtype (`after`: the activation it is
        about to meet, which orders the fetch behind the compute that produced it)."""
        raise NotImplementedError

    def alias(self) -> Offloaded:
        raise NotImplementedError

    def clone_weight(self) -> torch.Tensor:
        """A new, independent weight with this one's value (a view's clone: a plain tensor)."""
        raise NotImplementedError

    def lazy_view(self, func, args: tuple, kwargs: dict) -> Any:
        """`func(self, *args[1:], **kwargs)` as offloaded wrappers that read and write through
        this weight."""
        raise NotImplementedError

    def write(self, value: torch.Tensor) -> None:
        """Replace the weight's value by `value`: re-encoded as the payload is, or, when `value` is an
        offloaded weight of the same encoding, its payload copied as it is."""
        raise NotImplementedError

    def write_in_place(self, run: Callable[[torch.Tensor], None]) -> None:
        """Call `run(scratch)` on a copy of the payload; if it returns, the copy becomes the
        payload. Only where `in_place_exact`."""
        raise NotImplementedError

    def linear_override(self) -> Callable | None:
        """A function to run F.linear with this weight instead of fetching it, or None."""
        raise NotImplementedError


def implements(*ops: torch._ops.OpOverloadPacket) -> Callable[[Handler], Handler]:
    """Register the decorated function as the row of each aten op (all overloads)."""

    def register(handler: Handler) -> Handler:
        for op in ops:
            ATEN_RULES[op] = handler
        _RESOLVED.clear()  # a row added after lookups began replaces what they resolved
        return handler

    return register


def implements_torch_function(*funcs: Callable) -> Callable[[Handler], Handler]:
    """Register the decorated function as the torch-function row of each function."""

    def register(handler: Handler) -> Handler:
        for func in funcs:
            TORCH_FUNCTION_RULES[func] = handler
        return handler

    return register


# -- materialize ------------------------------------------------------------------------------
@implements_torch_function(
    F.linear, F.bilinear,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm, F.instance_norm, F.prelu,
    # read the values on the host side: C refuses these on a tensor subclass
    torch.Tensor.tolist,
    # nn.RNN/GRU/LSTM pass all their weights as one list: each fetched once and the fused kernel
    # runs (without a row the op decomposes, and each piece fetches its weights again)
    torch._VF.lstm, torch._VF.gru, torch._VF.rnn_tanh, torch._VF.rnn_relu,
)  # fmt: skip
def materialize(func, args: tuple, kwargs: dict):
    # The eager hot path (F.linear & co. on every weight, every step): one pass over the
    # arguments, no pytree, no logging, and no call at all for a zero-copy weight.
    if is_jit_tracing():
        refuse_jit_trace()
    after = None
    pending = False
    resolved = []
    for a in args:
        if isinstance(a, Offloaded):
            direct = a._direct
            if direct is None:
                pending = True
                resolved.append(a)
            else:
                resolved.append(direct)
        elif isinstance(a, torch.Tensor):
            if after is None:
                after = a
            resolved.append(a)
        else:
            if isinstance(a, (list, tuple)) and any(isinstance(t, Offloaded) for t in a):
                pending = True  # a list of weights (torch.lstm & co.); FX passes an immutable_list
            resolved.append(a)
    if pending:
        if func is F.linear and len(resolved) > 1 and isinstance(resolved[1], Offloaded):
            linear = resolved[1].linear_override()
            if linear is not None:  # a payload that runs F.linear its own way (see OffloadedTensor)
                return linear(*resolved, **kwargs)
        weights, resolved = resolved, [_fetched(a, after) for a in resolved]
    else:
        weights = None
    kw_weights = None
    if kwargs and any(isinstance(v, Offloaded) for v in kwargs.values()):
        kw_weights = kwargs
        kwargs = {k: v.materialize(after) if isinstance(v, Offloaded) else v for k, v in kwargs.items()}
    if torch.is_grad_enabled() and (weights or kw_weights) and not torch.compiler.is_compiling():
        if _needs_grad(resolved) or _needs_grad(list(kwargs.values())):
            return _saving_no_fetched_weight(func, weights or (), resolved, kw_weights or {}, kwargs)
    return func(*resolved, **kwargs)


@implements_torch_function(F.embedding)
def embedding(func, args: tuple, kwargs: dict):
    # With max_norm, F.embedding first renormalizes the rows it looks up, in the weight itself: a
    # write, which lands in the payload (or is refused) like any other, before the read.
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    if max_norm is None:  # every lookup without max_norm: straight to the eager hot path
        return materialize(func, args, kwargs)
    bound = dict(zip(("input", "weight", "padding_idx", "max_norm", "norm_type"), args)) | kwargs
    if not isinstance(bound["weight"], Offloaded):
        return materialize(func, args, kwargs)
    with torch.no_grad():
        torch.embedding_renorm_(
            bound["weight"], bound["input"].contiguous(), bound["max_norm"], bound.get("norm_type", 2.0)
        )
    args = tuple(None if i == 3 else a for i, a in enumerate(args))
    return materialize(func, args, {k: None if k == "max_norm" else v for k, v in kwargs.items()})


@implements_torch_function(torch.Tensor.numpy, torch.Tensor.__array__)
def to_numpy(func, args: tuple, kwargs: dict):
    # The array is over a fetched or decoded copy, or over the payload without telling any engine:
    # read-only, so a write through it raises in numpy instead of going nowhere.
    array = materialize(func, args, kwargs)
    array.flags.writeable = False
    return array


def _fetched(a, after):
    if isinstance(a, Offloaded):
        return a.materialize(after)
    if isinstance(a, (list, tuple)):
        return [t.materialize(after) if isinstance(t, Offloaded) else t for t in a]
    return a


# [Note: backward fetches again]
# Autograd saves what an op needs for its input gradient: F.linear saves its weight, so a fetched
# weight would stay alive from forward to backward, every one of them (the offloading gone while
# training). Instead, while an op that met fetched weights runs with grad, saved-tensor hooks are
# pushed around it: a tensor it saves that is one of its fetched weights (or a view of one) is
# saved as that weight and the view's geometry, and backward fetches the weight again through
# the same engine, in backward order (the scheduler learns forward and backward as one cycle).
# Any other saved tensor goes to the hooks that were active (torch.utils.checkpoint's, a user's),
# or is saved as it is. The hooks cover this op's fetched weights only, and exist only in eager
# code: in compiled code the op is traced, and aten ops reached through __torch_dispatch__ run
# below autograd, which saved the offloaded weight itself (backward dispatches again, and
# fetches). Offloaded weights are frozen, so no weight gradient is ever asked of them.
_push_saved_hooks = torch._C._autograd._push_saved_tensors_default_hooks
_pop_saved_hooks = torch._C._autograd._pop_saved_tensors_default_hooks
_top_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_saved_hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled


def _needs_grad(args: list) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
            return True
    return False


class _Refetch:
    """A saved fetched weight: the weight, and the saved view's geometry relative to its fetch
    (`size` None: the fetched tensor itself, a quantized subclass)."""

    __slots__ = ("weight", "size", "stride", "offset")

    def __init__(self, weight: Offloaded, size: torch.Size | None, stride: tuple[int, ...], offset: int) -> None:
        self.weight, self.size, self.stride, self.offset = weight, size, stride, offset

    def fetch(self) -> torch.Tensor:
        w = self.weight.materialize()
        if self.size is None:  # the fetched quantized subclass itself
            return w
        return w.as_strided(self.size, self.stride, w.storage_offset() + self.offset)


class _Passed:
    """A tensor the hooks that were active packed: their unpack, and what they packed."""

    __slots__ = ("unpack", "packed")

    def __init__(self, unpack: Callable, packed: Any) -> None:
        self.unpack, self.packed = unpack, packed


def _saving_no_fetched_weight(func, weights, fetched: list, kw_weights: dict, kwargs: dict):
    """`func(*fetched, **kwargs)`, with no fetched weight (`weights` and `kw_weights`, before
    their fetch) saved for backward (see the note)."""
    if not _saved_hooks_enabled():  # functorch transforms disable saved-tensor hooks
        return func(*fetched, **kwargs)
    by_storage: dict[int, tuple[Offloaded, torch.Tensor]] = {}
    # A quantized weight is fetched as its own subclass (quanto's QBytesTensor, which quanto's
    # linear saves as it is), which has no storage to match views by: matched as that object.
    by_id: dict[int, Offloaded] = {}

    def remember(weight, tensor) -> None:
        if not isinstance(weight, Offloaded):
            return
        if type(tensor) is torch.Tensor:
            by_storage[tensor.untyped_storage()._cdata] = (weight, tensor)
        elif isinstance(tensor, torch.Tensor):
            by_id[id(tensor)] = weight

    for weight, tensor in zip(weights, fetched):
        if isinstance(weight, (list, tuple)):
            for w, t in zip(weight, tensor):
                remember(w, t)
        else:
            remember(weight, tensor)
    for k, v in kw_weights.items():
        remember(v, kwargs[k])
    outer = _top_saved_hooks(False)

    def pack(t):
        if type(t) is torch.Tensor:
            hit = by_storage.get(t.untyped_storage()._cdata)
            if hit is not None and hit[1].dtype == t.dtype:
                return _Refetch(hit[0], t.size(), t.stride(), t.storage_offset() - hit[1].storage_offset())
        elif id(t) in by_id:
            return _Refetch(by_id[id(t)], None, (), 0)
        return t if outer is None else _Passed(outer[1], outer[0](t))

    _push_saved_hooks(pack, _unpack)
    try:
        return func(*fetched, **kwargs)
    finally:
        _pop_saved_hooks()
        # Autograd keeps the hooks (this `pack` too) with each tensor they packed, until
        # backward: `pack` must not keep the fetched weights alive.
        by_storage.clear()
        by_id.clear()


def _unpack(saved):
    if type(saved) is _Refetch:
        return saved.fetch()
    if type(saved) is _Passed:
        return saved.unpack(saved.packed)
    return saved


is_jit_tracing = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing  # the fast one where it exists


def refuse_jit_trace() -> None:
    raise RefusedOpError(
        "torch.jit.trace cannot trace offloaded weights: TorchScript has no tensor subclasses, so the trace would "
        "bake every weight into the graph as a constant (resident on the compute device, never offloaded; fp8 "
        "weights folded to full precision). Use torch.compile (or compile_repeated_blocks) or torch.export.export, "
        "which keep the fetch in the graph, or unwrap_model(model) before tracing."
    )


def _materialize_all(func, args: tuple, kwargs: dict):
    after = next((a for a in args if isinstance(a, torch.Tensor) and not isinstance(a, Offloaded)), None)
    fetch = lambda t: t.materialize(after)  # noqa: E731
    return func(*tree_map_only(Offloaded, fetch, args), **tree_map_only(Offloaded, fetch, kwargs))


# Compute ops that meet weights in models (decomposed linears, norm scales, casts): listed so that
# their rule is a decision, not a default. Composite ops (reshape, matmul, allclose) never reach
# the dispatcher: they arrive decomposed into these.
implements(
    aten._to_copy, aten.addmm, aten.mm, aten.bmm, aten.add, aten.sub, aten.mul, aten.div,
    aten.cat, aten.stack, aten.equal,
)(_materialize_all)  # fmt: skip


# -- metadata ---------------------------------------------------------------------------------
def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


@implements(
    aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like,
    aten.new_empty, aten.new_empty_strided, aten.new_zeros, aten.new_ones, aten.new_full,
)  # fmt: skip
def metadata(func, args: tuple, kwargs: dict):
    """Tensors made "like" a weight need its metadata, not its values."""
    return func(*tree_map_only(Offloaded, _empty_like, args), **tree_map_only(Offloaded, _empty_like, kwargs))


# -- alias, clone, view -----------------------------------------------------------------------
@implements(aten.detach, aten.alias)
def alias(func, args: tuple, kwargs: dict):
    """nn.Parameter(x) needs x.detach() to keep the subclass; `.data` is a detach too."""
    if not isinstance(args[0], Offloaded):
        return _materialize_all(func, args, kwargs)
    return args[0].alias()


@implements(aten.clone)
def clone(func, args: tuple, kwargs: dict):
    """deepcopy clones weights; `w.contiguous()` and `reshape` of a non-contiguous weight arrive as
    a clone into another layout, which is a plain tensor of its own."""
    w = args[0]
    if not isinstance(w, Offloaded):
        return _materialize_all(func, args, kwargs)
    memory_format = kwargs.get("memory_format") or torch.preserve_format
    if memory_format is not torch.preserve_format and not w.is_contiguous(memory_format=memory_format):
        return w.materialize().clone(memory_format=memory_format)
    return w.clone_weight()


_TRACED_VIEW_NOTE = """[Note: lazy views]
In eager code a view of an offloaded weight (`w.t()`, `w[0]`, `w.view(-1)`, `w.view_as(q)`) is a
lazy view: an offloaded wrapper that fetches its weight when it is read, and writes into the
weight's payload when it is written (where that is exact), so `w[0].fill_(0)` and
`nn.init.orthogonal_` (which copies into `w.view_as(q)`) land, and a view never shows values
older than its weight's. Under tracing views are plain tensors computed from the fetched weight,
so compiled graphs are those of the plain model."""


@implements(aten.t, aten.view, aten.unsqueeze, aten.expand, aten.slice, aten.select)
def view(func, args: tuple, kwargs: dict):
    base = args[0]
    if not isinstance(base, Offloaded):
        return _materialize_all(func, args, kwargs)
    if torch.compiler.is_compiling():
        out = _materialize_all(func, args, kwargs)
        _record_traced_view(out, base)
        return out
    return base.lazy_view(func, args, kwargs)


view.__doc__ = _TRACED_VIEW_NOTE

# [Note: writes through traced views]
# Under tracing a view of a weight is a plain tensor computed from the fetched weight (so compiled
# graphs are the plain model's), and a write into it would land in that copy and be lost. The
# write cannot be caught where it happens (the view is a plain tensor by then), but a view shares
# its base's version counter, which every in-place op and `out=` write bumps, in dynamo's fake
# tensors and AOTAutograd's functional ones alike. So each traced view is recorded with its
# version, and every later materialize under tracing checks the records. The backend's trace of
# the graph holding the write always meets a weight (it fetches the viewed weight again) after
# dynamo's trace recorded the write, so the compile is refused before any graph runs, whatever
# the tier or encoding.
TRACED_VIEWS: list[tuple[weakref.ref, int, str]] = []


def _record_traced_view(out, weight: Offloaded) -> None:
    t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None)
    if t is not None:
        TRACED_VIEWS.append((weakref.ref(t), t._version, repr(weight)))


def check_traced_writes() -> None:
    """Refuse the compile if a traced view of an offloaded weight was written (see the note)."""
    alive = []
    for ref, version, weight in TRACED_VIEWS:
        t = ref()
        if t is None:
            continue
        if t._version != version:
            TRACED_VIEWS.clear()
            raise RefusedOpError(
                f"a write through a view of the offloaded weight {weight} (w[i].fill_(...), w.t().mul_(...), "
                "out=w[i]) inside a compiled function would land in a fetched copy, not in the payload the engine "
                "streams from. Make the change outside torch.compile (in eager code the write lands), or write a "
                "copy of the weight."
            )
        alive.append((ref, version, weight))
    TRACED_VIEWS[:] = alive


# -- writes -----------------------------------------------------------------------------------
@functools.cache
def written_arguments(op: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument `op` writes to, in-place or `out=`, by its schema."""
    return tuple(
        (i, arg.name)
        for i, arg in enumerate(op._schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )


def _written(op, args: tuple, kwargs: dict) -> list[tuple[int | str, Offloaded]]:
    found = []
    for i, name in written_arguments(op):
        value = args[i] if i < len(args) else kwargs.get(name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, Offloaded):
                found.append((i if i < len(args) else name, t))
    return found


def _refuse_if_tracing(func, weight: Offloaded) -> None:
    if torch.compiler.is_compiling():
        raise RefusedOpError(
            f"{_op_name(func)} would write the offloaded weight {weight!r} inside a compiled function, where the "
            "write would not reach the payload the engine streams from. Make the change outside torch.compile "
            "(load_state_dict, fuse_lora and nn.init work in eager code)."
        )


@implements(aten.copy_)
def copy_into(func, args: tuple, kwargs: dict):
    """`w.copy_(value)` (load_state_dict): the value, re-encoded as the payload is."""
    dst = args[0]
    if not isinstance(dst, Offloaded):  # an offloaded weight copied into a plain tensor: a read
        return _materialize_all(func, args, kwargs)
    _refuse_if_tracing(func, dst)
    src = args[1]
    if isinstance(src, Offloaded):
        src = src.materialize()
    if src.shape != dst.shape:
        src = src.expand(dst.shape)  # copy_ broadcasts; refuses shapes that do not broadcast
    dst.write(src)
    return dst


def write_in_place(func, args: tuple, kwargs: dict):
    """Any other op that writes a weight (`add_`, `fill_`, `normal_`, `torch.add(a, b, out=w)`, the
    initializers of nn.init): run on a copy of each written payload, then the copies become the
    payloads, so the write lands whole or, if the op raises, not at all. Exact only on plain
    payloads; on encoded payloads (fp8, quantized) the result would be re-quantized, so refused."""
    written = _written(func, args, kwargs)
    if not written:
        return _materialize_all(func, args, kwargs)
    for _, weight in written:
        _refuse_if_tracing(func, weight)
        if not weight.in_place_exact:
            raise RefusedOpError(
                f"{_op_name(func)} would change the offloaded weight {weight!r} in place, which would re-quantize it "
                "(not exact); write the whole weight with copy_ (load_state_dict does), fuse LoRA weights or make "
                "other in-place changes before wrap_model_for_offload (or before quantizing), or keep the adapter "
                "unfused."
            )
    targets = {id(w): (where, w) for where, w in written}
    if len(targets) > 1:
        raise RefusedOpError(
            f"{_op_name(func)} writes two offloaded weights at once; offload_tensor writes one at a time."
        )
    (where, weight), = targets.values()
    args, kwargs = list(args), dict(kwargs)
    returned = []

    def run(scratch: torch.Tensor) -> None:
        # The written weight becomes the scratch copy; every other offloaded argument is read.
        device = scratch.device
        a = [_value_on(x, device) for x in args]
        k = {n: _value_on(v, device) for n, v in kwargs.items()}
        if isinstance(where, int):
            a[where] = _replace(args[where], weight, scratch)
        else:
            k[where] = _replace(kwargs[where], weight, scratch)
        shape, stride = scratch.shape, scratch.stride()
        returned.append((func(*a, **k), scratch))
        if scratch.shape != shape or scratch.stride() != stride:
            raise RefusedOpError(
                f"{_op_name(func)} would resize the offloaded weight {weight!r} (to {tuple(scratch.shape)}); "
                "offloaded weights keep their shape."
            )

    weight.write_in_place(run)
    out, scratch = returned[0]
    return _swap_back(out, scratch, args[where] if isinstance(where, int) else kwargs[where])


def _swap_back(out, scratch: torch.Tensor, written):
    """What the op returned, with the scratch copy replaced by the argument the caller passed:
    None for ops that return nothing (`_foreach_mul_`), a tuple for multi-output `out=` ops."""
    if out is scratch:
        return written
    if isinstance(out, (tuple, list)):
        return type(out)(_swap_back(o, scratch, written) for o in out)
    return out


def _value_on(x, device: torch.device):
    """A read argument of a write, on the payload's device."""
    if isinstance(x, Offloaded):
        return x.materialize().to(device)
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_value_on(v, device) for v in x)
    return x


def _replace(value, weight, scratch):
    if isinstance(value, (list, tuple)):
        return type(value)(scratch if v is weight else v for v in value)
    return scratch


implements(
    aten.add_, aten.sub_, aten.mul_, aten.div_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_,
)(write_in_place)  # fmt: skip  (the initializers of nn.init and LoRA fuse/unfuse; named for the record)


@implements_torch_function(torch.Tensor.data.__set__)
def set_data(func, args: tuple, kwargs: dict):
    """`w.data = value`. Another offloaded weight of the same kind is written through (peft's safe
    merge). A plain tensor is refused: offloading hooks (accelerate, diffusers group offloading)
    move weights this way, behind the wrapper's back; `w.copy_(value)` writes a value."""
    dst, value = args
    if not isinstance(dst, Offloaded):
        with torch._C.DisableTorchFunctionSubclass():
            return func(dst, value.materialize() if isinstance(value, Offloaded) else value)
    if isinstance(value, Offloaded) and value.shape == dst.shape and value.dtype == dst.dtype:
        _refuse_if_tracing(func, dst)
        dst.write(value)  # the same encoding is copied bit for bit; the weight itself is a no-op
        return None
    if isinstance(value, torch.Tensor) and value.dtype != dst.dtype:
        raise RefusedOpError(
            f"setting .data of the offloaded weight {dst!r} to a {value.dtype} tensor would change its dtype after "
            "wrapping; its payload is encoded for the dtype it was wrapped with. Call unwrap_model(model), convert, "
            "and wrap again (or load a checkpoint with torch_dtype=)."
        )
    raise RefusedOpError(
        f"setting .data of the offloaded weight {dst!r} would replace its payload behind offload_tensor's back; "
        "write a value with w.copy_(value) (load_state_dict does), or call unwrap_model first. If an offloading "
        "hook (accelerate, diffusers enable_group_offload) did this, do not combine it with offload_tensor."
    )


@implements_torch_function(torch.Tensor.__setitem__)
def set_item(func, args: tuple, kwargs: dict):
    """`w[index] = value` (textual inversion writes token embeddings this way). Caught here because
    at the dispatcher it is an index into a copy and a copy_ into that copy, which would be lost."""
    dst, index, value = args
    if not isinstance(dst, Offloaded):  # an offloaded value written into a plain tensor
        with torch._C.DisableTorchFunctionSubclass():
            return func(dst, index, value.materialize(dst) if isinstance(value, Offloaded) else value)
    _refuse_if_tracing(func, dst)
    if not dst.in_place_exact:
        raise RefusedOpError(
            f"w[index] = value on the offloaded weight {dst!r} would re-encode part of it, which offload_tensor does "
            "not do; write the whole weight with copy_ (load_state_dict), or make the change before "
            "wrap_model_for_offload."
        )
    if isinstance(value, Offloaded):
        value = value.materialize()

    def run(scratch: torch.Tensor) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            scratch[index] = value.to(scratch.device) if isinstance(value, torch.Tensor) else value

    dst.write_in_place(run)
    return None


@implements_torch_function(torch.Tensor.requires_grad_, torch.Tensor.requires_grad.__set__)
def frozen(func, args: tuple, kwargs: dict):
    """Offloaded weights are frozen: nothing would compute their gradients."""
    t = args[0]
    requires_grad = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
    if requires_grad and isinstance(t, Offloaded):
        raise RefusedOpError(
            f"the offloaded weight {t!r} cannot require grad: offloaded weights are frozen. To train, add an adapter "
            "on top of the wrapped model (peft LoRA, e.g. model.add_adapter(LoraConfig(...))): its weights are plain "
            "and train, and gradients flow through the offloaded ones."
        )
    with torch._C.DisableTorchFunctionSubclass():
        result = func(*args, **kwargs)
    return t if func is torch.Tensor.requires_grad_ else result


@implements(aten.set_, aten.resize_, aten.resize_as_, aten.as_strided_, aten.squeeze_, aten.unsqueeze_, aten.t_,
            aten.transpose_)  # fmt: skip
def refuse(func, args: tuple, kwargs: dict):
    """Ops that change a tensor's storage or metadata in place: an offloaded weight keeps both.
    One that would leave the metadata as it is (`w.squeeze_(0)` of a dim that is not 1) is the
    no-op it is on a plain tensor."""
    w = args[0]
    if not _written(func, args, kwargs):
        return _materialize_all(func, args, kwargs)
    if func.overloadpacket is not aten.set_:
        meta = torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device="meta")
        func(meta, *args[1:], **kwargs)
        if (meta.shape, meta.stride()) == (w.shape, w.stride()):
            return w
    raise RefusedOpError(
        f"{_op_name(func)} would change the storage or the shape of the offloaded weight {args[0]!r} in place; "
        "offloaded weights keep both. Make the change before wrap_model_for_offload, or call unwrap_model first."
    )


def _op_name(func) -> str:
    if func is torch.Tensor.data.__set__:
        return "setting .data"
    return getattr(func, "__qualname__", None) or str(func)


# -- lookup -----------------------------------------------------------------------------------
_WRITERS = (copy_into, write_in_place, refuse)  # the handlers that know what to do with a write


resolved_rule = _RESOLVED.get  # the hot path's lookup: an overload resolved before (None: ask aten_rule)


def aten_rule(op: torch._ops.OpOverload) -> Handler:
    """The handler for an aten overload: its packet's row, or the default (see the module doc).
    A row that reads (`aten.add`) does not cover its `out=` overload (`aten.add.out`), a write."""
    handler = _RESOLVED.get(op)
    if handler is None:
        handler = _RESOLVED[op] = _resolve(op)
    return handler


def _resolve(op: torch._ops.OpOverload) -> Handler:
    handler = ATEN_RULES.get(op.overloadpacket)
    if handler is not None and (handler in _WRITERS or not written_arguments(op)):
        return handler
    if written_arguments(op):
        default = write_in_place
    elif op.is_view:
        default = view
    else:
        default = _materialize_all
    log.debug("%s has no row in compile_rules; using the default %s", op, default.__name__)
    return default
