"""Host arenas: one contiguous, exact-size buffer per group, holding every payload tensor of the
group, so a group moves to the device in one copy.

Invariant: the arena's bytes are the payload bytes plus at most `ALIGN - 1` bytes of padding per
tensor; payload tensors are views into it. Nothing is pinned per tensor (the caching host
allocator would round each up to a power of two).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes: as the CPU allocator aligns tensors (some kernels round differently on unaligned data)


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def aligned_empty(nbytes: int, alignment: int = 4096, pin_memory: bool = False) -> torch.Tensor:
    """`nbytes` of host memory starting at an `alignment` boundary (direct I/O needs 4096)."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    skip = -raw.data_ptr() % alignment
    return raw[skip : skip + nbytes]


_libc = None


def give_back_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below its mmap threshold in
    the heap), so the process's RSS follows what it holds."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


@dataclass(frozen=True)
class Region:
    offset: int  # bytes into the arena (or the group's byte range on disk)
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _span(self.shape, self.stride) * self.dtype.itemsize

    def view(self, arena: torch.Tensor) -> torch.Tensor:
        flat = arena[self.offset : self.offset + self.nbytes].view(self.dtype)
        return flat.as_strided(self.shape, self.stride)


def _span(shape, stride) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0


def layout(
    specs: Sequence[Sequence[tuple[torch.Size, tuple[int, ...], torch.dtype]]],
) -> tuple[list[list[Region]], int]:
    """Regions of tensors (shape, stride, dtype), one list per weight, packed with alignment;
    and the bytes they take."""
    regions: list[list[Region]] = []
    offset = 0
    for weight in specs:
        placed = []
        for shape, stride, dtype in weight:
            offset = -(-offset // ALIGN) * ALIGN
            region = Region(offset, torch.Size(shape), tuple(stride), dtype)
            placed.append(region)
            offset += region.nbytes
        regions.append(placed)
    return regions, offset


@dataclass(frozen=True)
class GroupLayout:
    """Where one weight's tensors are in its group's bytes (`nbytes` in all): a value the same for
    the same weight of every repeated block (a constant of compiled graphs)."""

    nbytes: int
    regions: tuple[Region, ...]


@dataclass
class Arena:
    """One group's payload tensors in one buffer; `regions[i][j]` is tensor j of weight i."""

    buffer: torch.Tensor
    regions: list[list[Region]]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def payloads(self) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(p.view(self.buffer) for p in weight) for weight in self.regions]


def allocate_arena(specs: Sequence[Sequence[tuple[torch.Size, tuple[int, ...], torch.dtype]]]) -> Arena:
    """An arena for tensors of these (shape, stride, dtype), one list per weight; not filled."""
    regions, nbytes = layout(specs)
    return Arena(torch.empty(nbytes, dtype=torch.uint8), regions)


def build_arena(payloads: Sequence[Sequence[torch.Tensor]]) -> Arena:
    """Copy `payloads` (one tuple of inner tensors per weight) into one exact-size buffer."""
    arena = allocate_arena([[(t.shape, t.stride(), t.dtype) for t in inner] for inner in payloads])
    for inner, views in zip(payloads, arena.payloads()):
        for src, dst in zip(inner, views):
            dst.copy_(src)
    return arena
