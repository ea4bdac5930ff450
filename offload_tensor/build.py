"""The build step of a wrap: every weight's payload, where its plan puts it, group by group.

Invariant: host memory holds at most one group twice. From a model in RAM, a group's host arena
is filled from the original weights, then each original plain weight is pointed at its copy in
the arena, which releases the original's memory while the values and the Parameter objects stay
as they were: a failure in a later group leaves a model that runs, with the same values. (fp8 and
quantized payloads cannot stand in for their originals, so those originals are released only when
the wrap completes.) From a checkpoint, bytes go from the file straight into the arena, or, for
the disk tier, into the group's file; a model on the meta device holds nothing to release.

Nothing here changes the model except through those `.data` pointers; installing the payloads is
wrap's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from offload_tensor.checkpoint import CheckpointError
from offload_tensor.engine import disk
from offload_tensor.engine.disk import DiskGroup, group_file, layout_hash, open_group, read_exactly_into, write_group
from offload_tensor.engine.host_store import Arena, allocate_arena, contiguous_stride, give_back_freed_memory
from offload_tensor.payloads import Float8, PayloadKind, Plain, kind_for
from offload_tensor.planner import Plan, format_bytes
from offload_tensor.source import CheckpointSource, ModelSource

log = logging.getLogger("offload_tensor")
PROGRESS_BYTES = 1 << 30  # a progress bar above this many bytes


@dataclass
class Built:
    payloads: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # what each weight reads
    kinds: dict[str, PayloadKind] = field(default_factory=dict)
    homes: list[Arena | DiskGroup | None] = field(default_factory=list)  # per plan group: where it lives

    def stores(self, plan: Plan) -> tuple[list[Arena | DiskGroup], list[list[str]]]:
        """The homes of the streamed groups, and their weights in order: what the engine streams."""
        streamed = [(h, list(g.weights)) for g, h in zip(plan.groups, self.homes) if g.streamed and h is not None]
        return [h for h, _ in streamed], [w for _, w in streamed]


def specs(weight: torch.Tensor, kind: PayloadKind, stride: tuple[int, ...]) -> list[tuple]:
    """(shape, stride, dtype) of the payload tensors `weight` encodes to."""
    if isinstance(kind, Float8):
        scale = (weight.shape[0], *[1] * (weight.ndim - 1)) if kind.per_channel else ()
        return [(weight.shape, contiguous_stride(weight.shape), kind.storage_dtype),
                (scale, contiguous_stride(scale), torch.float32)]  # fmt: skip
    if isinstance(kind, Plain):
        return [(weight.shape, stride, weight.dtype)]
    return [(t.shape, t.stride(), t.dtype) for t in kind.encode(weight)]


def build(
    model: nn.Module,
    plan: Plan,
    weights: dict[str, torch.Tensor],
    source: ModelSource | CheckpointSource,
    streams_stores: bool,
) -> Built:
    """Payloads for every weight of `plan`, and each group's home. `streams_stores`: the engine
    streams groups from their homes (host arenas, disk files); else weights fetched on demand
    keep their payloads where they are."""
    per_channel = plan.storage.scale == "channel"
    built = Built()
    built.kinds = {n: kind_for(weights[n], plan.storage.dtype, per_channel) for g in plan.groups for n in g.weights}
    files = _disk_files(plan, weights, built.kinds, source) if plan.placement.offload == "disk" else {}
    progress = tqdm(
        plan.groups, desc="offload_tensor: building", unit="group", disable=plan.weight_bytes <= PROGRESS_BYTES
    )
    for group in progress:
        names = list(group.weights)
        kinds = [built.kinds[n] for n in names]
        if group.home == "disk":
            home = files[group.name].open_or_write(kinds, weights, source)
        elif streams_stores or isinstance(source, CheckpointSource) or (group.resident and plan.device.type == "cuda"):
            # a host arena: streamed from it, the home of a group resident on the GPU (so a new
            # budget can stream it), or (from a checkpoint) the memory the weights live in
            home = _arena(names, kinds, weights, source)
            if isinstance(source, ModelSource):
                _release(names, kinds, weights, home.payloads())
        else:  # used where they are (zero-copy on the CPU), or fetched on demand from there
            home = None
        built.homes.append(home)
        if home is None:
            payloads = [tuple(k.encode(source.value(n))) for n, k in zip(names, kinds)]
        else:
            payloads = resident_payloads(home, plan.device) if group.resident else home.payloads()
        built.payloads.update(zip(names, payloads))
    return built


def resident_payloads(home: Arena | DiskGroup, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """A resident group's payloads where the model computes: copied to the GPU; in RAM when
    computing on the CPU (the arena itself, or, from the disk tier, an arena read from the file,
    checked against the file's checksum: its memory map is never read, so its pages stay out of RSS)."""
    if isinstance(home, DiskGroup):
        arena = Arena(torch.empty(home.nbytes, dtype=torch.uint8), home.regions)  # the file's layout
        read_exactly_into(home, arena.buffer)
        home.check(arena.buffer)
        payloads = arena.payloads()
    else:
        payloads = home.payloads()
    if device.type == "cuda":
        return [tuple(t.to(device) for t in payload) for payload in payloads]
    return payloads


def _arena(names, kinds, weights, source) -> Arena:
    arena = allocate_arena([specs(weights[n], k, source.stride(n)) for n, k in zip(names, kinds)])
    for name, kind, views in zip(names, kinds, arena.payloads()):
        if isinstance(kind, Plain):
            source.fill(name, views[0])
        else:
            for dst, src in zip(views, kind.encode(source.value(name))):
                dst.copy_(src)
    return arena


def _release(names, kinds, weights, payloads) -> None:
    """Point each original plain weight at its copy in the arena: its own memory is freed (unless
    something else holds it), its value and identity are unchanged."""
    released = 0
    for name, kind, payload in zip(names, kinds, payloads):
        w = weights[name]
        if isinstance(kind, Plain) and type(w) is nn.Parameter and type(w.data) is torch.Tensor:
            released += w.nbytes
            w.data = payload[0]
    if released:
        give_back_freed_memory()


@dataclass
class _GroupFile:
    """A disk-tier group's file: a cache of the checkpoint reused as it is, or one to write (`why`:
    what was wrong with the cache found there, if any)."""

    path: Path
    names: list[str]
    metadata: dict[str, str]
    shared: bool  # a cache of a checkpoint (else a file of this wrap alone)
    reused: DiskGroup | None = None
    why: str | None = None

    def open_or_write(self, kinds, weights, source) -> DiskGroup:
        if self.reused is not None:
            return self.reused
        inner_names = [k.inner_names for k in kinds]
        payloads = [k.encode(source.value(n).contiguous() if isinstance(k, Plain) else source.value(n))
                    for n, k in zip(self.names, kinds)]  # fmt: skip
        return write_group(self.path, self.names, inner_names, payloads, self.metadata, shared=self.shared)


FILE_OVERHEAD = 64 << 10  # bytes a group file may take beyond its payload (header, alignment), for the room check


def _disk_files(plan: Plan, weights, kinds, source) -> dict[str, _GroupFile]:
    """The disk tier's group files, decided before any is written: caches of this checkpoint found
    in the folder are reused when their headers fit (else written again: they are derived data,
    and the log says so in one line); files of processes that died are removed; the folder must
    be writable and have room for what is written (an error naming the folder, the bytes needed
    and free, before anything changes)."""
    folder = plan.placement.disk_path
    removed, freed = disk.reclaim(folder)
    if removed:
        log.warning("offload_tensor: removed %d files (%s) from %s, left there by processes that no longer run",
                    removed, format_bytes(freed), folder)  # fmt: skip
    shared = source.fingerprint != "memory"
    files = {}
    for group in plan.groups:
        if group.home != "disk":
            continue
        names = list(group.weights)
        expected = [[(s[0], s[2]) for s in specs(weights[n], kinds[n], source.stride(n))] for n in names]
        # the compute dtype too: fp8 payloads of a weight converted to bf16 differ from those of its fp32 value
        layout = layout_hash(names, [[weights[n].dtype, *e] for n, e in zip(names, expected)])
        metadata = {"offload_tensor.layout": layout, "offload_tensor.source": source.fingerprint}
        f = _GroupFile(group_file(folder, group.name, layout), names, metadata, shared)
        if shared and f.path.exists():  # written from this checkpoint before: reuse it if it fits
            try:
                f.reused = open_group(f.path, names, [kinds[n].inner_names for n in names], metadata, expected)
            except CheckpointError as e:
                f.why = str(e)
        files[group.name] = f
    nbytes = {g.name: g.nbytes for g in plan.groups}
    written = [f for f in files.values() if f.reused is None]
    if written:
        stale = [f.why for f in written if f.why]
        what = (
            "from the model in memory" if not shared else f"caches of the checkpoint, {len(stale)} of them to replace"
        )
        disk.check_room(folder, sum(nbytes[n] + FILE_OVERHEAD for n, f in files.items() if f.reused is None),
                        len(written), what)  # fmt: skip
        if stale:
            more = f", and {len(stale) - 1} more" if len(stale) > 1 else ""
            log.warning("offload_tensor: writing %d disk-tier cache files in %s again from the checkpoint (%s%s)",
                        len(stale), folder, stale[0], more)  # fmt: skip
    return files
