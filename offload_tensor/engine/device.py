"""The device backend: host arenas copied into device slots on a copy stream, ordered by events,
written against the device-generic API (`torch.get_device_module(device)`: its `Stream`, `Event`,
`stream()`, `current_stream()`), so the same code runs on CUDA (and ROCm, as `cuda`), XPU and,
with the CPU's no-op streams and events, on the CPU, where the test suite runs every line of it
under the real scheduler (the fake backend's referee is what catches a missing wait there).

Streams:
- `copy_stream`: host-to-device copies of whole group arenas into device slots; overlaps the
  compute running on the caller's current stream.
Events order the two (no `synchronize()` on the hot path): compute waits for a slot's `ready`
event before reading it; a copy into a slot waits for the slot's `released` events, recorded on
every stream that read the slot's previous group (one, unless several threads with their own
streams share the model), after those reads. Slots are allocated once and never freed, and
reads hand over fresh tensors allocated on the reading stream, so no tensor crosses streams and
`record_stream` is never needed.

Pinning: on CUDA (and ROCm) the arenas' own memory is registered at its exact size
(`cudaHostRegister`), never copied into `pin_memory()` buffers, which round each allocation up
to a power of two (2.25 GiB becomes 4 GiB). Elsewhere nothing is pinned (said once). The
registrations are undone by `close()` (unwrap_model), or when the backend is collected (a model
dropped without unwrap_model): memory must be unregistered before it is freed.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Hashable, Sequence

import torch

from offload_tensor.engine.host_store import Arena
from offload_tensor.engine.scheduler import Backend

log = logging.getLogger("offload_tensor")


class DeviceBackend(Backend):
    def __init__(self, device: torch.device, pin_memory: bool = True) -> None:
        self.device = torch.device(device)
        self.module = torch.get_device_module(self.device)
        self.pin_memory = pin_memory and _registers_host_memory(self.device)
        if pin_memory and not self.pin_memory and self.device.type != "cpu":
            log.info("offload_tensor: host memory is not pinned on %s; copies come from pageable memory.", self.device)
        self.copy_stream = self.module.Stream(self.device) if self.device.type != "cpu" else self.module.Stream()
        self.pinned: list[torch.Tensor] = []
        self.arenas: list = []
        self.slot_buffers: list[torch.Tensor] = []
        self.readers: list[list] = []  # per slot: streams that read it since its copy
        # Runs at close() or when the backend is collected; holds the list, not the backend.
        self._unpin = weakref.finalize(self, _unregister, self.pinned)

    @property
    def pinned_bytes(self) -> int:
        return sum(t.numel() for t in self.pinned)

    def prepare(self, arenas: Sequence, keys: Sequence[Sequence[Hashable]], slots: int) -> None:
        """`arenas`: host arenas, or any groups with `nbytes` and `regions` whose bytes arrive
        through `copy_from` (the disk tier's staging buffers)."""
        self.arenas = list(arenas)
        self.key_index = {key: (g, i) for g, group_keys in enumerate(keys) for i, key in enumerate(group_keys)}
        _unregister(self.pinned)  # a new plan of the same model (set_budget) pins its own set
        if self.pin_memory:
            self._pin([a for a in self.arenas if isinstance(a, Arena)])
        largest = max((a.nbytes for a in self.arenas), default=0)
        self.slot_buffers = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self.readers = [[] for _ in range(slots)]

    def _pin(self, arenas: Sequence[Arena]) -> None:
        # Register the arenas' own memory, at its exact size, instead of copying into the caching
        # host allocator (which rounds each allocation up to a power of two).
        cudart = torch.cuda.cudart()
        for arena in arenas:
            if arena.nbytes == 0:
                continue
            err = cudart.cudaHostRegister(arena.buffer.data_ptr(), arena.nbytes, 0)
            if int(err) != 0:
                _unregister(self.pinned)
                warnings.warn(
                    f"offload_tensor: pinning {arena.nbytes} bytes of host memory failed (error {int(err)}; "
                    "ulimit -l or WSL limits?); copies will come from pageable memory and overlap less.",
                    stacklevel=3,
                )
                return
            self.pinned.append(arena.buffer)

    def quiesce(self) -> None:
        """Wait for in-flight copies (before host payloads are written; never on the hot path)."""
        if hasattr(self.copy_stream, "synchronize"):  # the CPU's stand-in stream has none: nothing is in flight
            self.copy_stream.synchronize()

    def close(self) -> None:
        self.quiesce()
        self._unpin()

    def check_not_capturing(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "offload_tensor: a fetch was captured into a CUDA graph, where its copies would replay stale "
                "weights. Use torch.compile(mode='max-autotune-no-cudagraphs') or the default mode with "
                "offloaded weights."
            )

    def copy(self, group: int, slot: int, wait_for: list | None):
        self.check_not_capturing()
        return self.copy_from(self.arenas[group].buffer, slot, wait_for)

    def copy_from(self, host: torch.Tensor, slot: int, wait_for: list | None):
        """Copy `host` (bytes) into device `slot` on the copy stream once `wait_for` completed."""
        ready = self.module.Event()
        with self.module.stream(self.copy_stream):
            for event in wait_for or ():
                self.copy_stream.wait_event(event)
            self.slot_buffers[slot][: host.numel()].copy_(host, non_blocking=True)
            ready.record(self.copy_stream)
        return ready

    def wait(self, event) -> None:
        self._current().wait_event(event)

    def read(self, group: int, slot: int, key: Hashable) -> list[torch.Tensor]:
        g, i = self.key_index[key]
        self._note_reader(slot)
        return [r.view(self.slot_buffers[slot]).clone() for r in self.arenas[g].regions[i]]

    def read_group(self, group: int, slot: int) -> torch.Tensor:
        self._note_reader(slot)
        return self.slot_buffers[slot][: self.arenas[group].nbytes].clone()

    def release(self, slot: int) -> list:
        events = []
        for stream in self.readers[slot]:
            event = self.module.Event()
            event.record(stream)
            events.append(event)
        self.readers[slot] = []
        return events

    def _current(self):
        return self.module.current_stream(self.device) if self.device.type != "cpu" else self.module.current_stream()

    def _note_reader(self, slot: int) -> None:
        stream = self._current()
        if all(s != stream for s in self.readers[slot]):
            self.readers[slot].append(stream)


def _registers_host_memory(device: torch.device) -> bool:
    """Whether this torch can register host memory at its exact size for `device` (CUDA, ROCm)."""
    return device.type == "cuda" and torch.cuda.is_available()


def _unregister(pinned: list[torch.Tensor]) -> None:
    if pinned:
        cudart = torch.cuda.cudart()
        for buffer in pinned:
            cudart.cudaHostUnregister(buffer.data_ptr())
    pinned.clear()
