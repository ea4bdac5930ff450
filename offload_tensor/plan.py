"""The plan of a wrap: every group of weights, its bytes as stored, and where it lives.

A plan reads only shapes and dtypes, so it is made for a model on the `meta` device as well as
for a loaded one: users plan before loading, and wrap_model_for_offload builds exactly the plan
it prints. Groups are the units that move together: a repeated block (its class is one of the
model's blocks, as its library names them) or, outside blocks, a module's own weights
(`granularity="leaf"`: every module's own weights).

The memory terms are those of diffusers' optimization guide: `S_total` (all weights), `S_block`
(the largest repeated block), `S_leaf` (the largest module's own weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from offload_tensor import integrations
from offload_tensor.payloads import kind_for, stored_bytes
from offload_tensor.policy import Placement, Storage, Streaming


def named_parameter_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every place a parameter is held: (qualified name, owning module, attribute, parameter).
    Tied parameters appear once per place."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                yield (f"{module_name}.{name}" if module_name else name), module, name, param


def unique_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter once (tied ones under the first name that holds them), in module order."""
    found: dict[int, tuple[str, torch.Tensor]] = {}
    for qualname, _, _, param in named_parameter_slots(model):
        found.setdefault(id(param), (qualname, param))
    return dict(found.values())


@dataclass(frozen=True)
class Group:
    name: str  # the block's qualified name, or the module's whose own weights these are
    weights: tuple[str, ...]  # qualified names of its weights (first name of a tied weight)
    nbytes: int  # as stored (fp8: values and scales)
    tier: str  # where it lives between uses: "gpu", "ram" or "disk"
    streamed: bool  # fetched to the compute device on use (else used where it lives)
    block: bool  # a repeated block


@dataclass(frozen=True)
class Plan:
    device: torch.device
    groups: tuple[Group, ...]
    storage: Storage
    streaming: Streaming
    placement: Placement
    leaf_bytes: int  # S_leaf

    @property
    def weight_bytes(self) -> int:  # S_total
        return sum(g.nbytes for g in self.groups)

    @property
    def block_bytes(self) -> int:  # S_block
        return max((g.nbytes for g in self.groups if g.block), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if not g.streamed)

    @property
    def streamed_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if g.streamed)

    def bytes_in(self, tier: str) -> int:
        return sum(g.nbytes for g in self.groups if g.tier == tier)

    @property
    def largest_streamed(self) -> int:
        return max((g.nbytes for g in self.groups if g.streamed), default=0)

    @property
    def slot_bytes(self) -> int:
        """Device memory of the streaming engine's slot ring: prefetch + 1 of the largest group."""
        return (self.streaming.prefetch + 1) * self.largest_streamed if self.streamed_bytes else 0

    @property
    def pinned_bytes(self) -> int:
        pinned = self.device.type == "cuda" and self.streaming.pin_memory
        return self.bytes_in("ram") if pinned else 0

    def group_of(self) -> dict[str, int]:
        return {w: i for i, g in enumerate(self.groups) for w in g.weights}


def group_weights(model: nn.Module, weights: dict[str, torch.Tensor], granularity: str) -> list[tuple[str, list[str], bool]]:
    """(group name, weight names, is a block) for every group, in module order: one group per
    repeated block (granularity="block"), and one per module for the weights of modules outside
    blocks (or for all, granularity="leaf")."""
    block_names = integrations.block_names(model) if granularity == "block" else set()
    name_of = {id(w): n for n, w in weights.items()}
    placed: set[str] = set()
    groups = []

    def take(params) -> list[str]:
        found = [name_of[id(p)] for p in params if id(p) in name_of and name_of[id(p)] not in placed]
        placed.update(found)
        return found

    for module_name, module in model.named_modules():
        is_block = type(module).__name__ in block_names
        names = take(module.parameters() if is_block else (p for p in module._parameters.values() if p is not None))
        if names:
            groups.append((module_name, names, is_block))
    return groups


def make_plan(
    model: nn.Module, storage: Storage, streaming: Streaming, placement: Placement, always_fetch: bool = False
) -> Plan:
    """The plan for wrapping `model` with these policies. `always_fetch`: every group is fetched
    through the engine, even where it lives on the compute device (an explicit engine)."""
    weights = unique_weights(model)
    per_channel = storage.scale == "channel"
    size = {n: stored_bytes(w, kind_for(w, storage.dtype, per_channel)) for n, w in weights.items()}
    tier = placement.offload if placement.offload == "disk" else "ram"
    streamed = always_fetch or tier != placement.resident_tier
    groups = tuple(
        Group(name, tuple(names), sum(size[n] for n in names), tier, streamed, block)
        for name, names, block in group_weights(model, weights, streaming.granularity)
    )
    leaf = max(
        (sum(size[n] for n in names) for _, names, _ in group_weights(model, weights, "leaf")), default=0
    )
    return Plan(placement.device, groups, storage, streaming, placement, leaf)
