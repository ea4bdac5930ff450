"""The streaming scheduler: which group to copy into which device slot, and when.

Pure Python and device-agnostic: it talks to a backend (CUDA streams and events, or the fake
backend's virtual clock) through four calls, so the CPU tests run exactly this logic. It is not
thread-safe by itself: its engine serializes calls (see streaming.py).

Invariants:
- A slot is overwritten only after the compute that read it has finished: the copy into a slot
  waits for the slot's `released` event, recorded once compute has moved on to another group
  (every read of the slot was enqueued before that point).
- Compute reads a slot only after the copy into it has finished (`backend.wait(ready)`).
- Correctness never depends on the order guess: a group that is not where the guess put it is
  loaded on demand (a miss), and the order is learnt again from there.
- Reads hand over fresh tensors (see [Note: fetch hands over ownership] in ops.py).

[Note: release events]
A slot's `released` event must cover every read of the slot, or a copy waiting on it may land
while compute still reads. A read makes the slot's event stale, so each read clears it; it is
recorded again when compute moves to another group, when the slot is taken for a copy, and when
the scheduler is reset (a write to a payload, e.g. load_state_dict). A group read, left and read
again (tied weights, a group visited twice per forward) would otherwise keep the event of its
first visit: a later copy would then wait only for the first visit's reads.

[Note: execution order]
The order is learnt from the sequence of group changes of the first forward, as a cycle: the
trace ends when its first group is requested again (the next forward began). After that the
scheduler expects order[pos + 1] next and keeps the groups of order[pos + 1 .. pos + prefetch] in
flight. A request for anything else is a miss: served on demand, counted, and recording starts
again. The guess is right exactly when the trace starts at a group visited once per forward.
Compiled code may interleave independent groups, so some groups are visited several times; a
group seen twice in one trace, or the first group of a guess that missed, is marked and no trace
starts there again. Each wrong guess marks at least one group, so the order is learnt after a
bounded number of misses. An exception that cuts a forward short costs a miss or two the same
way. While recording, groups are loaded on demand.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Event = Any  # opaque to the scheduler: a CUDA event, or a virtual time


class StreamRaceError(AssertionError):
    """A slot used against the invariants above: a copy into it before its reads finished, or a
    read before its copy landed (the fake backend's referee, and the disk backend, raise it)."""


class Backend(abc.ABC):
    """What moves the bytes: the scheduler decides, the backend copies (CUDA streams and events,
    the disk tier's reader thread, or the fake backend's virtual clock)."""

    @abc.abstractmethod
    def prepare(self, stores: Sequence, keys: Sequence[Sequence[Hashable]], slots: int) -> None:
        """Serve `stores` (host arenas or disk groups), the weights `keys[g]` of each, through
        `slots` slots."""

    @abc.abstractmethod
    def copy(self, group: int, slot: int, wait_for: Event | None) -> Event:
        """Start copying `group`'s host arena into device `slot` once `wait_for` has completed;
        return the event that completes when the copy has landed."""

    @abc.abstractmethod
    def wait(self, event: Event) -> None:
        """Make compute wait for `event`."""

    @abc.abstractmethod
    def read(self, group: int, slot: int, key: Hashable) -> list[torch.Tensor]:
        """On the compute stream: fresh tensors holding `key`'s payload from `slot`."""

    @abc.abstractmethod
    def read_group(self, group: int, slot: int) -> torch.Tensor:
        """On the compute stream: a fresh uint8 tensor holding all of `group`'s bytes from `slot`
        (laid out as its store: each weight's tensors at their regions)."""

    @abc.abstractmethod
    def release(self, slot: int) -> Event:
        """An event that completes once every read of `slot` enqueued so far has finished (on
        every stream that read it)."""

    def quiesce(self) -> None:
        """Wait for in-flight copies (before host payloads are written; never on the hot path)."""

    def close(self) -> None:
        """Give back what the backend holds (pinned registrations, threads, descriptors)."""

    @property
    def pinned_bytes(self) -> int:
        return 0


class Phase(enum.Enum):
    """The scheduler's phases, as ranges a profiler trace shows (`torch.profiler`)."""

    FETCH = "offload_tensor.fetch"  # one weight asked for: the whole call
    COPY = "offload_tensor.copy"  # a group's copy into a slot issued
    WAIT = "offload_tensor.wait"  # compute made to wait for a slot's copy


_no_range = contextlib.nullcontext()


def ranged(phase: Phase):
    """A profiler range for `phase` while a profiler records; nothing otherwise (a range costs
    microseconds even unrecorded, on a path taken per weight)."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):  # private: no ranges where it is gone
        return torch.profiler.record_function(phase.value)
    return _no_range


@dataclass
class Slot:
    index: int
    group: int | None = None
    ready: Event | None = None  # the copy of `group` into this slot has landed
    # Completes once every read of the slot enqueued so far has finished; None while reads may
    # be pending that no event covers yet (every read clears it, see [Note: release events]).
    released: Event | None = None


@dataclass
class SchedulerStats:
    hits: int = 0
    misses: int = 0
    copies: int = 0


@dataclass
class Scheduler:
    group_of: dict[Hashable, int]
    prefetch: int
    backend: Backend
    order: list[int] = field(default_factory=list)
    recording: bool = True
    trace: list[int] = field(default_factory=list)  # group changes seen while recording
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch} must be >= 0")
        self.slots = [Slot(i) for i in range(self.prefetch + 1)]
        self.current: int | None = None  # the group compute is reading now
        self.pos = -1  # index of `current` in `order` (when not recording)
        self.unanchored: set[int] = set()  # groups a trace may not start at (see the note)
        self._in_trace: set[int] = set()
        self._waited = 0
        self._groups = len(set(self.group_of.values()))

    # -- the one entry point ------------------------------------------------------------------
    def fetch(self, key: Hashable, whole_group: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """`key`'s payload (a weight's key), or, `whole_group`, all of the bytes of the group `key`
        names (a group's key, or any of its weights')."""
        with ranged(Phase.FETCH):
            group = self.group_of[key]
            if group != self.current:
                self._move_to(group)
            slot = self._slot_holding(group, missing_ok=True)
            if slot is None:  # the copy into it raised (an interrupt, an error): copy again
                self._load(group)
                slot = self._slot_holding(group)
            with ranged(Phase.WAIT):
                self.backend.wait(slot.ready)
            slot.released = None  # this read is covered by no release event yet
            if whole_group:
                return self.backend.read_group(group, slot.index)
            return self.backend.read(group, slot.index, key)

    # -- order and window ---------------------------------------------------------------------
    def _move_to(self, group: int) -> None:
        if self.current is not None:
            # Every read of the current group's slot is enqueued: once compute passes this point
            # the slot may be overwritten.
            current = self._slot_holding(self.current, missing_ok=True)
            if current is not None:
                current.released = self.backend.release(current.index)
        expected = self._expected_next()
        if self.recording:
            self._record(group)
        elif group == expected:
            self.stats.hits += 1
            self.pos = (self.pos + 1) % len(self.order)
        else:
            self.stats.misses += 1
            # The guess was wrong: its first group is visited more than once per forward (or
            # the last forward was cut short by an exception). Learn again, from another group.
            self.unanchored.add(self.order[0])
            self.recording, self.trace = True, []
            self._record(group)
        self.current = group
        if self._slot_holding(group, missing_ok=True) is None:
            self._load(group)
        self._fill_window()

    def _record(self, group: int) -> None:
        trace = self.trace
        if not trace:
            if group in self.unanchored:
                # A trace must start at a group visited once per forward. If none seems left
                # (wrongly marked after exceptions), forget the marks rather than never learning.
                self._waited += 1
                if self._waited > 2 * self._groups:
                    self.unanchored.clear()
                return
            self._waited = 0
            self._in_trace = set()
        elif group == trace[0]:
            # The first group again: guess that a new forward began and the cycle is the trace.
            self.order, self.recording, self.pos, self.trace = trace, False, 0, []
            return
        if group in self._in_trace:
            self.unanchored.add(group)  # seen twice before the cycle closed: never an anchor
        self._in_trace.add(group)
        trace.append(group)

    def _expected_next(self) -> int | None:
        if self.recording or not self.order:
            return None
        return self.order[(self.pos + 1) % len(self.order)]

    def _window(self) -> list[int]:
        if self.recording or not self.order:
            return []
        n = len(self.order)
        ahead = [self.order[(self.pos + i) % n] for i in range(1, min(self.prefetch, n - 1) + 1)]
        return [g for g in ahead if g != self.current]

    def _fill_window(self) -> None:
        for group in self._window():
            if self._slot_holding(group, missing_ok=True) is None:
                self._load(group)

    # -- slots ----------------------------------------------------------------------------------
    def _slot_holding(self, group: int, missing_ok: bool = False) -> Slot | None:
        for slot in self.slots:
            if slot.group == group:
                return slot
        if missing_ok:
            return None
        raise AssertionError(f"group {group} is in no slot")

    def _load(self, group: int) -> None:
        keep = {self.current, *self._window()}
        slot = next((s for s in self.slots if s.group is None), None)
        if slot is None:
            # The ring: the slot whose group is furthest from use. The current group's and the
            # window's slots are never taken.
            free = [s for s in self.slots if s.group not in keep]
            if not free:
                raise AssertionError("no free slot: prefetch + 1 slots hold current + window")
            slot = free[0]
            if slot.released is None:  # loaded but never read (a wrong guess): no reads pending
                slot.released = self.backend.release(slot.index)
        with ranged(Phase.COPY):
            slot.ready = self.backend.copy(group, slot.index, slot.released)
        slot.group = group
        slot.released = None
        self.stats.copies += 1

    def reset(self) -> None:
        """Forget which groups the slots hold (the next fetch of each group copies again). Every
        slot keeps a release event covering all its reads, so no later copy overwrites a slot
        compute may still read."""
        for slot in self.slots:
            if slot.group is not None and slot.released is None:
                slot.released = self.backend.release(slot.index)
            slot.group = None
        self.current = None
