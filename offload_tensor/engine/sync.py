"""The engine protocol, and the synchronous engine: copy on demand, in the caller's stream,
nothing cached."""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from typing import ClassVar

import torch

from offload_tensor.engine.disk import before_read


class Engine(abc.ABC):
    """What the fetch op asks at run time, and what wrapping asks of an engine.

    `fetch(key, payload, device)`: `key` identifies one offloaded weight (assigned at wrap, see
    [Note: weight identity] in ops.py); an engine may use it to find a prefetched copy. `payload`
    is the weight's inner tensors on the offload device; the result must equal them, copied to
    `device`, and must not be held by the engine.

    An engine that `streams` serves whole groups from their homes (host arenas, disk files),
    which wrap_model_for_offload hands it with `prepare` (and set_budget with `replan`); one that
    does not fetches each payload where it is. `invalidate()` comes before a payload is written in
    place, `close()` from unwrap_model.
    """

    streams: ClassVar[bool] = False

    @abc.abstractmethod
    def fetch(self, key: int, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]: ...

    def prepare(self, stores: Sequence, prefetch: int, keys: Sequence[Sequence[Hashable]],
                group_keys: Sequence[int] = ()) -> None:  # fmt: skip
        """Serve the weights `keys[g]` (in region order) of each group store. Streaming engines only."""
        raise TypeError(f"{type(self).__name__} does not stream groups (its `streams` is False)")

    def replan(self, stores: Sequence, prefetch: int, keys: Sequence[Sequence[Hashable]],
               group_keys: Sequence[int] = ()) -> None:  # fmt: skip
        """Serve another set of groups of the same model (set_budget). Streaming engines only."""
        raise TypeError(f"{type(self).__name__} does not stream groups (its `streams` is False)")

    def fetch_group(self, group_key: int, device: torch.device) -> torch.Tensor:
        """All of a group's bytes on `device`, handed over. Streaming engines only."""
        raise TypeError(f"{type(self).__name__} does not stream groups (its `streams` is False)")

    def group_bytes(self, group_key: int) -> tuple[torch.Tensor, bool]:
        """A group's bytes for eager code (may be shared by the group's weights), and whether this
        call copied them. Streaming engines only."""
        raise TypeError(f"{type(self).__name__} does not stream groups (its `streams` is False)")

    def invalidate(self) -> None:
        """A payload is about to be written in place: forget any copy of it."""

    def close(self) -> None:
        """Give back what the engine holds (unwrap_model)."""

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host memory the engine holds."""
        return 0


class SynchronousEngine(Engine):
    """Copies each payload tensor to the compute device when it is asked for."""

    def fetch(self, key: int, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        # copy=True: when the offload device is the compute device (a copying test backend), the
        # result must still be a fresh tensor, never the payload itself.
        before_read(payload)  # a payload in a disk-tier cache file: checked before its first use
        return [t.to(device, copy=True) for t in payload]
