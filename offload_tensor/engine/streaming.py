"""The streaming engine: host arenas per group, a scheduler, and a backend that moves bytes.

`prepare` is called by wrap_model_for_offload with one store per streamed group (a block, or a
leaf module's weights): a host arena, or a disk-tier group file. `fetch` then serves a weight
from the group's device slot (or, computing on the CPU from disk, the group's staged read),
copied ahead of use in the learnt execution order.

Threads: fetches and invalidations are serialized by one lock, so two threads running the same
model get correct weights (each read waits for its slot's copy; a slot is reused only after
every stream that read it is done). They do not get speed: interleaved forwards defeat the
learnt order and most fetches become misses, which the engine says once (a RuntimeWarning).
Run one model per thread for throughput; handing a model between threads is free.

A streaming engine belongs to one model: copying or pickling it (`copy.deepcopy(model)`,
`pickle.dumps(model)`, `torch.save(model)`) is refused with what to do instead.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable, Sequence

import torch

from offload_tensor.engine.disk import DiskGroup
from offload_tensor.engine.host_store import Arena
from offload_tensor.engine.scheduler import Backend, Scheduler
from offload_tensor.engine.sync import Engine, SynchronousEngine

_synchronous = SynchronousEngine()


class StreamingEngine(Engine):
    streams = True

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.scheduler: Scheduler | None = None
        self.stores: list[Arena | DiskGroup] = []
        self._lock = threading.Lock()
        self._thread: int | None = None  # the thread of the last fetch
        self._warned_threads = False
        self._memo: tuple[int, torch.Tensor] | None = None  # (group key, bytes) of the group eager code reads

    def prepare(self, stores: Sequence[Arena | DiskGroup], prefetch: int, keys: Sequence[Sequence[int]],
                group_keys: Sequence[int] = ()) -> None:  # fmt: skip
        """Serve the weights `keys[g]` (in region order) of each group store (a host arena or a
        disk-tier group file), and the whole group by its key `group_keys[g]`."""
        if self.scheduler is not None:
            raise ValueError("this StreamingEngine already serves a model; create one engine per wrapped model.")
        self._serve(stores, prefetch, keys, group_keys)

    def replan(self, stores: Sequence[Arena | DiskGroup], prefetch: int, keys: Sequence[Sequence[int]],
               group_keys: Sequence[int] = ()) -> None:  # fmt: skip
        """Serve another set of groups of the same model (set_budget): in-flight copies finish
        first; the order is learnt again."""
        with self._lock:
            self.backend.quiesce()
            self._serve(stores, prefetch, keys, group_keys)

    def _serve(self, stores, prefetch: int, keys, group_keys) -> None:
        self.stores = list(stores)
        self.backend.prepare(self.stores, keys, prefetch + 1)
        group_of = {key: g for g, group_keys_ in enumerate(keys) for key in group_keys_}
        group_of.update((key, g) for g, key in enumerate(group_keys))
        self.scheduler = Scheduler(group_of, prefetch, self.backend)
        self._memo = None

    def invalidate(self) -> None:
        """Payloads are about to be written (load_state_dict, LoRA fuse): let in-flight copies
        finish, and forget what the slots and the eager memo hold, so the next fetch copies the
        new values."""
        with self._lock:
            self.backend.quiesce()
            self._memo = None
            if self.scheduler is not None:
                self.scheduler.reset()

    def close(self) -> None:
        """Give back what the backend holds (pinned registrations); called by unwrap_model."""
        self.backend.close()

    @property
    def pinned_bytes(self) -> int:
        return self.backend.pinned_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of the host arenas (the RAM tier)."""
        return sum(s.nbytes for s in self.stores if isinstance(s, Arena))

    @property
    def arenas(self) -> list[Arena]:
        return [s for s in self.stores if isinstance(s, Arena)]

    def fetch(self, key: Hashable, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if self.scheduler is None or key not in self.scheduler.group_of:
            return _synchronous.fetch(key, payload, device)
        with self._lock:
            return self._fetch(key, False)

    def fetch_group(self, group_key: int, device: torch.device) -> torch.Tensor:
        """All of a group's bytes on the compute device, handed over (the fetch_group op's)."""
        with self._lock:
            return self._fetch(group_key, True)

    def group_bytes(self, group_key: int) -> tuple[torch.Tensor, bool]:
        """All of a group's bytes for eager code, copied once per visit of the group: the weights
        of the group read views of it until compute moves to another group, or a write
        invalidates it. Eager code keeps nothing it reads beyond its use (no compiler reuses
        the memory), so the views may share it. Also whether this call copied it."""
        with self._lock:
            memo = self._memo
            current = self.scheduler.current == self.scheduler.group_of[group_key]
            if memo is not None and memo[0] == group_key and current:
                return memo[1], False
            group = self._fetch(group_key, True)
            self._memo = (group_key, group)
            return group, True

    def _fetch(self, key: Hashable, whole_group: bool):
        """Under the lock: the scheduler's fetch, warning once when threads interleave forwards."""
        thread = threading.get_ident()
        if thread == self._thread:
            return self.scheduler.fetch(key, whole_group)
        misses = self.scheduler.stats.misses
        out = self.scheduler.fetch(key, whole_group)
        if self._thread is not None and self.scheduler.stats.misses > misses and not self._warned_threads:
            # Another thread's forward cut into this one (a handover between whole forwards does
            # not miss): correct, but the prefetch order is lost on every switch.
            self._warned_threads = True
            warnings.warn(
                "offload_tensor: two threads are running forwards of the same streamed model at once; "
                "fetches are serialized, so results are correct, but the prefetch order is lost on every "
                "switch. For throughput, give each thread its own wrapped model.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._thread = thread
        return out

    def __deepcopy__(self, memo):
        raise TypeError(_NOT_COPYABLE)

    def __reduce_ex__(self, protocol):
        raise TypeError(_NOT_COPYABLE)


_NOT_COPYABLE = (
    "a model streamed by offload_tensor cannot be deep-copied, pickled or saved whole: its host arenas and "
    "device slots belong to that one model. Save model.state_dict() (plain tensors; safetensors works), or "
    "unwrap_model(model), copy it, and wrap_model_for_offload the copy."
)
