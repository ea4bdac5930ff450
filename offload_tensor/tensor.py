"""OffloadedTensor: a weight that reports where and how the model computes, stored elsewhere.

Invariant: the wrapper's shape, dtype and device are what the model computes with (so
`model.dtype`, `param.device` and dtype checks stay right); its payload stays on the offload
device and reaches the compute device only through `offload_tensor::fetch`. Every op that meets
the wrapper is handled by the row of `compile_rules` that names it: `__torch_function__` and
`__torch_dispatch__` are a lookup and a call.

`__tensor_flatten__` exposes the payload's inner tensors as the wrapper's own, plus the weight's
key, and a context of per-type constants only (payload kind, compute dtype and device, whether it
is fetched): dynamo guards on the context, so per-weight identity there would recompile every
repeated block. Identity travels as data: a 0-d int64 tensor assigned at wrap (see ops.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from compile_rules.table import (
    TORCH_FUNCTION_RULES,
    TRACED_VIEWS,
    Offloaded,
    RefusedOpError,
    aten_rule,
    check_traced_writes,
    is_jit_tracing,
    refuse_jit_trace,
    resolved_rule,
)
from offload_tensor import ops
from offload_tensor.engine import disk
from offload_tensor.engine.host_store import GroupLayout
from offload_tensor.payloads import PayloadKind

_DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass
_tf_rule = TORCH_FUNCTION_RULES.get



def _code_version() -> str:
    """What compiled code of offloaded weights depends on beyond the graph dynamo sees: the
    fetch op's schema and the source of the code AOTAutograd traces through."""
    import compile_rules.table
    import offload_tensor.payloads

    digest = hashlib.blake2b(str(torch.ops.offload_tensor.fetch.default._schema).encode(), digest_size=16)
    for module in (compile_rules.table, offload_tensor.payloads, ops):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    with open(__file__, "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


_CACHE_VERSION = _code_version()
_INNER_NAMES: set[str] = {"_key"}  # every inner tensor name of every kind built (see __dir__)
ViewStep = tuple  # (op, args after the tensor, kwargs, index of the output or None)


class OffloadedTensor(Offloaded):
    _inner: tuple[torch.Tensor, ...]
    _kind: PayloadKind
    _compute_dtype: torch.dtype
    _compute_device: torch.device
    _key: torch.Tensor | None  # set when the weight is fetched through the engine registry
    # A weight of a streamed group: the group's key and its layout (the group's bytes, and where
    # this weight's tensors are in them), see [Note: one fetch per group] in ops.py
    _gkey: torch.Tensor | None
    _layout: GroupLayout | None
    _view: tuple[OffloadedTensor, tuple[ViewStep, ...]] | None  # (weight, steps) of a lazy view

    @staticmethod
    def __new__(
        cls,
        inner: tuple[torch.Tensor, ...],
        kind: PayloadKind,
        compute_dtype: torch.dtype,
        compute_device: torch.device,
        key: torch.Tensor | None,
        outer_size=None,
        outer_stride=None,
        group: tuple[torch.Tensor, GroupLayout] | None = None,
    ):
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            kind.logical_size(inner) if outer_size is None else outer_size,
            strides=kind.logical_stride(inner) if outer_stride is None else outer_stride,
            dtype=compute_dtype,
            device=compute_device,
            requires_grad=False,
        )
        self._inner = tuple(inner)
        for name, t in zip(kind.inner_names, inner, strict=True):
            setattr(self, name, t)
        _INNER_NAMES.update(kind.inner_names)
        self._kind = kind
        self._compute_dtype = compute_dtype
        self._compute_device = compute_device
        self._key = key
        self._gkey, self._layout = group if group is not None else (None, None)
        self._view = None
        # Computed once: dynamo's guards and AOTAutograd's runtime wrapper flatten every
        # offloaded input on every compiled call. The layout is in the context: it is the same
        # for the same weight of every repeated block, so it never recompiles a block.
        names = list(kind.inner_names) + (["_key"] if key is not None else []) + (["_gkey"] if group else [])
        self._flat = (names, (kind, compute_dtype, compute_device, key is not None, self._layout))
        # The eager fast path: the tensor to compute with when nothing needs fetching or decoding.
        self._direct = inner[0] if key is None and kind.in_place_exact else None
        self.in_place_exact = kind.in_place_exact
        return self

    @property
    def fetches(self) -> bool:
        """Whether reads go through the fetch op (else the payload is used where it is)."""
        return self._key is not None

    # -- tracing ----------------------------------------------------------------------------
    def __dir__(self):
        # torch.export (non-strict) turns into graph inputs the attributes it finds in dir() of
        # the first instance of a subclass it meets; a model mixing payload kinds (fp8 matrices,
        # plain biases) needs every kind's inner names listed, or the others become constants.
        return sorted(set(super().__dir__()) | _INNER_NAMES)

    def __tensor_flatten__(self):
        if self._view is not None:
            raise RefusedOpError(
                f"{self!r} is a view of an offloaded weight taken outside torch.compile; it cannot enter a compiled "
                "function. Take the view inside it, or pass the weight."
            )
        return self._flat

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        kind, dtype, device, fetches, layout = ctx
        inner = tuple(inner_tensors[name] for name in kind.inner_names)
        key = inner_tensors["_key"] if fetches else None
        group = (inner_tensors["_gkey"], layout) if layout is not None else None
        return OffloadedTensor(inner, kind, dtype, device, key, outer_size, outer_stride, group)

    def _stable_hash_for_caching(self) -> str:
        # AOTAutograd's cache key for this input: metadata only, never values or addresses. It
        # must change whenever the flattened form or the fetch op's schema does, or a cached
        # graph compiled against an older form would be served (seen: a stale cache calling
        # fetch with the arguments of an earlier release).
        names, ctx = self.__tensor_flatten__()
        parts = [_CACHE_VERSION, repr(ctx[0]), *map(str, ctx[1:]), *names]
        parts += [f"{t.shape}/{t.stride()}/{t.dtype}/{t.device}" for t in self._inner]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        if self._view is not None:
            return f"OffloadedTensor(view {tuple(self.shape)} of {self._view[0]!r})"
        return (
            f"OffloadedTensor(shape={tuple(self.shape)}, dtype={self._compute_dtype}, "
            f"device={self._compute_device}, payload={self._kind.name} on {self._inner[0].device})"
        )

    # -- the payload ------------------------------------------------------------------------
    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._inner)

    def materialize(self, after: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a plain tensor on the compute device, in the compute dtype.

        Zero-copy when no fetch is needed and the payload is plain. `after` is the activation the
        weight is about to meet (see [Note: fetch order] in ops.py).
        """
        if self._view is not None:
            weight, steps = self._view
            return _apply_view(weight.materialize(after), steps)
        if is_jit_tracing():
            refuse_jit_trace()
        if TRACED_VIEWS and torch.compiler.is_compiling():
            check_traced_writes()  # see [Note: writes through traced views]
        return self._kind.decode(self._fetched(after), self._compute_dtype)

    def _fetched(self, after: torch.Tensor | None) -> Sequence[torch.Tensor]:
        """The inner tensors on the compute device: the payload itself, fetched copies, or views
        of the group's fetched bytes (see [Note: one fetch per group] in ops.py)."""
        if self._layout is not None:
            if torch.compiler.is_compiling():
                fetch_group = torch.ops.offload_tensor.fetch_group
                group = fetch_group(self._gkey, after, self._compute_device, self._layout.nbytes)
            else:
                group = ops.group_bytes(self._gkey)
            return [region.view(group) for region in self._layout.regions]
        if self._key is not None:
            if not torch.compiler.is_compiling():
                # `after` orders compiled code only. In eager autograd the op is differentiable in
                # it, so the fetched weight would require grad whenever the activation does, and
                # F.linear would save its input for a weight gradient nobody needs.
                after = None
            return torch.ops.offload_tensor.fetch(list(self._inner), self._key, after, self._compute_device)
        return self._inner

    def payload_value(self, copy: bool = False) -> torch.Tensor:
        """The weight's value where the payload lives (no fetch): the payload itself when plain,
        else its decoded form (dequantized fp8, or the quantized subclass rebuilt). Its storage is
        its own: a payload that is a view into a host arena or a disk file is copied out, so the
        value can be saved (torch.save, safetensors) and outlives the arena. `copy`: share no
        memory with the payload at all."""
        disk.before_read(self._inner)  # a disk file is checked before its bytes are first used
        inner = tuple(t.clone() if copy or t.untyped_storage().nbytes() > t.nbytes else t for t in self._inner)
        return self._kind.decode(inner, self._compute_dtype)

    def linear_override(self) -> Callable | None:
        """A compiled F.linear on a payload dynamo cannot rebuild (see [Note: opaque linear])."""
        if self._kind.opaque and torch.compiler.is_compiling():
            return _opaque_linear
        return None

    # -- behaviours the rules call (compile_rules.table) --------------------------------------
    def alias(self) -> OffloadedTensor:
        if self._view is not None:
            return _lazy_view(*self._view, self)
        group = (self._gkey, self._layout) if self._layout is not None else None
        return OffloadedTensor(self._inner, self._kind, self._compute_dtype, self._compute_device, self._key,
                               self.shape, self.stride(), group)  # fmt: skip

    def clone_weight(self) -> torch.Tensor:
        if self._view is not None:  # a view's clone is a tensor of its own
            return self.materialize().clone()
        inner = tuple(t.clone() for t in self._inner)
        key = ops.new_key() if self._key is not None else None  # a new weight, served on demand
        return OffloadedTensor(inner, self._kind, self._compute_dtype, self._compute_device, key,
                               self.shape, self.stride())  # fmt: skip

    def lazy_view(self, func, args: tuple, kwargs: dict):
        weight, steps = self._view if self._view is not None else (self, ())
        meta = torch.empty_strided(self.shape, self.stride(), dtype=self.dtype, device="meta")
        out = func(meta, *args[1:], **kwargs)
        if isinstance(out, torch.Tensor):
            view = _lazy_view(weight, (*steps, (func, args[1:], kwargs, None)), out)
            return return_and_correct_aliasing(func, args, kwargs, view)
        return type(out)(
            _lazy_view(weight, (*steps, (func, args[1:], kwargs, i)), o) for i, o in enumerate(out)
        )

    def write(self, value: torch.Tensor) -> None:
        weight, steps = self._view if self._view is not None else (self, ())
        if isinstance(value, OffloadedTensor):
            if not steps and value._view is None and value._kind == self._kind and value.shape == self.shape:
                if value._inner[0] is self._inner[0]:
                    return None  # the weight itself
                encoded = value._inner  # the same encoding: copied as it is, bit for bit
            else:
                value = value.materialize()
        if not isinstance(value, OffloadedTensor):
            if steps:  # a part of the weight: exact only on a plain payload
                self._check_in_place_exact("copy_")
                encoded = None
            else:
                encoded = weight._kind.encode(value)  # validates before anything changes
        weight._before_write()
        with torch.no_grad():
            if encoded is None:
                _apply_view(weight._inner[0], steps).copy_(value)
            else:
                for t, v in zip(weight._inner, encoded):
                    t.copy_(v)

    def write_in_place(self, run: Callable[[torch.Tensor], None]) -> None:
        weight, steps = self._view if self._view is not None else (self, ())
        self._check_in_place_exact("an in-place op")
        payload = weight._inner[0]
        scratch = payload.clone()
        with torch.no_grad():
            run(_apply_view(scratch, steps))
            weight._before_write()
            payload.copy_(scratch)

    def _check_in_place_exact(self, what: str) -> None:
        if not self.in_place_exact:
            raise RefusedOpError(
                f"{what} on a part of the offloaded weight {self!r} would re-encode it, which is not exact; write the "
                "whole weight with copy_ (load_state_dict does), or make the change before wrap_model_for_offload."
            )

    def _before_write(self) -> None:
        disk.before_write(self._inner)  # a payload in a checkpoint's cache file moves to a copy of its own
        if self._key is not None:
            ops.before_write(self._key)

    # -- dispatch: a lookup and a call --------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = _tf_rule(func)
        if handler is None:
            with _DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        return handler(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return (resolved_rule(func) or aten_rule(func))(func, args, kwargs or {})


def _run_outside_dynamo(*fns) -> None:
    """[Note: eager fallback] After a graph break dynamo runs the rest of the frame eagerly with
    its frame callback still installed, so every Python frame that C++ calls back into would be
    compiled as a new top-level frame: our handlers, called for each op that meets a weight.
    Dynamo would then trace the rules' own bookkeeping (caches, op schemas: graph breaks), guard on
    each op (recompiles), and compile the dispatch of single aten ops (inductor crashed on
    aten.mkldnn_rnn_layer). So they are skipped, with everything they call, as dynamo skips torch's
    own code. Tracing is unaffected: dynamo inlines a subclass's __torch_function__ where traced
    code meets it, and __torch_dispatch__ runs below AOTAutograd; a frame's strategy applies only
    where the frame callback meets it, and costs nothing per call."""
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # torch versions without it: dynamo compiles the handlers (correct, more breaks)
        return
    for fn in fns:
        set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


_run_outside_dynamo(OffloadedTensor.__torch_function__.__func__, OffloadedTensor.__torch_dispatch__.__func__)


def _lazy_view(weight: OffloadedTensor, steps: tuple[ViewStep, ...], like: torch.Tensor) -> OffloadedTensor:
    """A wrapper with `like`'s metadata that reads and writes through `weight` (see [Note: lazy
    views] in compile_rules.table)."""
    view = torch.Tensor._make_wrapper_subclass(
        OffloadedTensor,
        like.shape,
        strides=like.stride(),
        storage_offset=like.storage_offset(),
        dtype=like.dtype,
        device=weight.device,
        requires_grad=False,
    )
    view._inner = weight._inner
    view._kind = weight._kind
    view._compute_dtype = like.dtype
    view._compute_device = weight._compute_device
    view._key = weight._key
    view._gkey, view._layout = weight._gkey, weight._layout
    view._view = (weight, steps)
    view._flat = None
    view._direct = None
    view.in_place_exact = weight.in_place_exact
    return view


def _apply_view(t: torch.Tensor, steps: tuple[ViewStep, ...]) -> torch.Tensor:
    # Steps were recorded on a meta tensor at storage offset 0; an explicit as_strided offset is
    # absolute in the storage, so it moves by where this payload starts in its (arena's) storage.
    base = t.storage_offset()
    for func, args, kwargs, index in steps:
        if base and func in _ABSOLUTE_OFFSET and (len(args) > 2 or "storage_offset" in kwargs):
            args, kwargs = _shift_offset(args, kwargs, base)
        t = func(t, *args, **kwargs)
        if index is not None:
            t = t[index]
    return t


_ABSOLUTE_OFFSET = (torch.ops.aten.as_strided.default, torch.as_strided, torch.Tensor.as_strided)


def _shift_offset(args: tuple, kwargs: dict, base: int) -> tuple[tuple, dict]:
    if "storage_offset" in kwargs:
        return args, {**kwargs, "storage_offset": (kwargs["storage_offset"] or 0) + base}
    offset = args[2] if args[2] is not None else 0
    return (*args[:2], offset + base, *args[3:]), kwargs


def _opaque_linear(input, weight: OffloadedTensor, bias=None) -> torch.Tensor:
    """F.linear through `offload_tensor::subclass_linear` (see [Note: opaque linear] in ops.py)."""
    if isinstance(bias, OffloadedTensor):
        bias = bias.materialize(input)
    return torch.ops.offload_tensor.subclass_linear(input, list(weight._fetched(input)), bias, weight._kind.spec)


__all__ = ["OffloadedTensor", "RefusedOpError"]
