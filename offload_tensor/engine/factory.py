"""Which engine serves a wrapped model by default."""

from __future__ import annotations

import torch

from offload_tensor.engine.sync import Engine, SynchronousEngine


def default_engine(device: torch.device, offload: str, streams: bool, pin_memory: bool) -> Engine:
    """The streaming engine where weights move (`streams`: some group is streamed, to CUDA or from
    the disk tier), with the backend for the compute device and the tier; the synchronous engine
    where nothing moves."""
    if not streams or (device.type == "cpu" and offload != "disk"):
        return SynchronousEngine()
    from offload_tensor.engine.streaming import StreamingEngine

    if offload == "disk":
        from offload_tensor.engine.disk import DiskBackend, DiskDeviceBackend

        backend = DiskDeviceBackend(device, pin_memory=pin_memory) if device.type != "cpu" else DiskBackend()
        return StreamingEngine(backend)
    from offload_tensor.engine.device import DeviceBackend

    return StreamingEngine(DeviceBackend(device, pin_memory=pin_memory))
