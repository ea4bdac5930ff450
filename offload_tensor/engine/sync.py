"""The synchronous engine: copy on demand, in the caller's stream, nothing cached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from offload_tensor.engine.disk import before_read


class Engine(Protocol):
    """What the fetch op asks at run time.

    `key` identifies one offloaded weight (assigned at wrap, see [Note: weight identity] in
    ops.py); an engine may use it to find a prefetched copy. `payload` is the weight's inner tensors on the offload
    device; the result must equal them, copied to `device`, and must not be held by the engine.

    Optional methods, called when present: `prepare(groups, prefetch, keys)` by
    wrap_model_for_offload with the payloads grouped (returns the payloads to keep, e.g. views
    into host arenas), `invalidate()` before a payload is written in place, `close()` by
    unwrap_model.
    """

    def fetch(self, key: int, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]: ...


class SynchronousEngine:
    """Copies each payload tensor to the compute device when it is asked for."""

    def fetch(self, key: int, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        # copy=True: when the offload device is the compute device (a copying test backend), the
        # result must still be a fresh tensor, never the payload itself.
        before_read(payload)  # a payload in a disk-tier cache file: checked before its first use
        return [t.to(device, copy=True) for t in payload]
