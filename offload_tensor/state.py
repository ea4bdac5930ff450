"""OffloadState: what wrapping changed, kept on the model's root, and the one function that puts
offloaded weights in place (wrap, set_budget and dequantize all install through it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from offload_tensor import ops
from offload_tensor.build import Built
from offload_tensor.engine import Engine
from offload_tensor.engine.host_store import GroupLayout
from offload_tensor.planner import Plan, named_parameter_slots
from offload_tensor.policy import Tier
from offload_tensor.tensor import OffloadedTensor


@dataclass
class OffloadState:
    """What wrapping changed, kept on the root module so unwrap_model can undo exactly that. Its
    weights change only through `install`."""

    plan: Plan
    engine: Engine
    # qualified name of each weight's first slot -> (device, requires_grad, is_inference) before
    # wrapping; by name, not id, so that a deep copy of the model can be unwrapped too
    originals: dict[str, tuple[torch.device, bool, bool]]
    buffer_devices: dict[tuple[nn.Module, str], torch.device]  # (module, buffer name) -> device before
    built: Built  # each group's home (for set_budget) and each weight's payload kind
    weights: dict[str, OffloadedTensor] = field(default_factory=dict)  # the installed weights, by the plan's names
    hook_handles: list = field(default_factory=list)
    undo: list = field(default_factory=list)  # what the integrations and the patches installed

    @property
    def compute_device(self) -> torch.device:
        return self.plan.device

    @property
    def tier_of_key(self) -> dict[int, Tier]:
        """Where each streamed weight lives, by its key."""
        return {int(self.weights[n]._key): g.home for g in self.plan.groups if g.streamed for n in g.weights}

    def serve(self, model: nn.Module, plan: Plan, payloads: dict[str, tuple[torch.Tensor, ...]], engine: Engine, *,
              built: Built | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        """Install `plan`, the one way weights are put in place (wrap, set_budget, dequantize):
        each weight reads `payloads[name]` (its home, or a copy where the model computes); the
        weights of streamed groups get new keys, which `engine` serves from the groups' homes
        (`built`), streaming them where it streams. Every place a current weight is held (the
        original parameters, the first time) gets its new one with `setattr`, as modules expect
        (nn.RNN refreshes its weight list); the keys of the weights replaced are forgotten. `built`:
        the groups' new homes and kinds; `weights`: the model's weights when they changed (some
        added, some gone), by name. A streaming engine also serves each group whole, by a key of
        its own (see [Note: one fetch per group] in ops.py)."""
        self.built = built or self.built
        keys = {n: ops.new_key() for g in plan.groups if g.streamed for n in g.weights}
        groups: dict[str, tuple[torch.Tensor, GroupLayout]] = {}
        if engine.streams:
            stores, names = self.built.stores(plan)
            group_keys = [ops.new_key() for _ in stores]
            for store, group_key, ns in zip(stores, group_keys, names):
                groups.update((n, (group_key, GroupLayout(store.nbytes, tuple(r)))) for n, r in zip(ns, store.regions))
            prepare = engine.replan if engine is self.engine and self.weights else engine.prepare
            prepare(stores, plan.streaming.prefetch, [[int(keys[n]) for n in ns] for ns in names],
                    [int(k) for k in group_keys])  # fmt: skip
            keys.update((f"group {int(k)}", k) for k in group_keys)  # registered with the weights' keys below
        current = weights or self.weights or dict(_first_slots(model))
        by_id = {
            id(w): nn.Parameter(OffloadedTensor(payloads[n], self.built.kinds[n], w.dtype, plan.device, keys.get(n),
                                                group=groups.get(n)), requires_grad=False)  # fmt: skip
            for n, w in current.items()
        }
        for weight in self.weights.values():  # each is replaced, or gone from the model
            for key in (weight._key, weight._gkey):
                if key is not None:
                    ops.unregister_engine(int(key), self.engine)
        for _, module, name, param in named_parameter_slots(model):
            if id(param) in by_id:
                setattr(module, name, by_id[id(param)])
        if engine is not self.engine:
            self.engine.close()
            self.engine = engine
        ops.register_engine((int(k) for k in keys.values()), engine)
        self.weights = {n: by_id[id(w)] for n, w in current.items()}
        self.plan = plan


def _first_slots(model: nn.Module):
    seen = set()
    for qualname, _, _, param in named_parameter_slots(model):
        if id(param) not in seen:
            seen.add(id(param))
            yield qualname, param


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("_offload_state"), OffloadState)


def offload_state(model: nn.Module, caller: str) -> OffloadState:
    if not is_wrapped(model):
        raise ValueError(
            f"{caller}: {type(model).__name__} is not wrapped by offload_tensor (never wrapped, or already "
            "unwrapped); call wrap_model_for_offload(model) first."
        )
    return model.__dict__["_offload_state"]
