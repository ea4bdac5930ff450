"""Faults and concurrency: an exception halfway through a block, a copy that fails, two threads on
one model, two models in one process. The streaming engine runs on the fake backend, whose referee
raises on any slot misuse a GPU would punish silently (see engine/fake.py)."""

import sys
import threading
import time
import warnings

import pytest
import torch
from models import CASES, engine_for, output

from offload_tensor import unwrap_model, wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend
from offload_tensor.engine.streaming import StreamingEngine

FLUX = CASES[0]


class Tripwire:
    armed = False
    trips = 0


@torch.library.custom_op("offload_tensor_test::tripwire", mutates_args=())
def _tripwire(x: torch.Tensor) -> torch.Tensor:
    """Raises at run time while armed; an opaque op, so compiled graphs keep it (no recompile)."""
    if Tripwire.armed:
        Tripwire.armed = False
        Tripwire.trips += 1
        raise RuntimeError("tripwire: planted failure halfway through a block")
    return x.clone()


@_tripwire.register_fake
def _(x):
    return torch.empty_like(x)


def plant_tripwire(model):
    """Before the feed-forward of the second block: the block's norm and attention weights are
    fetched by then, its feed-forward weights are not."""
    return model.transformer_blocks[1].ff.register_forward_pre_hook(
        lambda module, args: (torch.ops.offload_tensor_test.tripwire(args[0]),)
    )


@pytest.mark.parametrize("engine", ["sync", "streaming"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("fail_at", [0, 3], ids=["while-learning", "after-learning"])
def test_exception_mid_block_leaves_the_engine_usable(engine, compiled, fail_at):
    plain = FLUX.make()
    plant_tripwire(plain)
    model = wrap_model_for_offload(FLUX.make(), engine=engine_for(engine), prefetch=2)
    plant_tripwire(model)
    run = torch.compile(model, fullgraph=True) if compiled else model
    reference = torch.compile(plain, fullgraph=True) if compiled else plain
    misses = []
    with torch.no_grad():
        for step in range(8):
            Tripwire.armed = step == fail_at
            if step == fail_at:
                with pytest.raises(RuntimeError, match="tripwire"):
                    run(**FLUX.inputs(step))
                continue
            out, expected = output(run(**FLUX.inputs(step))), output(reference(**FLUX.inputs(step)))
            if compiled:
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
            else:
                assert torch.equal(out, expected)
            if engine == "streaming":
                misses.append(model._offload_state.engine.scheduler.stats.misses)
    assert Tripwire.trips >= 1
    if engine == "streaming":
        eng = model._offload_state.engine
        assert not eng._lock.locked()
        # The forwards right after the failure may miss while the order is learnt again; the
        # last three find every group where the learnt order says: prefetching is back.
        assert misses[-1] == misses[-4], misses
    Tripwire.trips = 0


class _FailingCopy:
    """A backend whose copy raises once, at the `fail_at`-th copy (an interrupt, a transfer error)."""

    def __init__(self, backend, fail_at):
        self.backend, self.fail_at, self.copies = backend, fail_at, 0

    def copy(self, group, slot, wait_for):
        self.copies += 1
        if self.copies == self.fail_at:
            raise RuntimeError("planted copy failure")
        return self.backend.copy(group, slot, wait_for)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.mark.parametrize("fail_at", [1, 5, 40])
def test_failed_copy_is_retried_by_the_next_fetch(fail_at):
    plain = FLUX.make()
    engine = StreamingEngine(_FailingCopy(FakeBackend(), fail_at))
    model = wrap_model_for_offload(FLUX.make(), engine=engine, prefetch=1)
    failures = 0
    with torch.no_grad():
        for step in range(5):
            try:
                out = output(model(**FLUX.inputs(step)))
            except RuntimeError as e:
                assert "planted copy failure" in str(e)
                failures += 1
                continue
            assert torch.equal(out, output(plain(**FLUX.inputs(step))))
    assert failures == 1


# -- threads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["zero-copy", "sync", "streaming"])
def test_two_threads_on_one_model_get_correct_results(engine):
    """The fetch path is stateless or serialized (streaming.py): interleaved forwards from two
    threads must each equal the plain model; a wrong weight would show as a mismatch."""
    plain = FLUX.make()
    steps = range(12)
    with torch.no_grad():
        expected = {step: output(plain(**FLUX.inputs(step))) for step in steps}
    model = wrap_model_for_offload(FLUX.make(), engine=engine_for(engine), prefetch=2)
    results, spans, errors = {}, {0: [], 1: []}, []
    start = threading.Barrier(2)

    def worker(parity):
        start.wait()
        try:
            with torch.no_grad():
                for step in steps:
                    if step % 2 == parity:
                        begin = time.perf_counter()
                        results[step] = output(model(**FLUX.inputs(step)))
                        spans[parity].append((begin, time.perf_counter()))
        except BaseException as e:
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: forwards interleave fetch by fetch
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threads = [threading.Thread(target=worker, args=(parity,)) for parity in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    mismatches = [step for step in steps if not torch.equal(results[step], expected[step])]
    assert mismatches == []
    overlapping = sum(a0 < b1 and b0 < a1 for a0, a1 in spans[0] for b0, b1 in spans[1])
    assert overlapping > 0  # the test is only meaningful if forwards ran concurrently
    said = [w for w in caught if "two threads are running forwards" in str(w.message)]
    assert len(said) == (engine == "streaming")  # said once, where it costs prefetching


def test_handing_a_streamed_model_between_threads_is_silent_and_keeps_prefetching():
    plain = FLUX.make()
    engine = StreamingEngine(FakeBackend())
    model = wrap_model_for_offload(FLUX.make(), engine=engine, prefetch=1)
    with torch.no_grad():
        model(**FLUX.inputs(0))
        model(**FLUX.inputs(1))  # order learnt
        misses, out = engine.scheduler.stats.misses, {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(2, 5):  # one whole forward per thread, one after another
                t = threading.Thread(target=lambda s=step: out.__setitem__(s, output(model(**FLUX.inputs(s)))))
                t.start()
                t.join()
    assert all(torch.equal(out[s], output(plain(**FLUX.inputs(s)))) for s in range(2, 5))
    assert engine.scheduler.stats.misses == misses


def test_two_models_in_one_process_do_not_share_state():
    torch.manual_seed(1)
    plain_a, plain_b = FLUX.make(), FLUX.make()
    with torch.no_grad():  # a different model b: same architecture, other weights
        for p in plain_b.parameters():
            p.mul_(-0.5)
    engine_a, engine_b = StreamingEngine(FakeBackend()), StreamingEngine(FakeBackend())
    a = wrap_model_for_offload(FLUX.make(), engine=engine_a, prefetch=1)
    b = wrap_model_for_offload(FLUX.make(), engine=engine_b, prefetch=2)
    b.load_state_dict(plain_b.state_dict())
    with torch.no_grad():
        for step in range(6):  # interleaved
            assert torch.equal(output(a(**FLUX.inputs(step))), output(plain_a(**FLUX.inputs(step))))
            assert torch.equal(output(b(**FLUX.inputs(step))), output(plain_b(**FLUX.inputs(step))))
        assert engine_a.scheduler.stats.misses == engine_b.scheduler.stats.misses == 0
        assert not set(engine_a.scheduler.group_of) & set(engine_b.scheduler.group_of)
        unwrap_model(a)
        hits = engine_b.scheduler.stats.hits
        assert torch.equal(output(b(**FLUX.inputs(9))), output(plain_b(**FLUX.inputs(9))))
        assert engine_b.scheduler.stats.hits > hits and engine_b.scheduler.stats.misses == 0
