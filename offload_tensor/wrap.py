"""wrap_model_for_offload / unwrap_model: validate -> plan -> build -> install.

- validate: the arguments become frozen policies (`policy.settings`); the model is checked
  (integrations, weights, a checkpoint's keys, shapes and dtypes: `source`). Nothing has changed yet.
- plan: every group, its bytes and its tier (`planner`); shapes and dtypes only.
- build: payloads group by group into their tier (`build`), holding at most one group twice.
- install: `OffloadState.serve` puts the weights in place and the engine behind them; the
  patches (`patches`) and what the integrations install are recorded in the state, which
  unwrap_model undoes.

Invariant: a model is either untouched (a failure while building leaves every weight a plain
Parameter with its value) or completely wrapped. Re-planning a wrapped model (set_budget,
dequantize) is `replan`'s.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn

from offload_tensor import integrations, ops, patches, replan, source
from offload_tensor.build import build
from offload_tensor.engine import Engine
from offload_tensor.engine.factory import default_engine
from offload_tensor.payloads import leaves
from offload_tensor.planner import available_ram, check_ram, make_plan, named_parameter_slots, unique_weights
from offload_tensor.policy import Placement, Storage, Streaming, settings
from offload_tensor.replan import set_budget
from offload_tensor.state import OffloadState, is_wrapped, offload_state
from offload_tensor.tensor import OffloadedTensor

__all__ = ["OffloadState", "is_wrapped", "offload_state", "set_budget", "unwrap_model", "wrap_model_for_offload"]

# what integrations may ask of this layer (integrations.registry.WrapOps)
_OPS = SimpleNamespace(dequantize_payloads=replan.dequantize_payloads, update_weights=replan.update_weights)


def wrap_model_for_offload(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    offload: str | os.PathLike | None = None,
    disk_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    budget: int | str | None = None,
    max_memory: dict | None = None,
    reserve: int | str | None = None,
    storage_dtype: torch.dtype | str | None = None,
    fp8_scale: str | None = None,
    prefetch: int | None = None,
    pin_memory: bool | None = None,
    granularity: str | None = None,
    engine: Engine | None = None,
    storage: Storage | None = None,
    streaming: Streaming | None = None,
    placement: Placement | None = None,
) -> nn.Module:
    """Replace every parameter of `model` by an `OffloadedTensor`, in place, and return `model`.

    Args:
        device: the compute device; `None` means CUDA when available, else the CPU (logged once).
        offload: where the weights live between uses: "cpu" (host RAM, the default) or "disk"
            (files under `disk_path`; a folder path here means the same).
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
        reserve: bytes of the budget kept free (for activations); 0 by default.
        storage_dtype: `torch.float8_e4m3fn` or `torch.float8_e5m2` stores matrices and conv
            kernels in fp8 with a float32 scale, dequantized on fetch; biases, norms and other
            1-d weights keep their dtype. The exposed dtype stays the compute dtype.
        fp8_scale: "channel" (one scale per output channel, the default) or "tensor" (one per weight).
        prefetch, pin_memory, granularity: how streamed weights move, used by the streaming
            engine only (weights streamed to CUDA, or from the disk tier): `prefetch` groups are
            fetched ahead (1); host arenas are pinned once at exact size (True); groups are the
            model's repeated blocks ("block", the default) or each module's own weights ("leaf").
            Computing on the CPU from RAM nothing moves and they do not apply.
        engine: who serves fetches (an `offload_tensor.Engine`). By default the streaming engine
            where weights move (CUDA, or the disk tier), and none when they are used where they
            live (zero-copy). An explicit engine serves every fetch, even on the same device
            (tests, tracing).
        storage, streaming, placement: the settings as policy objects (`offload_tensor.Storage`,
            `Streaming`, `Placement`), instead of their keyword arguments: storage_dtype and
            fp8_scale; prefetch, pin_memory and granularity; device, offload, disk_path, budget and
            reserve. A keyword left at None takes the policy's default, shown above.

    Example:
        >>> model = wrap_model_for_offload(model, device="cuda", storage_dtype=torch.float8_e4m3fn)
        >>> model.compile_repeated_blocks(fullgraph=True)
        >>> print(offload_report(model))
    """
    # -- validate: nothing may change before this is done ---------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model_for_offload expects an nn.Module, got {type(model).__name__}.")
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(f"engine={engine!r} must be an offload_tensor.Engine (subclass it, or leave it None).")
    wanted = settings(
        storage=storage, streaming=streaming, placement=placement, max_memory=max_memory, device=device,
        offload=offload, disk_path=disk_path, budget=budget, reserve=reserve, storage_dtype=storage_dtype,
        fp8_scale=fp8_scale, prefetch=prefetch, pin_memory=pin_memory, granularity=granularity,
    )  # fmt: skip
    if engine is None:
        wanted.placement.check_has_a_tier()
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
    values, dtypes, loaded_buffers = source.match(model, slots, weights, checkpoint, torch_dtype)
    for qualname, _, _, param in slots:
        source.check_weight(qualname, param, from_checkpoint=checkpoint is not None)

    # -- plan, build, install -------------------------------------------------------------------
    with source.declaring(weights, dtypes):
        where = wanted.placement
        plan = make_plan(model, wanted.storage, wanted.streaming, where, always_fetch=engine is not None)
        if checkpoint is not None or wanted.ram is not None:  # a model loaded already holds its weights in RAM
            check_ram(plan.host_bytes, wanted.ram if wanted.ram is not None else available_ram(), where)
        if engine is None:
            engine = default_engine(where.device, where.offload, plan.streamed_bytes > 0, plan.streaming.pin_memory)
        with torch.inference_mode(False):  # normal tensors even under inference_mode: writable outside it
            built = build(model, plan, weights, values, engine.streams)
            buffers = source.read_buffers(model, where.device, loaded_buffers)
            state = OffloadState(
                plan=plan,
                engine=engine,
                originals={n: (leaves(w)[0].device, w.requires_grad, w.is_inference()) for n, w in weights.items()},
                buffer_devices={(module, name): before for module, name, before, _ in buffers},
                built=built,
            )
            state.serve(model, plan, built.payloads, engine)
            built.payloads.clear()  # the weights hold them now; set_budget reads the homes
    for module, name, _, moved in buffers:
        module._buffers[name] = moved
    dtypes = tuple({p.dtype for p in state.weights.values() if p.is_floating_point()} | {torch.float32})
    state.hook_handles = patches.install(model, dtypes, where.device)
    state.undo = integrations.install(model, _OPS)
    model.__dict__["_offload_state"] = state
    return model


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
    patches.remove(model, state.hook_handles)  # before assigning: plain weights are not written through
    for _, module, name, param in slots:
        if id(param) in plain:
            setattr(module, name, plain[id(param)])
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # plain weights again: one chunk for cuDNN, as before wrapping
    for (module, name), device in state.buffer_devices.items():
        if module._buffers.get(name) is not None and device.type != "meta":
            module._buffers[name] = module._buffers[name].to(device)
    for undo in state.undo:
        undo()
    state.engine.close()
    del model.__dict__["_offload_state"]
    return model
