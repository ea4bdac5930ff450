"""The CUDA backend: pinned host arenas, one copy stream, events. The only file that uses
torch.cuda; everything it decides comes from the scheduler, which the CPU tests run on the fake
backend.

Streams:
- `copy_stream`: host-to-device copies of whole group arenas into device slots; overlaps the
  compute running on the caller's current stream.
Events order the two (no `synchronize()` on the hot path): compute waits for a slot's `ready`
event before reading it; a copy into a slot waits for the slot's `released` event, recorded on
the compute stream after every read of the slot's previous group. Slots are allocated once and
never freed, and reads hand over fresh tensors allocated on the compute stream, so no tensor
crosses streams and `record_stream` is never needed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Sequence

import torch

from offload_tensor.engine.host_store import Arena

log = logging.getLogger("offload_tensor")


class CudaBackend:
    def __init__(self, device: torch.device, pin_memory: bool = True) -> None:
        self.device = device
        self.pin_memory = pin_memory
        self.copy_stream = torch.cuda.Stream(device)
        self.pinned: list[torch.Tensor] = []
        self.arenas: list[Arena] = []
        self.slot_buffers: list[torch.Tensor] = []

    @property
    def pinned_bytes(self) -> int:
        return sum(t.numel() for t in self.pinned)

    def prepare(self, arenas: Sequence[Arena], keys: Sequence[Sequence[Hashable]], slots: int) -> None:
        self.arenas = list(arenas)
        self.key_index = {key: (g, i) for g, group_keys in enumerate(keys) for i, key in enumerate(group_keys)}
        if self.pin_memory:
            self._pin(self.arenas)
        largest = max((a.nbytes for a in self.arenas), default=0)
        self.slot_buffers = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(slots)]

    def _pin(self, arenas: Sequence[Arena]) -> None:
        # Register the arenas' own memory, at its exact size, instead of copying into the caching
        # host allocator (which rounds each allocation up to a power of two).
        cudart = torch.cuda.cudart()
        for arena in arenas:
            if arena.nbytes == 0:
                continue
            err = cudart.cudaHostRegister(arena.buffer.data_ptr(), arena.nbytes, 0)
            if int(err) != 0:
                self.close()
                warnings.warn(
                    f"offload_tensor: pinning {arena.nbytes} bytes of host memory failed (cudaError {int(err)}; "
                    "ulimit -l or WSL limits?); copies will come from pageable memory and overlap less.",
                    stacklevel=3,
                )
                return
            self.pinned.append(arena.buffer)

    def quiesce(self) -> None:
        """Wait for in-flight copies (before host payloads are written; never on the hot path)."""
        self.copy_stream.synchronize()

    def close(self) -> None:
        cudart = torch.cuda.cudart()
        for buffer in self.pinned:
            cudart.cudaHostUnregister(buffer.data_ptr())
        self.pinned = []

    def _check_not_capturing(self) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "offload_tensor: a fetch was captured into a CUDA graph, where its copies would replay stale "
                "weights. Use torch.compile(mode='max-autotune-no-cudagraphs') or the default mode with "
                "offloaded weights."
            )

    def copy(self, group: int, slot: int, wait_for: torch.cuda.Event | None) -> torch.cuda.Event:
        self._check_not_capturing()
        arena = self.arenas[group]
        ready = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            if wait_for is not None:
                self.copy_stream.wait_event(wait_for)
            self.slot_buffers[slot][: arena.nbytes].copy_(arena.buffer, non_blocking=True)
            ready.record(self.copy_stream)
        return ready

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def read(self, group: int, slot: int, key: Hashable) -> list[torch.Tensor]:
        g, i = self.key_index[key]
        return [p.view(self.slot_buffers[slot]).clone() for p in self.arenas[g].placements[i]]

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
