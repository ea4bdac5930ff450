"""wrap_model_for_offload / unwrap_model: validate -> plan -> build -> install.

- validate: the arguments become frozen policies (offload_tensor.policy); the model is checked
  (integrations, weights, a checkpoint's keys, shapes and dtypes). Nothing has changed yet.
- plan: every group, its bytes and its tier (offload_tensor.plan); shapes and dtypes only.
- build: payloads group by group into their tier (offload_tensor.build), holding at most one
  group twice; the engine receives the streamed groups.
- install: one loop assigns the new parameters and records everything it changes in the
  model's `OffloadState`, which unwrap_model undoes, in one loop.

Invariant: a model is either untouched (a failure while building leaves every weight a plain
Parameter with its value) or completely wrapped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from offload_tensor import integrations, ops
from offload_tensor.build import Built, CheckpointSource, ModelSource, build, resident_payloads
from offload_tensor.checkpoint import CheckpointError, as_bytes, checkpoint_files, index
from offload_tensor.engine import Engine, SynchronousEngine, disk
from offload_tensor.payloads import FLOAT8_DTYPES, SUPPORTED, leaves, subclass_kind
from offload_tensor.planner import (
    Plan,
    budget_and_ram,
    check_ram,
    choose_resident,
    format_bytes,
    make_plan,
    named_parameter_slots,
    unique_weights,
)
from offload_tensor.policy import Placement, Storage, Streaming, compute_device, parse_bytes, placement
from offload_tensor.tensor import OffloadedTensor, RefusedOpError

log = logging.getLogger("offload_tensor")

__all__ = [
    "OffloadState",
    "is_wrapped",
    "named_parameter_slots",
    "offload_state",
    "set_budget",
    "unwrap_model",
    "wrap_model_for_offload",
]


@dataclass
class OffloadState:
    """What wrapping changed, kept on the root module so unwrap_model can undo exactly that."""

    plan: Plan
    engine: Engine
    # qualified name of each weight's first slot -> (device, requires_grad, is_inference) before
    # wrapping; by name, not id, so that a deep copy of the model can be unwrapped too
    originals: dict[str, tuple[torch.device, bool, bool]]
    buffer_devices: dict[tuple[nn.Module, str], torch.device]  # (module, buffer name) -> device before
    built: Built  # each group's home (for set_budget) and each weight's payload kind
    weights: dict[str, OffloadedTensor]  # the installed weights, by the plan's names
    tier_of_key: dict[int, str] = field(default_factory=dict)  # where each streamed weight lives
    hook_handles: list = field(default_factory=list)
    undo: list = field(default_factory=list)  # what the integrations installed

    @property
    def compute_device(self) -> torch.device:
        return self.plan.device


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("_offload_state"), OffloadState)


def offload_state(model: nn.Module, caller: str) -> OffloadState:
    if not is_wrapped(model):
        raise ValueError(
            f"{caller}: {type(model).__name__} is not wrapped by offload_tensor (never wrapped, or already "
            "unwrapped); call wrap_model_for_offload(model) first."
        )
    return model.__dict__["_offload_state"]


def wrap_model_for_offload(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    offload: str | os.PathLike = "cpu",
    disk_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    budget: int | str | None = None,
    max_memory: dict | None = None,
    reserve: int | str = 0,
    storage_dtype: torch.dtype | None = None,
    fp8_scale: str = "channel",
    prefetch: int = 1,
    pin_memory: bool = True,
    granularity: str = "block",
    engine: Engine | None = None,
) -> nn.Module:
    """Replace every parameter of `model` by an `OffloadedTensor`, in place, and return `model`.

    Args:
        device: the compute device; `None` means CUDA when available, else the CPU (logged once).
        offload: where the weights live between uses: "cpu" (host RAM) or "disk" (files under
            `disk_path`; a folder path here means the same).
        disk_path: the disk tier's folder (created if missing). Each group is written once to a
            safetensors file of its own; files written from a checkpoint are reused on the next
            wrap, after checking them.
        checkpoint: load the weights of a model built on the `meta` device (accelerate's
            `init_empty_weights`, or `from_config` under it) from safetensors: a file, or a
            folder of shards with their `*.index.json` (diffusers' `transformer/` folder layout).
            Read straight into host memory (or the disk tier); every key, shape and dtype is
            checked before anything is read.
        torch_dtype: with `checkpoint`, load floating-point weights and buffers in this dtype,
            converted while reading (one tensor at a time: nothing is held twice), except those in
            modules the model keeps in float32 (`_keep_in_fp32_modules`), as diffusers' and
            transformers' `from_pretrained(torch_dtype=)` do. Without it every stored dtype must be
            the one the model declares.
        budget: bytes (or "10GiB") the weights may take where the model computes: as many groups
            as fit stay resident there (zero-copy, chosen to stream the fewest bytes per step)
            beside the streaming slots ((prefetch + 1) x the largest streamed group); the rest
            stream from `offload`. On CUDA the device memory; computing on the CPU with
            offload="disk", the RAM. Below the minimum (every group streamed) is an error that
            says the minimum. `set_budget(model, ...)` changes it later.
        max_memory: accelerate's form, `{"cuda:0": "10GiB", "cpu": "30GiB"}`: the device's entry is
            the budget; "cpu" bounds the host RAM the weights may take.
        reserve: bytes of the budget kept free (for activations).
        storage_dtype: `torch.float8_e4m3fn` or `torch.float8_e5m2` stores matrices and conv
            kernels in fp8 with a float32 scale, dequantized on fetch; biases, norms and other
            1-d weights keep their dtype. The exposed dtype stays the compute dtype.
        fp8_scale: "channel" (one scale per output channel) or "tensor" (one per weight).
        prefetch, pin_memory, granularity: how streamed weights move, used by the streaming
            engine only (weights streamed to CUDA, or from the disk tier): `prefetch` groups are
            fetched ahead; host arenas are pinned once at exact size; groups are the model's
            repeated blocks ("block") or each module's own weights ("leaf"). Computing on the CPU
            from RAM nothing moves and they do not apply.
        engine: who serves fetches. By default the streaming engine where weights move (CUDA, or
            the disk tier), and none when they are used where they live (zero-copy). An explicit
            engine serves every fetch, even on the same device (tests, tracing).

    Example:
        >>> model = wrap_model_for_offload(model, device="cuda", storage_dtype=torch.float8_e4m3fn)
        >>> model.compile_repeated_blocks(fullgraph=True)
        >>> print(offload_report(model))
    """
    # -- validate: nothing may change before this is done ---------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model_for_offload expects an nn.Module, got {type(model).__name__}.")
    storage = Storage(storage_dtype, fp8_scale)
    streaming = Streaming(prefetch, pin_memory, granularity)
    budget, ram = budget_and_ram(budget, None, max_memory, device if device is not None else compute_device(None))
    where = placement(device, offload, disk_path, budget, reserve)
    if budget is not None and where.device.type == "cpu" and where.offload == "cpu" and engine is None:
        raise ValueError(
            "budget= limits what stays where the model computes, but computing on the CPU with offload='cpu' every "
            "weight is there already; to keep part of the model on disk, pass offload='disk' (disk_path=...)."
        )
    if torch_dtype is not None and checkpoint is None:
        raise ValueError(
            "torch_dtype= converts the weights of checkpoint= while loading them; convert a model that is in memory "
            "with model.to(dtype) before wrap_model_for_offload."
        )
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype={torch_dtype!r} is not a floating-point torch.dtype; use e.g. torch.bfloat16.")
    if is_wrapped(model):
        raise ValueError(
            f"{type(model).__name__} is already wrapped by offload_tensor; call unwrap_model(model) before "
            "wrapping it again with other settings."
        )
    integrations.check(model)
    if checkpoint is not None:
        integrations.before_load(model)
    slots = list(named_parameter_slots(model))
    weights = unique_weights(model)
    source, dtypes, loaded_buffers = _source(model, slots, weights, checkpoint, torch_dtype)
    for qualname, _, _, param in slots:
        _check_parameter(qualname, param, from_checkpoint=checkpoint is not None)

    # -- plan and build -------------------------------------------------------------------------
    with _declaring(weights, dtypes):
        return _plan_build_install(model, weights, slots, source, loaded_buffers, storage, streaming, where, ram,
                                   engine, checkpoint is not None)  # fmt: skip


@contextlib.contextmanager
def _declaring(weights: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]):
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


def _plan_build_install(model, weights, slots, source, loaded_buffers, storage, streaming, where, ram, engine,
                        from_checkpoint: bool) -> nn.Module:  # fmt: skip
    plan = make_plan(model, storage, streaming, where, always_fetch=engine is not None)
    if from_checkpoint or ram is not None:  # a model loaded already holds its weights in RAM
        check_ram(plan.host_bytes, ram if ram is not None else available_ram(), where)
    if engine is None:
        engine = _default_engine(where, plan)
    streams_stores = hasattr(engine, "prepare")
    with torch.inference_mode(False):  # normal tensors even under inference_mode: writable outside it
        built = build(model, plan, weights, source, streams_stores)
        keys = {n: ops.new_key() for g in plan.groups if g.streamed for n in g.weights}
        if streams_stores:
            stores, names = built.stores(plan)
            engine.prepare(stores, streaming.prefetch, [[int(keys[n]) for n in ns] for ns in names])
        wrapped = {
            name: nn.Parameter(
                OffloadedTensor(built.payloads[name], built.kinds[name], w.dtype, where.device, keys.get(name)),
                requires_grad=False,
            )
            for name, w in weights.items()
        }
        buffers = _buffers(model, where.device, loaded_buffers)
        built.payloads.clear()  # the weights hold them now; set_budget reads the homes

    # -- install: every change recorded in the state -------------------------------------------
    state = OffloadState(
        plan=plan,
        engine=engine,
        originals={n: (leaves(w)[0].device, w.requires_grad, w.is_inference()) for n, w in weights.items()},
        buffer_devices={(module, name): before for module, name, before, _ in buffers},
        built=built,
        weights=dict(wrapped),
        tier_of_key={int(keys[n]): g.home for g in plan.groups if g.streamed for n in g.weights},
    )
    by_id = {id(w): wrapped[n] for n, w in weights.items()}
    for _, module, name, param in slots:
        setattr(module, name, by_id[id(param)])  # as modules expect (nn.RNN refreshes its weight list)
    for module, name, _, moved in buffers:
        module._buffers[name] = moved
    dtypes = tuple({p.dtype for p in wrapped.values() if p.is_floating_point()} | {torch.float32})
    for module in model.modules():
        # An instance attribute shadows nn.Module._apply for .to()/.half()/.cuda() on this module.
        module.__dict__["_apply"] = functools.partial(_guarded_apply, module, dtypes, where.device)
        module.__dict__[_WRAPPED_MODULE] = True
        if any(isinstance(p, OffloadedTensor) for p in module._parameters.values()):
            state.hook_handles.append(module.register_state_dict_post_hook(_plain_state_dict))
    state.undo = integrations.install(model)
    ops.register_engine((int(k) for k in keys.values()), engine)
    _install_assignment_hook()
    model.__dict__["_offload_state"] = state
    return model


def _cpu_without_a_tier(state: OffloadState) -> bool:
    """Computing on the CPU with offload='cpu', every weight is where the model computes: nothing
    to stream from, whether its groups have homes (RAM arenas, from a checkpoint) or not. As in
    wrap_model_for_offload, only an engine of the caller's that plans streaming (replan) may."""
    where = state.plan.placement
    return where.device.type == "cpu" and where.offload == "cpu" and not hasattr(state.engine, "replan")


def set_budget(model: nn.Module, budget: int | str, *, reserve: int | str = 0) -> Plan:
    """Plan a wrapped model again for another budget, without wrapping it again: groups move
    between resident (where the model computes) and streamed (from their home). Returns the new
    plan. A compiled model does not recompile once it has run a resident and a streamed block of
    each kind (`compile_repeated_blocks`); with `torch.compile` of the whole model each new
    pattern of resident groups is a graph of its own.

    Example:
        >>> set_budget(model, "8GiB")   # e.g. to make room for a bigger batch
    """
    state = offload_state(model, "set_budget")
    old = state.plan
    if _cpu_without_a_tier(state):
        raise ValueError(
            f"set_budget: {type(model).__name__} computes on the CPU with offload='cpu', where every weight is already; "
            "a budget needs a tier to stream from: wrap it again with offload='disk' (disk_path=...)."
        )
    if any(home is None for home in state.built.homes):
        raise ValueError(
            f"set_budget: {type(model).__name__} computes on {old.device} with its weights where they are; a budget "
            "needs a tier to stream from (CUDA, or offload='disk')."
        )
    where = Placement(old.device, old.placement.offload, old.placement.disk_path, parse_bytes(budget, "budget"),
                      parse_bytes(reserve, "reserve"))  # fmt: skip
    resident = choose_resident([g.nbytes for g in old.groups], where.budget - where.reserve, old.streaming.prefetch)
    plan = Plan(old.device, tuple(replace(g, resident=i in resident) for i, g in enumerate(old.groups)), old.storage,
                old.streaming, where, old.leaf_bytes, old.name)  # fmt: skip
    if plan.device_bytes + where.reserve > where.budget:
        raise ValueError(
            f"budget={format_bytes(where.budget)} is below the minimum for {plan.name}: {format_bytes(plan.minimum_budget)} "
            "(every group streamed). Raise the budget, or wrap again with a lower prefetch or granularity='leaf'."
        )
    with torch.inference_mode(False):
        _write_back_resident(old, state)
        keys, payloads = {}, {}
        for group, home in zip(plan.groups, state.built.homes):
            group_payloads = resident_payloads(home, plan.device) if group.resident else home.payloads()
            for name, payload in zip(group.weights, group_payloads):
                payloads[name] = payload
                if group.streamed:
                    keys[name] = ops.new_key()
        engine = state.engine
        stores, names = state.built.stores(plan)
        if stores and not hasattr(engine, "replan"):
            engine = _default_engine(where, plan)
        if stores:
            prepare = engine.replan if engine is state.engine else engine.prepare
            prepare(stores, plan.streaming.prefetch, [[int(keys[n]) for n in ns] for ns in names])
        new = {
            name: nn.Parameter(
                OffloadedTensor(payloads[name], w._kind, w.dtype, w._compute_device, keys.get(name), w.shape, w.stride()),
                requires_grad=False,
            )
            for name, w in state.weights.items()
        }
    by_id = {id(w): new[name] for name, w in state.weights.items()}
    slots = list(named_parameter_slots(model))
    for _, _, _, w in slots:
        if isinstance(w, OffloadedTensor) and w._key is not None:
            ops.unregister_engine(int(w._key), state.engine)
    for _, module, name, param in slots:
        if id(param) in by_id:
            setattr(module, name, by_id[id(param)])  # an offloaded weight: installed, not written through
    if engine is not state.engine and hasattr(state.engine, "close"):
        state.engine.close()
    ops.register_engine((int(k) for k in keys.values()), engine)
    state.engine, state.plan, state.weights = engine, plan, new
    state.tier_of_key = {int(keys[n]): g.home for g in plan.groups if g.streamed for n in g.weights}
    return plan


def _write_back_resident(plan: Plan, state: OffloadState) -> None:
    """A resident group computes from a copy of its home (on the GPU, or read from its disk file
    into RAM), and writes land in that copy. Before a new plan reads the homes again, each home
    takes what was written (a checkpoint's cache file is first copied to a file of this model's)."""
    for group, home in zip(plan.groups, state.built.homes):
        if not group.resident or home is None:
            continue
        on_disk = isinstance(home, disk.DiskGroup)
        # a disk file is read, not mapped: its pages stay out of this process's RSS
        homes = resident_payloads(home, torch.device("cpu")) if on_disk else home.payloads()
        for i, (name, stored) in enumerate(zip(group.weights, homes)):
            current = state.weights[name]._inner
            if all(c.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for c, h in zip(current, stored)):
                continue  # the home itself (an arena on the CPU)
            if all(_same_bytes(c, h) for c, h in zip(current, stored)):
                continue
            if on_disk:
                home.write(i, current)
            else:
                for c, h in zip(current, stored):
                    h.copy_(c)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal (torch.equal on values misses -0.0 over 0.0 and never matches a NaN)."""
    return torch.equal(as_bytes(a.detach().cpu()), as_bytes(b.detach().cpu()))


def available_ram() -> int:
    """Memory the OS can give without swapping (MemAvailable), or the physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Give `model` plain `nn.Parameter`s back on their original devices, in place.

    Plain payloads come back bit-exact (the same storage when the device did not change); fp8
    payloads come back dequantized, i.e. the values the model computed with. Weights loaded from a
    checkpoint into a meta model come back on the CPU.

    Example:
        >>> unwrap_model(wrap_model_for_offload(model)).state_dict()  # equal to the original
    """
    state = offload_state(model, "unwrap_model")
    plain: dict[int, nn.Parameter] = {}
    slots = list(named_parameter_slots(model))
    for qualname, _, _, param in slots:  # build every parameter before changing anything
        if id(param) in plain or not isinstance(param, OffloadedTensor):
            continue
        # A weight moved to another module since wrapping has no recorded origin: it stays where
        # its payload is.
        device, requires_grad, inference = state.originals.get(qualname, (param._inner[0].device, False, False))
        if device.type == "meta":
            device = param._inner[0].device
        # A weight created under inference_mode (diffusers' tests build models so) comes back as one.
        with torch.inference_mode(inference):
            value = param.payload_value().to(device)
            if inference and not value.is_inference():
                value = value.clone()
            plain[id(param)] = nn.Parameter(value, requires_grad=requires_grad)
    for _, _, _, param in slots:
        if isinstance(param, OffloadedTensor) and param._key is not None:
            ops.unregister_engine(int(param._key), state.engine)
    for module in model.modules():
        module.__dict__.pop("_apply", None)
        module.__dict__.pop(_WRAPPED_MODULE, None)  # before assigning: plain weights are not written through
    for _, module, name, param in slots:
        if id(param) in plain:
            setattr(module, name, plain[id(param)])
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # plain weights again: one chunk for cuDNN, as before wrapping
    for (module, name), device in state.buffer_devices.items():
        if module._buffers.get(name) is not None and device.type != "meta":
            module._buffers[name] = module._buffers[name].to(device)
    for handle in state.hook_handles:
        handle.remove()
    for undo in state.undo:
        undo()
    if hasattr(state.engine, "close"):
        state.engine.close()
    del model.__dict__["_offload_state"]
    return model


def _default_engine(where: Placement, plan: Plan) -> Engine:
    """The streaming engine where weights move (to CUDA, or from disk); nothing to move otherwise."""
    if not plan.streamed_bytes:
        return SynchronousEngine()
    from offload_tensor.engine.streaming import StreamingEngine

    if where.offload == "disk":
        from offload_tensor.engine.disk import DiskBackend, DiskCudaBackend

        if where.device.type == "cuda":
            return StreamingEngine(DiskCudaBackend(where.device, pin_memory=plan.streaming.pin_memory))
        return StreamingEngine(DiskBackend())
    if where.device.type == "cuda":
        from offload_tensor.engine.cuda import CudaBackend

        return StreamingEngine(CudaBackend(where.device, pin_memory=plan.streaming.pin_memory))
    return SynchronousEngine()


def _source(model, slots, weights, checkpoint, torch_dtype):
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
    known = {a for names in aliases.values() for a in names} | all_buffers  # old checkpoints hold non-persistent buffers
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
        floats = s.dtype.is_floating_point and t.dtype.is_floating_point and s.dtype not in FLOAT8_DTYPES and t.dtype not in FLOAT8_DTYPES
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
    from offload_tensor.checkpoint import same_bytes

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


def _buffers(model: nn.Module, device: torch.device, loaded: dict) -> list[tuple[nn.Module, str, torch.device, torch.Tensor]]:
    """(module, name, device before, buffer on the compute device) for every buffer; buffers a
    checkpoint holds are read from it."""
    from offload_tensor.checkpoint import read_into

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


def _check_parameter(qualname: str, param: torch.Tensor, from_checkpoint: bool) -> None:
    if isinstance(param, OffloadedTensor):
        raise ValueError(
            f"{qualname} is already an OffloadedTensor (this module is part of a wrapped model); wrap a model "
            "once, from its root, or unwrap_model the outer model first."
        )
    if not from_checkpoint and any(t.is_meta for t in leaves(param)):  # a quantized wrapper may be on meta with real data
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
                f"{qualname} is a {type(param).__name__}: checkpoint= loads plain weights (stored as they are or in fp8); "
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
    raise TypeError(f"{qualname}: {reason} Load the model without that quantization backend, or quantize it with torchao.")


def _guarded_apply(module: nn.Module, dtypes: tuple[torch.dtype, ...], device: torch.device, fn, recurse=True):
    """nn.Module._apply for a wrapped module (`.to()`, `.half()`, `.cuda()`, ...).

    Offloaded weights are never passed to `fn`: a device move is ignored with a warning (the
    weights are fetched to the compute device anyway; a move to a device this torch lacks too),
    a dtype change is refused (it would be lost on the payload, or silently unwrap the weights),
    a memory format (`channels_last`) is not applied to them, with a warning. Buffers follow `fn`
    as usual.
    """
    for dtype in dtypes:
        probe = torch.empty(0, dtype=dtype, device=device)
        try:
            moved = fn(probe)
        except (RuntimeError, AssertionError) as e:  # .cuda() on a torch built without CUDA: AssertionError
            moved, failed = None, e
        if moved is not None and moved.dtype != dtype:
            raise RuntimeError(
                f"{type(module).__name__} is wrapped by offload_tensor; changing its dtype ({dtype} -> {moved.dtype}) "
                "after wrapping is not supported. Call unwrap_model(model), convert, and wrap again, or use "
                "storage_dtype= to store the weights in fp8."
            )
        if moved is None or moved.device != device:
            target = f".to({moved.device})" if moved is not None else f" move ({str(failed).splitlines()[0]})"
            warnings.warn(
                f"{type(module).__name__}{target} ignored: its weights are managed by offload_tensor, "
                f"which computes on {device}. To change the compute device, unwrap_model(model) and wrap again "
                "with device=.",
                stacklevel=4,
            )
            return module
    if _first_time(fn) and _changes_layout(fn, device):
        warnings.warn(
            f"{type(module).__name__}.to(memory_format=...) is not applied to offloaded weights: they keep the layout "
            "they were wrapped with (outputs are the same; a GPU may run the convolutions slower). Convert the model "
            "before wrap_model_for_offload, which keeps a weight's layout.",
            stacklevel=4,
        )
    if recurse:
        for child in module.children():
            child._apply(fn)
    for name, buf in module._buffers.items():
        if buf is not None:
            module._buffers[name] = fn(buf)
    return module


_seen_apply: weakref.WeakSet = weakref.WeakSet()  # the functions of _apply calls checked (once per call, not per module)


def _first_time(fn) -> bool:
    try:
        if fn in _seen_apply:
            return False
        _seen_apply.add(fn)
    except TypeError:  # not weakly referenceable: checked at every module
        pass
    return True


def _changes_layout(fn, device: torch.device) -> bool:
    """Whether `fn` converts 4-d or 5-d tensors to another memory format (channels_last)."""
    for probe in (torch.empty(1, 2, 2, 2, device=device), torch.empty(1, 2, 2, 2, 2, device=device)):
        if fn(probe).stride() != probe.stride():
            return True
    return False


def _plain_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Hands out plain tensors (the payload, or its decoded value) on the offload device, so
    # safetensors can save them and a plain model can load them. A payload an engine fetches is
    # handed out as a copy: a write into it would reach the payload without the engine knowing
    # (its device copy stale). `state_dict(keep_vars=True)` hands out the parameters themselves,
    # whose writes land or are refused like any other.
    for name, param in module._parameters.items():
        key = prefix + name
        if isinstance(param, OffloadedTensor) and key in state_dict and state_dict[key] is not param:
            state_dict[key] = param.payload_value(copy=param.fetches).detach()


_WRAPPED_MODULE = "_offload_tensor_wrapped"
_assignment_hook = None


def _install_assignment_hook() -> None:
    global _assignment_hook
    if _assignment_hook is None:
        _assignment_hook = nn.modules.module.register_module_parameter_registration_hook(_assigned_parameter)


def _assigned_parameter(module: nn.Module, name: str, param: torch.Tensor | None):
    """A parameter assigned to a wrapped module in place of an offloaded weight
    (`load_state_dict(sd, assign=True)`, `module.weight = nn.Parameter(t)`): its value is written
    into the offloaded weight, which stays in place, so the model never silently holds a plain
    weight while it reports itself wrapped (an fp8 model computing at full precision, or a weight
    the engine never streams). Parameters under new names (adapters) stay as they are."""
    if param is None or isinstance(param, OffloadedTensor) or not module.__dict__.get(_WRAPPED_MODULE):
        return None
    current = module._parameters.get(name)
    if not isinstance(current, OffloadedTensor):
        return None
    if param.shape != current.shape or param.dtype != current.dtype:
        raise RefusedOpError(
            f"assigning a {tuple(param.shape)} {param.dtype} parameter to {type(module).__name__}.{name}, an offloaded "
            f"{tuple(current.shape)} {current.dtype} weight, would change its shape or dtype after wrapping; "
            "unwrap_model(model) first, or assign a value of the same shape and dtype (it is written into the weight)."
        )
    with torch.no_grad():
        current.copy_(param.detach())
    return current
