"""The plan of a wrap: every group of weights, its bytes as stored, where it lives, and whether it
stays resident where the model computes.

A plan reads only shapes and dtypes, so it is made for a model on the `meta` device as well as for
a loaded one: users plan before loading, and wrap_model_for_offload builds exactly the plan it
would print. Groups are the units that move together: a repeated block (its class is one of the
model's blocks, as its library names them) or, outside blocks, a module's own weights
(`granularity="leaf"`: every module's own weights).

Each group has a home (`"ram"`: a host arena; `"disk"`: a file of the disk tier) and is either
resident (used where the model computes, no fetch: on the GPU, or in RAM when computing on the
CPU) or streamed from its home. With a budget, as many groups stay resident as fit beside the
streaming engine's slots, chosen to stream the fewest bytes per step.

The memory terms are those of diffusers' optimization guide: `S_total` (all weights), `S_max` (the
largest component of a pipeline), `S_block` (the largest repeated block), `S_leaf` (the largest
module's own weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from offload_tensor import integrations
from offload_tensor.payloads import kind_for, stored_bytes
from offload_tensor.policy import Placement, Storage, Streaming, Tier


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
    home: Tier  # where it lives: RAM (a host arena, or the weights where they are) or DISK
    resident: bool  # used where the model computes, without a fetch
    block: bool  # a repeated block

    @property
    def streamed(self) -> bool:
        return not self.resident


@dataclass(frozen=True)
class Plan:
    device: torch.device
    groups: tuple[Group, ...]
    storage: Storage
    streaming: Streaming
    placement: Placement
    leaf_bytes: int  # S_leaf
    name: str = "model"
    bandwidth: float | None = None  # bytes/s the streamed bytes move at, where known (for the table)

    # -- the terms users reason with --------------------------------------------------------
    @property
    def weight_bytes(self) -> int:  # S_total
        return sum(g.nbytes for g in self.groups)

    @property
    def block_bytes(self) -> int:  # S_block
        return max((g.nbytes for g in self.groups if g.block), default=0)

    @property
    def resident_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if g.resident)

    @property
    def streamed_bytes(self) -> int:
        """Bytes one forward moves: each streamed group once."""
        return sum(g.nbytes for g in self.groups if g.streamed)

    @property
    def largest_streamed(self) -> int:
        return max((g.nbytes for g in self.groups if g.streamed), default=0)

    @property
    def slot_bytes(self) -> int:
        """The streaming engine's slots where the model computes: prefetch + 1 of the largest
        streamed group."""
        return (self.streaming.prefetch + 1) * self.largest_streamed

    @property
    def fetched_bytes(self) -> int:
        """On an accelerator, the group in use, copied out of its slot (one fetch per group: see
        [Note: one fetch per group] in ops.py); computing on the CPU the disk tier's read buffer
        is handed over itself."""
        return self.largest_streamed if self.device.type != "cpu" else 0

    @property
    def copies(self) -> int:
        """How many buffers the size of the largest streamed group streaming takes where the model
        computes: the slots, and the group in use."""
        return self.streaming.prefetch + 1 + (self.device.type != "cpu")

    @property
    def device_bytes(self) -> int:
        """What the weights take where the model computes: resident groups, the slots and the
        group in use."""
        return self.resident_bytes + self.slot_bytes + self.fetched_bytes

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host memory: the RAM arenas of a CUDA model (pinned once, at exact size),
        or the disk tier's staging buffers."""
        if self.device.type != "cuda" or not self.streaming.pin_memory:
            return 0
        if self.placement.offload == "disk":
            return self.slot_bytes
        return sum(g.nbytes for g in self.groups if g.home == Tier.RAM)

    @property
    def host_bytes(self) -> int:
        """Host RAM the weights need: their arenas (a CUDA model keeps every group's home in RAM),
        resident groups of a CPU model, and the disk tier's read buffers."""
        if self.placement.offload == "disk":
            ram_resident = self.resident_bytes if self.device.type != "cuda" else 0
            return ram_resident + self.slot_bytes
        return self.weight_bytes

    @property
    def minimum_budget(self) -> int:
        """The smallest device budget this model runs with: every group streamed."""
        largest = max((g.nbytes for g in self.groups), default=0)
        return self.copies * largest + self.placement.reserve

    def bytes_in(self, tier: Tier | str) -> int:
        return sum(g.nbytes for g in self.groups if tier_of(g, self.device) == tier)

    def rebudgeted(self, placement: Placement, sizes: list[int] | None = None, leaf_bytes: int | None = None) -> Plan:
        """This plan under `placement`'s budget (its groups `sizes` bytes each, when they changed:
        dequantized payloads): the most bytes resident that fit beside the slots
        (`choose_resident`); without a budget the groups stay as they are. Below the minimum (every
        group streamed) is an error that says the minimum."""
        groups = [replace(g, nbytes=n) for g, n in zip(self.groups, sizes or [g.nbytes for g in self.groups])]
        if placement.budget is not None:
            resident = choose_resident([g.nbytes for g in groups], placement.budget - placement.reserve, self.copies)
            groups = [replace(g, resident=i in resident) for i, g in enumerate(groups)]
        plan = replace(self, groups=tuple(groups), placement=placement,
                       leaf_bytes=self.leaf_bytes if leaf_bytes is None else leaf_bytes)  # fmt: skip
        if placement.budget is not None and plan.device_bytes + placement.reserve > placement.budget:
            largest = max((g.nbytes for g in groups), default=0)
            raise ValueError(
                f"budget={format_bytes(placement.budget)} is below the minimum for {plan.name}: "
                f"{format_bytes(plan.minimum_budget)} ({self.copies} copies of its largest group, "
                f"{format_bytes(largest)}: {self.streaming.prefetch + 1} slots"
                + (" and the group in use" if self.fetched_bytes else "")
                + (f", plus reserve {format_bytes(placement.reserve)}" if placement.reserve else "")
                + "). Raise the budget, lower prefetch, or use granularity='leaf' (smaller groups)."
            )
        return plan

    def table(self, bandwidth: float | None = None) -> str:
        return format_table([self], bandwidth or self.bandwidth)

    def __str__(self) -> str:
        return self.table()


def tier_of(group: Group, device: torch.device) -> Tier:
    """Where compute reads a group from: GPU (resident on CUDA), RAM or DISK."""
    if group.resident:
        return Tier.GPU if device.type == "cuda" else Tier.RAM
    return group.home


def group_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], granularity: str
) -> list[tuple[str, list[str], bool]]:
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
    """The plan for wrapping `model` with these policies. `always_fetch`: with no budget, every
    group is fetched through the engine, even where it lives on the compute device (an explicit
    engine)."""
    weights = unique_weights(model)
    per_channel = storage.scale == "channel"
    size = {n: stored_bytes(w, kind_for(w, storage.dtype, per_channel)) for n, w in weights.items()}
    home = Tier.DISK if placement.offload == "disk" else Tier.RAM
    where = placement.resident_tier  # RAM computing on the CPU, GPU on CUDA
    groups = [
        Group(name, tuple(names), sum(size[n] for n in names), home, False, block)
        for name, names, block in group_weights(model, weights, streaming.granularity)
    ]
    moves = home != where or always_fetch  # else every weight is used where it lives: no engine, no slots
    most = max(len(groups) - 1, 1)  # 1, the default, is always accepted
    if moves and streaming.prefetch > most:  # the engine allocates prefetch + 1 slots, used or not
        raise ValueError(
            f"prefetch={streaming.prefetch} is more than {type(model).__name__}'s {len(groups)} groups can use: at "
            f"most {len(groups) - 1} are fetched ahead of the one in use, and each one more adds a device slot the "
            f"size of the largest group; use prefetch <= {most}."
        )
    if placement.budget is None:
        groups = [replace(g, resident=home == where and not always_fetch) for g in groups]
    plan = Plan(
        placement.device, tuple(groups), storage, streaming, placement, leaf_bytes(model, size), type(model).__name__
    )
    return plan.rebudgeted(placement) if placement.budget is not None else plan


def leaf_bytes(model: nn.Module, size: dict[str, int]) -> int:
    """S_leaf: the largest module's own weights, with each weight `size[name]` bytes as stored."""
    groups = group_weights(model, unique_weights(model), "leaf")
    return max((sum(size[n] for n in names) for _, names, _ in groups), default=0)


def choose_resident(sizes: list[int], budget: int, copies: int) -> set[int]:
    """Indices of the groups that stay resident: the most bytes that fit in `budget` beside what
    streaming takes (`copies` x the largest streamed group: the slots, and the group in use), so
    the fewest bytes stream per step. For each candidate largest streamed group, every larger
    group must be resident, and smaller ones are added largest first while they fit."""
    if sum(sizes) <= budget:
        return set(range(len(sizes)))
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    best: set[int] = set()
    best_bytes = -1
    for k, largest in enumerate(order):  # `largest` is the largest streamed group
        room = budget - copies * sizes[largest] - sum(sizes[i] for i in order[:k])
        if room < 0:
            continue
        chosen = set(order[:k])
        for i in order[k + 1 :]:
            if sizes[i] <= room:
                chosen.add(i)
                room -= sizes[i]
        resident_bytes = sum(sizes[i] for i in chosen)
        if resident_bytes > best_bytes:
            best, best_bytes = chosen, resident_bytes
    return best


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(plans: list[Plan], bandwidth: float | None = None, names: list[str] | None = None,
                 budget: int | None = None) -> str:  # fmt: skip
    """The plan as users read it (one or more components, and their total)."""
    names = names or [p.name for p in plans]
    first = plans[0]
    budget = budget if budget is not None else first.placement.budget
    home = "on disk" if first.placement.offload == "disk" else "in host RAM"
    head = (
        f"offload_tensor plan on {first.device} (weights live {home}"
        + (f", budget {format_bytes(budget)}" if budget is not None else ", no budget")
        + f", prefetch {first.streaming.prefetch}, {first.streaming.granularity} groups"
        + (f", stored in {first.storage.dtype}" if first.storage.dtype else "")
        + ")"
    )
    total = sum(p.weight_bytes for p in plans)
    per_step = sum(p.streamed_bytes for p in plans)
    rows = [
        ("S_total", format_bytes(total), "all weights, as stored"),
        ("S_max", format_bytes(max(p.weight_bytes for p in plans)), "the largest component"),
        ("S_block", format_bytes(max(p.block_bytes for p in plans)), "the largest repeated block"),
        ("S_leaf", format_bytes(max(p.leaf_bytes for p in plans)), "the largest module's own weights"),
    ]
    for name, p in zip(names, plans):
        resident_groups = sum(g.resident for g in p.groups)
        label = f"{name}: " if len(plans) > 1 else ""
        rows.append((f"{label}resident", format_bytes(p.resident_bytes),
                     f"{resident_groups} of {len(p.groups)} groups stay where the model computes"))  # fmt: skip
        rows.append((f"{label}streamed", format_bytes(p.streamed_bytes), f"from {p.placement.offload}, every step"))
        if p.streamed_bytes:
            rows.append((f"{label}slots", format_bytes(p.slot_bytes),
                         f"{p.streaming.prefetch + 1} x the largest streamed group"))  # fmt: skip
            if p.fetched_bytes:
                rows.append((f"{label}in use", format_bytes(p.fetched_bytes), "the group being read, one copy"))
    device = sum(p.device_bytes for p in plans) + first.placement.reserve
    rows.append(
        (
            "on the device",
            format_bytes(device),
            "resident weights, slots, group in use" + (", reserve" if first.placement.reserve else ""),
        )
    )
    rows.append(("pinned host", format_bytes(sum(p.pinned_bytes for p in plans)), "page-locked, at exact size"))
    rows.append(("host RAM", format_bytes(sum(p.host_bytes for p in plans)), "for weights"))
    moved = f"at {bandwidth / 1e9:.1f} GB/s: {per_step / bandwidth:.3f} s" if bandwidth else "bandwidth unknown"
    rows.append(("per step", format_bytes(per_step), moved))
    rows.append(("min budget", format_bytes(sum(p.minimum_budget for p in plans)), "every group streamed"))
    width = max(len(r[0]) for r in rows)
    return "\n".join([head] + [f"  {a:<{width}}  {b:>10}   {c}" for a, b, c in rows])


def measured_bandwidth(where: Placement) -> float | None:
    """Pinned host-to-device bandwidth on this machine's CUDA device (256 MiB copies), when the
    plan is for it; None otherwise (pass bandwidth=)."""
    if where.device.type != "cuda" or where.offload != "cpu" or not torch.cuda.is_available():
        return None
    import time

    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device=where.device)
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize(where.device)
    start = time.perf_counter()
    for _ in range(4):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize(where.device)
    return 4 * host.numel() / (time.perf_counter() - start)


def check_ram(needed: int, ram: int, placement: Placement) -> None:
    if needed > ram:
        offer = (
            "use offload='disk' (disk_path=...) to keep weights on disk, or a smaller model"
            if placement.offload != "disk"
            else "lower prefetch, or use granularity='leaf'"
        )
        raise ValueError(
            f"the weights need {format_bytes(needed)} of host RAM (their arenas), more than ram={format_bytes(ram)}; "
            f"{offer}. "
            "(pin_memory=False makes them pageable, which the OS may swap, but needs the same RAM.)"
        )


def available_ram() -> int:
    """Memory the OS can give without swapping (MemAvailable), or the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
