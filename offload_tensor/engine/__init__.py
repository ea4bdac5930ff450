"""Engines turn a payload on the offload device into tensors on the compute device.

Invariant: an engine is an acceleration, never a source of truth. `fetch(payload, device)` must
return exactly `payload` copied to `device`, whatever the engine has prefetched or cached, and the
returned tensors belong to the caller (see [Note: fetch hands over ownership] in ops.py).

This package holds the synchronous engine. The streaming engine (host arena, side-stream
prefetch, slot ring) plugs in behind the same `Engine` protocol.
"""

from offload_tensor.engine.sync import Engine, SynchronousEngine

__all__ = ["Engine", "SynchronousEngine"]
