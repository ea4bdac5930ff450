"""Where a wrap's values come from: the model itself, or a safetensors checkpoint matched against
a model built on the meta device (every key, shape and dtype checked before anything is read;
converted to `torch_dtype` while reading, where asked).

Everything here is checked before the model changes; the build reads through a source.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from offload_tensor import integrations
from offload_tensor.checkpoint import (
    CheckpointError,
    StoredTensor,
    checkpoint_files,
    fingerprint,
    index,
    read_into,
    same_bytes,
)
from offload_tensor.engine.host_store import contiguous_stride
from offload_tensor.payloads import FLOAT8_DTYPES, SUPPORTED, leaves, subclass_kind
from offload_tensor.tensor import OffloadedTensor


class ModelSource:
    """The weights of a loaded model."""

    fingerprint = "memory"  # values known only by reading them: disk files are always written

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def value(self, name: str) -> torch.Tensor:
        return self.weights[name].detach()

    def fill(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.weights[name].detach())

    def stride(self, name: str) -> tuple[int, ...]:
        return self.weights[name].stride()


class CheckpointSource:
    """Weights read from safetensors files, by weight name (see checkpoint.py), each converted to
    the dtype the model computes it in where that differs from the stored one (`torch_dtype=`):
    one tensor at a time, so nothing is held twice."""

    def __init__(self, stored: dict[str, StoredTensor], files, dtypes: dict[str, torch.dtype]) -> None:
        self.stored = stored
        self.dtypes = dtypes
        self.fingerprint = fingerprint(files)

    def value(self, name: str) -> torch.Tensor:
        s = self.stored[name]
        out = torch.empty(s.shape, dtype=s.dtype)
        read_into(s, out)
        return out.to(self.dtypes[name])

    def fill(self, name: str, out: torch.Tensor) -> None:
        if out.is_contiguous() and out.dtype == self.stored[name].dtype:
            read_into(self.stored[name], out)
        else:
            out.copy_(self.value(name))

    def stride(self, name: str) -> tuple[int, ...]:
        return contiguous_stride(self.stored[name].shape)


def match(model, slots, weights, checkpoint, torch_dtype):
    """Where the values come from: the model itself, or a checkpoint matched against it (every
    weight and persistent buffer found, tied weights stored once or with equal bytes, no key left
    over, shapes and dtypes equal, or converted by `torch_dtype`: torch's strict load_state_dict);
    each loaded weight's dtype; and the buffers it loads. Everything is checked here, before the
    model is changed."""
    if checkpoint is None:
        return ModelSource(weights), {}, {}
    stored = index(checkpoint)
    dtype_for = _LoadDtype(torch_dtype, integrations.keep_in_fp32(model, torch_dtype) if torch_dtype else set())
    aliases: dict[int, list[str]] = {}
    for qualname, _, _, param in slots:
        aliases.setdefault(id(param), []).append(qualname)
    found, dtypes, problems = _match_weights(weights, aliases, stored, dtype_for)
    loaded_buffers, buffer_problems = _match_buffers(model, stored, dtype_for)
    problems += buffer_problems
    all_buffers = {f"{m}.{b}" if m else b for m, module in model.named_modules() for b in module._buffers}
    known = {
        a for names in aliases.values() for a in names
    } | all_buffers  # old checkpoints hold non-persistent buffers
    problems += [f"unexpected key {k}" for k in sorted(stored.keys() - known)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {os.fspath(checkpoint)!r} does not fit {type(model).__name__}: {shown}.")
    return CheckpointSource(found, checkpoint_files(checkpoint), dtypes), dtypes, loaded_buffers


@dataclass(frozen=True)
class _LoadDtype:
    """The dtype a stored tensor loads in. Without `torch_dtype`, the one the model declares, which
    must be the stored one (no cast: a cast would be a silent change of values). With it, as
    diffusers' and transformers' from_pretrained(torch_dtype=) load: a floating-point tensor in
    `torch_dtype`, or in float32 within the modules the model keeps there (`keep`); fp8 and
    integer tensors as stored."""

    torch_dtype: torch.dtype | None
    keep: set[str]

    def __call__(self, key: str, s, t: torch.Tensor) -> torch.dtype:
        floats = (
            s.dtype.is_floating_point
            and t.dtype.is_floating_point
            and s.dtype not in FLOAT8_DTYPES
            and t.dtype not in FLOAT8_DTYPES
        )
        if self.torch_dtype is None or not floats:
            return t.dtype
        return torch.float32 if any(f".{m}." in f".{key}." for m in self.keep) else self.torch_dtype

    def mismatch(self, key: str, s, t: torch.Tensor) -> str | None:
        """The problem when stored tensor `s` cannot be loaded as `t`."""
        if tuple(s.shape) != tuple(t.shape) or s.dtype != self(key, s, t) and self.torch_dtype is None:
            return f"{key}: the checkpoint has {tuple(s.shape)} {s.dtype}, the model {tuple(t.shape)} {t.dtype}"
        if s.dtype != self(key, s, t) and not s.dtype.is_floating_point:
            return f"{key}: the checkpoint has {s.dtype}, which torch_dtype does not convert, the model {t.dtype}"
        return None


def _match_weights(weights, aliases, stored, dtype_for: _LoadDtype):
    """Each weight's stored tensor and the dtype it loads in, and the problems. A tied weight (one
    parameter under several names) may be stored under more than one of them, as untied
    checkpoints are; then those must hold the same bytes, else which one loads would be an
    arbitrary pick."""
    found, dtypes, problems = {}, {}, []
    for name, w in weights.items():
        present = [a for a in aliases[id(w)] if a in stored]
        if not present:
            problems.append(f"missing key {name}")
            continue
        s = stored[present[0]]
        problems += filter(None, [dtype_for.mismatch(present[0], s, w)])
        problems += [
            f"{present[0]} and {other} hold different values, but the model ties them (one weight); load into a "
            "model built untied (e.g. tie_word_embeddings=False), or save the checkpoint from the tied model"
            for other in present[1:]
            if not same_bytes(s, stored[other])
        ]
        found[name], dtypes[name] = s, dtype_for(present[0], s, w)
    return found, dtypes, problems


def _match_buffers(model, stored, dtype_for: _LoadDtype):
    """(stored tensor, dtype it loads in) of every persistent buffer, and the problems: as for
    weights, a persistent buffer missing from the checkpoint or of another shape or dtype is
    refused, whether the model holds it on the meta device or real (init_empty_weights): an init
    value left in place, or a stored value that broadcasts, would change the output silently."""
    loaded, problems = {}, []
    for m_name, module in model.named_modules():
        for b_name, buf in module._buffers.items():
            if buf is None:
                continue
            key = f"{m_name}.{b_name}" if m_name else b_name
            if b_name in module._non_persistent_buffers_set:
                if buf.is_meta:  # no checkpoint holds it, so its value would never exist
                    problems.append(
                        f"{type(module).__name__}.{b_name} is a non-persistent buffer on the meta device, which "
                        "no checkpoint holds; build the model under accelerate.init_empty_weights() (it keeps "
                        "buffers real)"
                    )
            elif key not in stored:
                problems.append(f"missing key {key} (a buffer)")
            elif (problem := dtype_for.mismatch(key, stored[key], buf)) is not None:
                problems.append(problem)
            else:
                loaded[(module, b_name)] = (stored[key], dtype_for(key, stored[key], buf))
    return loaded, problems


def read_buffers(
    model: nn.Module, device: torch.device, loaded: dict
) -> list[tuple[nn.Module, str, torch.device, torch.Tensor]]:
    """(module, name, device before, buffer on the compute device) for every buffer; buffers a
    checkpoint holds are read from it."""
    moved = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            if (module, name) in loaded:
                stored, dtype = loaded[(module, name)]
                value = torch.empty(stored.shape, dtype=stored.dtype)
                read_into(stored, value)
                value = value.to(dtype)
            else:
                value = buf
            moved.append((module, name, buf.device, value.to(device)))
    return moved


@contextlib.contextmanager
def declaring(weights: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]):
    """torch_dtype=: while the model is planned and built, its meta weights declare the dtypes they
    load in; a failure puts back what they declared before."""
    before = {n: w.dtype for n, w in weights.items() if n in dtypes and w.dtype != dtypes[n]}
    for name in before:
        weights[name].data = torch.empty_like(weights[name], dtype=dtypes[name], device="meta")
    try:
        yield
    except BaseException:
        for name, dtype in before.items():
            weights[name].data = torch.empty_like(weights[name], dtype=dtype, device="meta")
        raise


def check_weight(qualname: str, param: torch.Tensor, from_checkpoint: bool) -> None:
    if isinstance(param, OffloadedTensor):
        raise ValueError(
            f"{qualname} is already an OffloadedTensor (this module is part of a wrapped model); wrap a model "
            "once, from its root, or unwrap_model the outer model first."
        )
    if not from_checkpoint and any(
        t.is_meta for t in leaves(param)
    ):  # a quantized wrapper may be on meta with real data
        raise ValueError(
            f"{qualname} is on the meta device (the model was created without weights, e.g. under "
            "init_empty_weights or low_cpu_mem_usage); load its weights before wrap_model_for_offload, or pass "
            "checkpoint= to load them while wrapping."
        )
    if type(param) is nn.Parameter and type(param.data) is torch.Tensor:
        return
    if type(param) is not nn.Parameter and is_traceable_wrapper_subclass(param):
        if from_checkpoint:
            raise CheckpointError(
                f"{qualname} is a {type(param).__name__}: checkpoint= loads plain weights (stored as they are or in "
                "fp8); "
                "load a quantized model with its library's from_pretrained, then wrap it."
            )
        try:
            subclass_kind(param)
            return
        except TypeError as e:
            reason = str(e)
    else:
        cls = type(param) if type(param) is not nn.Parameter else type(param.data)
        reason = f"{cls.__module__}.{cls.__qualname__} is not supported; offload_tensor supports {SUPPORTED}."
    raise TypeError(
        f"{qualname}: {reason} Load the model without that quantization backend, or quantize it with torchao."
    )
