"""A backend for tests: real copies on the CPU, a virtual clock for two streams, and a referee.

Copies run on a simulated copy stream and land at a virtual time; compute runs on a simulated
compute stream that advances by `compute_s` per read. The backend raises `StreamRaceError` when
the scheduler breaks the rules a real GPU would punish silently:
- a copy into a slot starts before the compute that read the slot's previous group finished;
- compute reads a slot before the copy into it landed, or reads a slot holding another group.
Slot memory is real, so a broken schedule that escaped the referee would also corrupt outputs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from offload_tensor.engine.host_store import Arena
from offload_tensor.engine.scheduler import Backend, StreamRaceError


@dataclass
class FakeBackend(Backend):
    copy_s_per_byte: float = 1e-9
    compute_s: float = 1e-4
    log: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arenas: list[Arena] = []
        self.key_index: dict[Hashable, tuple[int, int]] = {}
        self.slot_buffers: list[torch.Tensor] = []
        self.copy_clock = 0.0
        self.compute_clock = 0.0

    def prepare(self, arenas: Sequence[Arena], keys: Sequence[Sequence[Hashable]], slots: int) -> None:
        self.arenas = list(arenas)
        self.key_index = {key: (g, i) for g, group_keys in enumerate(keys) for i, key in enumerate(group_keys)}
        largest = max((a.nbytes for a in self.arenas), default=0)
        self.slot_buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(slots)]
        self.slot_group: list[int | None] = [None] * slots
        self.slot_landed = [0.0] * slots
        self.slot_read_until = [0.0] * slots

    def copy(self, group: int, slot: int, wait_for: float | None) -> float:
        start = max(self.copy_clock, wait_for or 0.0)
        if start < self.slot_read_until[slot]:
            raise StreamRaceError(
                f"copy of group {group} into slot {slot} starts at t={start:.6f} while compute reads the slot "
                f"until t={self.slot_read_until[slot]:.6f}"
            )
        arena = self.arenas[group]
        self.slot_buffers[slot][: arena.nbytes].copy_(arena.buffer)
        self.copy_clock = start + arena.nbytes * self.copy_s_per_byte
        self.slot_group[slot] = group
        self.slot_landed[slot] = self.copy_clock
        self.log.append(("copy", group, slot, start, self.copy_clock))
        return self.copy_clock

    def wait(self, event: float) -> None:
        self.compute_clock = max(self.compute_clock, event)

    def read(self, group: int, slot: int, key: Hashable) -> list[torch.Tensor]:
        self._check_read(group, slot)
        g, i = self.key_index[key]
        out = [p.view(self.slot_buffers[slot]).clone() for p in self.arenas[g].regions[i]]
        self._record_read(slot)
        self.log.append(("read", group, slot, key))
        return out

    def _check_read(self, group: int, slot: int) -> None:
        if self.slot_group[slot] != group:
            raise StreamRaceError(f"compute reads group {group} from slot {slot}, which holds {self.slot_group[slot]}")
        if self.compute_clock < self.slot_landed[slot]:
            raise StreamRaceError(
                f"compute reads slot {slot} at t={self.compute_clock:.6f} before its copy lands at "
                f"t={self.slot_landed[slot]:.6f}"
            )

    def _record_read(self, slot: int) -> None:
        self.compute_clock += self.compute_s
        self.slot_read_until[slot] = self.compute_clock

    def read_group(self, group: int, slot: int) -> torch.Tensor:
        self._check_read(group, slot)
        out = self.slot_buffers[slot][: self.arenas[group].nbytes].clone()
        self._record_read(slot)
        self.log.append(("read", group, slot, None))
        return out

    def release(self, slot: int) -> float:
        # One simulated compute stream: everything enqueued on it so far includes every read.
        return self.compute_clock
