"""OffloadedTensor: a weight that reports where and how the model computes, stored elsewhere.

Invariant: the wrapper's shape, dtype and device are what the model computes with (so
`model.dtype`, `param.device` and dtype checks stay right); its payload stays on the offload
device and reaches the compute device only through `offload_tensor::fetch`. Every op that meets
the wrapper is handled by the row of `compile_rules` that names it.

`__tensor_flatten__` exposes the payload's inner tensors as the wrapper's own and a context of
per-type constants only (payload kind, compute dtype and device, whether fetching is needed):
dynamo guards on the context, so per-weight identity there would recompile every repeated block.
Identity travels as data: the engine keys on the payload's address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map_only

from compile_rules.table import TORCH_FUNCTION_RULES, Rule, aten_rule, mutates
from offload_tensor import ops
from offload_tensor.payloads import FETCHED_VIEW, FetchedView, PayloadKind, Plain

_DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass
_tf_rule = TORCH_FUNCTION_RULES.get


class RefusedOpError(RuntimeError):
    """An op would change an offloaded weight in a way offload_tensor does not carry out."""


class OffloadedTensor(torch.Tensor):
    _inner: tuple[torch.Tensor, ...]
    _kind: PayloadKind
    _compute_dtype: torch.dtype
    _compute_device: torch.device
    _fetches: bool

    @staticmethod
    def __new__(
        cls,
        inner: tuple[torch.Tensor, ...],
        kind: PayloadKind,
        compute_dtype: torch.dtype,
        compute_device: torch.device,
        fetches: bool,
        outer_size=None,
        outer_stride=None,
    ):
        ref = inner[0]
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            ref.shape if outer_size is None else outer_size,
            strides=ref.stride() if outer_stride is None else outer_stride,
            dtype=compute_dtype,
            device=compute_device,
            requires_grad=False,
        )
        self._inner = tuple(inner)
        for name, t in zip(kind.inner_names, inner, strict=True):
            setattr(self, name, t)
        self._kind = kind
        self._compute_dtype = compute_dtype
        self._compute_device = compute_device
        self._fetches = fetches
        # Computed once: dynamo's guards and AOTAutograd's runtime wrapper flatten every
        # offloaded input on every compiled call.
        self._flat = (list(kind.inner_names), (kind, compute_dtype, compute_device, fetches))
        # The eager fast path: the tensor to compute with when nothing needs fetching or decoding.
        self._direct = inner[0] if not fetches and kind.inner_names == ("payload",) else None
        return self

    # -- tracing ----------------------------------------------------------------------------
    def __tensor_flatten__(self):
        return self._flat

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        kind, dtype, device, fetches = ctx
        inner = tuple(inner_tensors[name] for name in kind.inner_names)
        return OffloadedTensor(inner, kind, dtype, device, fetches, outer_size, outer_stride)

    def _stable_hash_for_caching(self) -> str:
        # AOTAutograd's cache key: metadata only, never values or addresses.
        parts = [repr(self._kind), str(self._compute_dtype), str(self._compute_device), str(self._fetches)]
        parts += [f"{t.shape}/{t.stride()}/{t.dtype}/{t.device}" for t in self._inner]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        where = self._inner[0].device
        return (
            f"OffloadedTensor(shape={tuple(self.shape)}, dtype={self._compute_dtype}, "
            f"device={self._compute_device}, payload={self._kind.name} on {where})"
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
        return self._kind.decode(self._fetched(after), self._compute_dtype)

    def _fetched(self, after: torch.Tensor | None) -> Sequence[torch.Tensor]:
        """The inner tensors on the compute device: the payload itself, or fetched copies."""
        if self._fetches:
            return torch.ops.offload_tensor.fetch(list(self._inner), after, self._compute_device)
        return self._inner

    def payload_value(self) -> torch.Tensor:
        """The weight's value where the payload lives (no fetch): the payload itself when plain,
        else its decoded form (dequantized fp8, or the quantized subclass rebuilt). Its storage is
        its own: a payload that is a view into a streaming engine's host arena is copied out, so
        the value can be saved (torch.save, safetensors) and outlives the arena."""
        inner = tuple(t.clone() if t.untyped_storage().nbytes() > t.nbytes else t for t in self._inner)
        return self._kind.decode(inner, self._compute_dtype)

    def _with_inner(self, inner: tuple[torch.Tensor, ...]) -> OffloadedTensor:
        return OffloadedTensor(
            inner, self._kind, self._compute_dtype, self._compute_device, self._fetches, self.shape, self.stride()
        )

    # -- torch function: catch F.linear & co. before they decompose --------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # The eager hot path (F.linear & co. on every weight, every step): one dict lookup, one
        # pass over the arguments, no pytree, no logging, and no fetch for a direct weight.
        rule = _tf_rule(func)
        if rule is None:
            with _DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if rule is Rule.REFUSE:
            raise RefusedOpError(_refusal(func, args))
        if rule is Rule.WRITE_THROUGH:  # the `.data` setter, `w[index] = value`
            return _TF_WRITES[func](*args)
        if rule is not Rule.MATERIALIZE:
            raise NotImplementedError(f"torch-function rows are materialize or refuse; {func} has {rule}")
        after = None
        pending = False
        resolved = []
        for a in args:
            if type(a) is OffloadedTensor:
                direct = a._direct
                if direct is None:
                    pending = True
                    resolved.append(a)
                else:
                    resolved.append(direct)
            else:
                if after is None and isinstance(a, torch.Tensor):
                    after = a
                resolved.append(a)
        if pending:
            if func is _linear and len(resolved) > 1 and torch.compiler.is_compiling() and _opaque(resolved[1]):
                return _opaque_linear(*resolved, **(kwargs or {}))
            resolved = [a.materialize(after) if type(a) is OffloadedTensor else a for a in resolved]
        if kwargs:
            kwargs = {k: v.materialize(after) if type(v) is OffloadedTensor else v for k, v in kwargs.items()}
            return func(*resolved, **kwargs)
        return func(*resolved)

    # -- torch dispatch: everything else, by the aten rows ----------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = aten_rule(func)
        if rule is Rule.ALIAS:
            out = args[0]._with_inner(args[0]._inner)
            return return_and_correct_aliasing(func, args, kwargs, out)
        if rule is Rule.CLONE:
            return args[0]._with_inner(tuple(t.clone() for t in args[0]._inner))
        if rule is Rule.METADATA:
            return func(*tree_map_only(OffloadedTensor, _empty_like, args), **tree_map_only(OffloadedTensor, _empty_like, kwargs))
        written = [args[i] for i in mutates(func) if i < len(args) and isinstance(args[i], OffloadedTensor)]
        if written:
            if rule is not Rule.WRITE_THROUGH or isinstance(written[0]._kind, FetchedView):
                raise RefusedOpError(_refusal(func, args))
            dst = args[0]
            rest = [a.materialize() if isinstance(a, OffloadedTensor) else a for a in args[1:]]
            ops.before_write(ops.payload_key(dst._inner))
            with torch.no_grad():
                if func.overloadpacket is torch.ops.aten.copy_:
                    dst._kind.write(dst._inner, rest[0])
                elif isinstance(dst._kind, Plain):
                    payload = dst._inner[0]
                    func(payload, *[a.to(payload.device) if isinstance(a, torch.Tensor) else a for a in rest], **kwargs)
                else:
                    raise RefusedOpError(
                        f"{func} on an offloaded {dst._kind.name} weight ({dst!r}) would re-quantize it, which is "
                        "not exact; fuse LoRA weights (or make other in-place changes) before quantizing, or keep "
                        "the adapter unfused."
                    )
            return dst
        after = _first_plain_tensor(args)
        materialize = lambda t: t.materialize(after)  # noqa: E731
        out = func(*tree_map_only(OffloadedTensor, materialize, args), **tree_map_only(OffloadedTensor, materialize, kwargs))
        if func.is_view and _holds_a_copy(args[0]) and not torch.compiler.is_compiling():
            # [Note: fetched views] A view of a fetched weight views the fetched copy; wrapped,
            # so that a write into it (`w[0].fill_(0)`) is refused instead of silently lost. Real
            # tensors only: under tracing (fake or functional tensors) views stay plain.
            return tree_map_only(torch.Tensor, _fetched_view, out)
        return out


_linear = torch.nn.functional.linear


def _opaque(weight) -> bool:
    return type(weight) is OffloadedTensor and getattr(weight._kind, "opaque", False)


def _opaque_linear(input, weight: OffloadedTensor, bias=None) -> torch.Tensor:
    """A compiled F.linear on a payload dynamo cannot rebuild (see [Note: opaque linear])."""
    if type(bias) is OffloadedTensor:
        bias = bias.materialize(input)
    return torch.ops.offload_tensor.subclass_linear(input, list(weight._fetched(input)), bias, weight._kind.spec)


def _holds_a_copy(t) -> bool:
    """Whether views of `t` view a fetched copy rather than the weight's payload."""
    return type(t) is OffloadedTensor and (t._fetches or t._kind is FETCHED_VIEW)


def _fetched_view(t: torch.Tensor) -> torch.Tensor:
    if type(t) is not torch.Tensor:
        return t
    return OffloadedTensor((t,), FETCHED_VIEW, t.dtype, t.device, False)


def _set_data(dst: OffloadedTensor, value) -> None:
    """`dst.data = value` (see Rule.WRITE_THROUGH)."""
    if type(value) is OffloadedTensor and value._kind == dst._kind and value.shape == dst.shape and not isinstance(dst._kind, FetchedView):
        if value._inner[0] is not dst._inner[0]:
            ops.before_write(ops.payload_key(dst._inner))
            with torch.no_grad():
                for t, v in zip(dst._inner, value._inner):
                    t.copy_(v)
        return None
    raise RefusedOpError(_refusal(torch.Tensor.data.__set__, (dst, value)))


def _set_item(dst, index, value) -> None:
    """`dst[index] = value` (see Rule.WRITE_THROUGH): into a plain payload, where it lives."""
    if type(dst) is not OffloadedTensor:  # an offloaded value written into a plain tensor
        with _DisableTorchFunctionSubclass():
            dst[index] = value.materialize(dst) if type(value) is OffloadedTensor else value
        return None
    if type(dst._kind) is not Plain:
        raise RefusedOpError(_refusal(torch.Tensor.__setitem__, (dst, index, value)))
    payload = dst._inner[0]
    if type(value) is OffloadedTensor:
        value = value.materialize()
    if isinstance(value, torch.Tensor):
        value = value.to(payload.device)
    ops.before_write(ops.payload_key(dst._inner))
    with torch.no_grad(), _DisableTorchFunctionSubclass():
        payload[index] = value
    return None


_TF_WRITES = {torch.Tensor.data.__set__: _set_data, torch.Tensor.__setitem__: _set_item}


def _first_plain_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor) and not isinstance(a, OffloadedTensor):
            return a
    return None


def _empty_like(t: OffloadedTensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t._compute_dtype, device=t._compute_device)


def _refusal(func, args) -> str:
    name = getattr(func, "__qualname__", None) or str(func)
    if func == torch.Tensor.data.__set__:
        name = "setting .data"
    if isinstance(args[0], OffloadedTensor) and isinstance(args[0]._kind, FetchedView):
        return (
            f"{name} would write into a view of an offloaded weight ({args[0]!r}); the view holds a fetched copy, "
            "so the write would never reach the weight. Write the weight itself: w[index] = value, or "
            "w.copy_(new_value) (load_state_dict does this)."
        )
    if func is torch.Tensor.__setitem__ and isinstance(args[0], OffloadedTensor):
        return (
            f"{name} on an offloaded {args[0]._kind.name} weight ({args[0]!r}) would re-encode part of it, which "
            "offload_tensor does not do; write the whole weight with copy_ (load_state_dict), or make the change "
            "before wrap_model_for_offload."
        )
    return (
        f"{name} would change an offloaded weight ({args[0]!r}) in place; offload_tensor only writes "
        "weights through copy_ (as load_state_dict does), and moves them itself. Make the change before "
        "wrap_model_for_offload, or call unwrap_model first. If an offloading hook (accelerate, diffusers "
        "enable_group_offload) did this, do not combine it with offload_tensor."
    )


__all__ = ["OffloadedTensor", "RefusedOpError"]
