"""The device backend (the one that serves CUDA) executed on the CPU under the real scheduler:
written against the device-generic API, its streams and events are the CPU's no-op stand-ins
here, so every line of it runs in the suite (the fake backend's referee, test_scheduler.py, is
what checks the ordering a GPU would punish)."""

import pytest
import torch
from models import CASES, output

from compile_rules.check import FetchStats
from offload_tensor import set_budget, unwrap_model, wrap_model_for_offload
from offload_tensor.engine.device import DeviceBackend
from offload_tensor.engine.streaming import StreamingEngine

FLUX = CASES[0]
CPU = torch.device("cpu")


def run(model, seed=0):
    with torch.no_grad():
        return output(model(**FLUX.inputs(seed)))


@pytest.mark.parametrize(
    "granularity,prefetch,compiled",
    [("block", 0, False), ("block", 2, False), ("leaf", 2, False), ("block", 1, True)],
    ids=["block-0", "block-2", "leaf-2", "block-1-compiled"],
)
def test_device_backend_on_the_cpu_equals_the_plain_model(granularity, prefetch, compiled):
    plain = FLUX.make()
    engine = StreamingEngine(DeviceBackend(CPU))
    model = wrap_model_for_offload(FLUX.make(), engine=engine, granularity=granularity, prefetch=prefetch)
    if compiled:
        plain.compile_repeated_blocks(fullgraph=True)
        model.compile_repeated_blocks(fullgraph=True)
    groups = len(model._offload_state.plan.groups)
    for step in range(4):
        FetchStats.calls = 0
        assert torch.equal(run(model, step), run(plain, step)), step
        assert FetchStats.calls == groups  # one copy per group per forward
    assert engine.scheduler.stats.misses == 0 and engine.pinned_bytes == 0  # nothing pinned on the CPU
    model.load_state_dict({k: v * 0.5 for k, v in plain.state_dict().items()})  # a write: slots forgotten
    plain.load_state_dict({k: v * 0.5 for k, v in plain.state_dict().items()})
    assert torch.equal(run(model, 5), run(plain, 5))
    unwrap_model(model)
    assert torch.equal(run(model, 6), run(plain, 6))


def test_device_backend_serves_a_new_budget():
    """set_budget re-prepares the backend (its slots, and on CUDA its pinned set) for the new plan."""
    plain = FLUX.make()
    model = wrap_model_for_offload(FLUX.make(), engine=StreamingEngine(DeviceBackend(CPU)), granularity="leaf")
    full = model._offload_state.plan
    for budget in (full.minimum_budget + full.weight_bytes // 2, full.minimum_budget):
        set_budget(model, budget)
        assert torch.equal(run(model), run(plain))


def test_device_backend_serves_weights_read_outside_a_forward():
    """A weight read outside a forward (a visit of its group of its own) equals the plain weight."""
    plain = FLUX.make()
    model = wrap_model_for_offload(FLUX.make(), engine=StreamingEngine(DeviceBackend(CPU)), granularity="block")
    names = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(names[name] * 1, p * 1), name
