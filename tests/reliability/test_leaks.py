"""Leaks: 100 forwards hold no more than 2 did; 20 wrap/unwrap cycles give back what they took; a
model dropped without unwrap_model frees its engine and host arenas.

Figures are printed (`pytest -s`) for RELIABILITY.md; the bounds are asserted."""

import gc
import weakref

import psutil
import pytest
import torch
from models import CASES, engine_for, output

from offload_tensor import offload_report, unwrap_model, wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend
from offload_tensor.engine.streaming import StreamingEngine

FLUX = CASES[0]
RSS_SLACK = 8 << 20  # bytes: allocator and interpreter noise; a leaked Flux weight set is ~1.7 MB per forward


def live_tensors() -> dict[int, weakref.ref]:
    gc.collect()
    return {id(o): weakref.ref(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}


def new_tensors(baseline: dict[int, weakref.ref], model=None) -> int:
    """Tensors alive now that were not alive at `baseline` (objects of earlier tests that happen
    to be freed meanwhile do not offset a leak), not counting `model`'s current parameters and
    buffers (unwrap_model gives new ones), nor the streaming engine's copy of the group in use
    (one, replaced at each visit: see [Note: one fetch per group] in ops.py)."""
    now = live_tensors()
    own = set() if model is None else {id(t) for t in (*model.parameters(), *model.buffers())}
    memo = getattr(getattr(model, "_offload_state", None), "engine", None)
    if getattr(memo, "_memo", None) is not None:
        own.add(id(memo._memo[1]))
    return sum(
        1 for key, ref in now.items() if key not in own and (key not in baseline or baseline[key]() is not ref())
    )


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine,compiled",
    [("zero-copy", False), ("sync", False), ("streaming", False), ("sync", True), ("streaming", True)],
    ids=["eager-zero-copy", "eager-sync", "eager-streaming", "compiled-sync", "compiled-streaming"],
)
def test_100_forwards_hold_nothing_more_than_2(engine, compiled):
    model = wrap_model_for_offload(FLUX.make(), engine=engine_for(engine), prefetch=2)
    run = torch.compile(model, fullgraph=True) if compiled else model
    backend = getattr(model._offload_state.engine, "backend", None)
    inputs = FLUX.inputs(0)

    def forwards(n):
        with torch.no_grad():
            for _ in range(n):
                run(**inputs)
                if backend is not None:
                    backend.log.clear()  # the fake backend's event log is a test instrument, not engine state

    forwards(2)
    tensors, resident, report = live_tensors(), rss(), offload_report(model)
    forwards(98)
    grown_tensors, grown_rss = new_tensors(tensors, model), rss() - resident
    print(
        f"\nmeasured leak[{engine}, {'compiled' if compiled else 'eager'}]: tensors {grown_tensors:+d}, "
        f"RSS {grown_rss / 2**20:+.2f} MiB"
    )
    assert grown_tensors == 0
    assert offload_report(model) == report
    assert grown_rss <= RSS_SLACK


@pytest.mark.slow
def test_20_wrap_unwrap_cycles_give_back_host_memory():
    model = FLUX.make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = FLUX.inputs(0)
    with torch.no_grad():
        expected = output(model(**inputs))
    engines = []

    def cycle():
        engine = StreamingEngine(FakeBackend())
        engines.append(weakref.ref(engine))
        wrap_model_for_offload(model, engine=engine, prefetch=1)
        with torch.no_grad():
            assert torch.equal(output(model(**inputs)), expected)
        unwrap_model(model)

    cycle()
    tensors, resident = live_tensors(), rss()
    for _ in range(19):
        cycle()
    grown_tensors, grown_rss = new_tensors(tensors, model), rss() - resident
    print(f"\nmeasured wrap/unwrap x20: tensors {grown_tensors:+d}, RSS {grown_rss / 2**20:+.2f} MiB")
    assert grown_tensors == 0 and grown_rss <= RSS_SLACK
    assert all(ref() is None for ref in engines)  # every engine, with its host arenas, is gone
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    for p in model.parameters():  # unwrapped weights own their memory (not views of a dead arena)
        assert type(p) is torch.nn.Parameter and p.untyped_storage().nbytes() == p.nbytes


def test_model_dropped_without_unwrap_frees_its_engine():
    engine = StreamingEngine(FakeBackend())
    model = wrap_model_for_offload(FLUX.make(), engine=engine)
    with torch.no_grad():
        model(**FLUX.inputs(0))
    arena = weakref.ref(engine.arenas[0].buffer)
    engine = weakref.ref(engine)
    del model
    gc.collect()
    assert engine() is None and arena() is None
