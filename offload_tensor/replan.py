"""Planning a wrapped model again without wrapping it again: a new budget (`set_budget`), or new
payloads (`dequantize_payloads`, behind diffusers' `model.dequantize()`). Both keep each group's
home, or give a group a new one of the same tier, and install through `OffloadState.serve`.

Before a plan reads the homes again, what was written into resident copies (on the GPU, or read
from a disk file into RAM) goes back to the homes (`_write_back_resident`).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import nn

from offload_tensor.build import Built, resident_payloads
from offload_tensor.checkpoint import as_bytes
from offload_tensor.engine import disk
from offload_tensor.engine.factory import default_engine
from offload_tensor.engine.host_store import Arena, build_arena
from offload_tensor.payloads import PLAIN, Subclass, kind_for, stored_bytes
from offload_tensor.planner import Group, Plan, leaf_bytes, unique_weights
from offload_tensor.policy import Tier
from offload_tensor.state import OffloadState, offload_state
from offload_tensor.tensor import OffloadedTensor


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
            f"set_budget: {type(model).__name__} computes on the CPU with offload='cpu', where every weight is "
            "already; "
            "a budget needs a tier to stream from: wrap it again with offload='disk' (disk_path=...)."
        )
    if any(home is None for home in state.built.homes):
        raise ValueError(
            f"set_budget: {type(model).__name__} computes on {old.device} with its weights where they are; a budget "
            "needs a tier to stream from (CUDA, or offload='disk')."
        )
    plan = old.rebudgeted(replace(old.placement, budget=budget, reserve=reserve))
    with torch.inference_mode(False):
        _write_back_resident(old, state)
        _serve_homes(model, state, plan)
    return plan


def dequantize_payloads(model: nn.Module) -> None:
    """Replace every quantized payload (torchao, quanto) of a wrapped model by its dequantized
    value, in the compute dtype, where its group lives (see `_regroup`). Checked before anything
    changes."""
    state = offload_state(model, "dequantize")
    quantized = {n: w for n, w in state.weights.items() if isinstance(w._kind, Subclass)}
    for weight in quantized.values():
        if not hasattr(weight._kind.cls, "dequantize"):
            raise NotImplementedError(f"{weight._kind.cls.__name__} weights cannot be dequantized.")
    if not quantized:
        return
    changes = {n: (w.numel() * w.element_size(), functools.partial(_dequantized, w)) for n, w in quantized.items()}
    _regroup(model, state, list(state.plan.groups), {**state.built.kinds, **dict.fromkeys(quantized, PLAIN)},
             dict(state.weights), changes)  # fmt: skip


def update_weights(model: nn.Module, before: set[int]) -> None:
    """After a library added weights to a wrapped model's modules or removed some (diffusers' QKV
    fusion builds fused projections from the offloaded ones, and removes them when unfused):
    parameters that appeared since `before` (ids of the parameters then) are offloaded, encoded as
    the model's storage says, into the group of the block holding them (or a group of their
    own), and weights no longer in the model leave their groups; see `_regroup`. Parameters that
    were there before and are plain (adapters) stay as they are."""
    state = offload_state(model, "update_weights")
    current = unique_weights(model)
    added = {n: p for n, p in current.items() if id(p) not in before and not isinstance(p, OffloadedTensor)}
    held = {id(p) for p in current.values()}
    kept = {n: w for n, w in state.weights.items() if id(w) in held}
    if not added and len(kept) == len(state.weights):
        return
    plan = state.plan
    per_channel = plan.storage.scale == "channel"
    kinds = {n: state.built.kinds[n] for n in kept} | {
        n: kind_for(p, plan.storage.dtype, per_channel) for n, p in added.items()
    }
    groups = [replace(g, weights=tuple(n for n in g.weights if n in kept)) for g in plan.groups]
    for name in added:  # into the innermost block holding it; else a group of its module's own
        module = name.rpartition(".")[0]
        blocks = [i for i, g in enumerate(groups) if g.block and (module + ".").startswith(g.name + ".")]
        if blocks:
            i = max(blocks, key=lambda i: len(groups[i].name))
            groups[i] = replace(groups[i], weights=(*groups[i].weights, name))
        elif any(g.name == module and not g.block for g in groups):
            i = next(i for i, g in enumerate(groups) if g.name == module and not g.block)
            groups[i] = replace(groups[i], weights=(*groups[i].weights, name))
        else:
            home = Tier.DISK if plan.placement.offload == "disk" else Tier.RAM
            groups.append(Group(module, (name,), 0, home, False, False))
    for name, param in added.items():
        state.originals[name] = (param.device, param.requires_grad, param.is_inference())
    changes = {n: (stored_bytes(p, kinds[n]), functools.partial(_encoded, p, kinds[n])) for n, p in added.items()}
    _regroup(model, state, groups, kinds, {**kept, **added}, changes)


def _regroup(model, state: OffloadState, groups: list[Group], kinds: dict, weights: dict, changes: dict) -> None:
    """Install `groups`, the plan's groups after their weights or payloads changed (the same
    groups first, in order, then new ones), where `changes[name]` = (bytes, payload function):
    the weights whose payload is new, the function giving it from what the group's home holds
    for the weight (None for a weight new to the model). A group whose weights or payloads
    changed gets a new home of its tier (a new host arena, a new disk file of the model's own),
    or, used where it lives, the new payloads themselves; the others keep theirs. The plan keeps
    its budget (a group grown past it streams). The room on disk is checked before anything
    changes; host memory holds a changed group's old and new payloads at most once each."""
    old = state.plan
    size = {n: changes[n][0] if n in changes else weights[n].payload_bytes for n in weights}
    groups = [replace(g, nbytes=sum(size[n] for n in g.weights)) for g in groups]
    plan = replace(old, groups=tuple(groups)).rebudgeted(old.placement, leaf_bytes=leaf_bytes(model, size))
    # a new group gets the kind of home the tier's groups have (replaced by one of its own below)
    template = next((h for h in state.built.homes if h is not None), None)
    homes = list(state.built.homes) + [template] * (len(groups) - len(old.groups))
    changed = [
        i for i, g in enumerate(groups)
        if i >= len(old.groups) or g.weights != old.groups[i].weights or changes.keys() & set(g.weights)
    ]  # fmt: skip
    on_disk = [i for i in changed if isinstance(homes[i], disk.DiskGroup)]
    if on_disk:
        disk.check_room(old.placement.disk_path, sum(groups[i].nbytes for i in on_disk), len(on_disk),
                        "new payloads of the model's weights")  # fmt: skip
    values = {}
    with torch.inference_mode(False):
        _write_back_resident(old, state)
        for i in changed:
            group, home = groups[i], homes[i]
            stored = {}
            if i < len(old.groups):
                stored = dict(zip(old.groups[i].weights, _stored_payloads(state, old.groups[i], home)))
            payloads = [tuple(changes[n][1](stored.get(n))) if n in changes else stored[n] for n in group.weights]
            if home is None:
                values.update(zip(group.weights, payloads))
            elif isinstance(home, Arena):
                homes[i] = build_arena(payloads)
            else:
                homes[i] = disk.write_private(old.placement.disk_path, group.name, group.weights,
                                              [kinds[n].inner_names for n in group.weights], payloads)  # fmt: skip
        _serve_homes(model, state, plan, values, Built(homes=homes, kinds=kinds), weights)


def _stored_payloads(state: OffloadState, group, home) -> list[tuple[torch.Tensor, ...]]:
    """A group's payloads as its home holds them (a disk file read into RAM, checked), or, for a
    group with no home, as its weights hold them."""
    if home is None:
        return [state.weights[n]._inner for n in group.weights]
    return resident_payloads(home, torch.device("cpu")) if isinstance(home, disk.DiskGroup) else home.payloads()


def _dequantized(weight, payload: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    return (weight._kind.decode(payload).dequantize().to(weight.dtype).contiguous(),)


def _encoded(value: torch.Tensor, kind, _: None) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in kind.encode(value.detach()))


def _serve_homes(model: nn.Module, state: OffloadState, plan: Plan, values: dict | None = None,
                 built: Built | None = None, weights: dict | None = None) -> None:  # fmt: skip
    """Install `plan` from the groups' homes (`built`'s, else the state's): a resident group reads
    a copy where the model computes, a streamed one its home through a streaming engine (a new
    one where the current engine does not stream); `values`: the payloads of groups with no home;
    `weights`: the model's weights after a change, by name."""
    built = built or state.built
    payloads = dict(values or {})
    for group, home in zip(plan.groups, built.homes):
        if home is not None:
            stored = resident_payloads(home, plan.device) if group.resident else home.payloads()
            payloads.update(zip(group.weights, stored))
        else:
            payloads.update((n, state.weights[n]._inner) for n in group.weights if n not in payloads)
    stores, _ = built.stores(plan)
    engine = state.engine
    if stores and not engine.streams:
        engine = default_engine(plan.device, plan.placement.offload, True, plan.streaming.pin_memory)
    state.serve(model, plan, payloads, engine, built=built, weights=weights)


def _cpu_without_a_tier(state: OffloadState) -> bool:
    """Computing on the CPU with offload='cpu', every weight is where the model computes: nothing
    to stream from, whether its groups have homes (RAM arenas, from a checkpoint) or not. As in
    wrap_model_for_offload, only an engine of the caller's that streams may."""
    where = state.plan.placement
    return where.device.type == "cpu" and where.offload == "cpu" and not state.engine.streams


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
