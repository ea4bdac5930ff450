"""The streaming engine on a real GPU (marked `gpu`; skipped without CUDA). The same scheduler
runs in test_scheduler.py on the fake backend."""

import pytest
import torch
from models import CASES, output

from offload_tensor import unwrap_model, wrap_model_for_offload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FLUX = CASES[0]


def cuda_inputs(seed):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in FLUX.inputs(seed).items()}


def streamed(granularity="block", prefetch=1):
    return wrap_model_for_offload(FLUX.make(), device="cuda", granularity=granularity, prefetch=prefetch)


@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_equals_resident_model(granularity, prefetch, compiled):
    resident = FLUX.make().cuda()
    model = streamed(granularity, prefetch)
    if compiled:
        resident.compile_repeated_blocks(fullgraph=True)
        model.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        for step in range(5):
            expected, out = output(resident(**cuda_inputs(step))), output(model(**cuda_inputs(step)))
            if compiled:
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(out, expected)
    assert model._offload_state.engine.scheduler.stats.misses == 0


def slow_compute(model, cycles=200_000):
    """Put a spin kernel on the compute stream before every block: compute falls far behind the
    copies, so a slot reused before its reads finished would be overwritten while being read."""
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(cycles))


def test_stress_200_forwards_no_mismatch():
    resident = FLUX.make().cuda()
    model = streamed(prefetch=2)
    slow_compute(model)
    with torch.no_grad():
        expected = [output(resident(**cuda_inputs(step))) for step in range(8)]
        mismatches = sum(
            not torch.equal(output(model(**cuda_inputs(step % 8))), expected[step % 8]) for step in range(200)
        )
    assert mismatches == 0
    assert model._offload_state.engine.scheduler.stats.misses == 0


def test_allocated_bytes_identical_after_forward_2_and_100():
    model = streamed(prefetch=2)
    inputs = cuda_inputs(0)
    with torch.no_grad():
        for step in range(100):
            model(**inputs)
            if step == 1:
                torch.cuda.synchronize()
                after_2 = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == after_2


def test_20_wrap_unwrap_cycles_give_back_pinned_and_device_memory():
    import gc

    import psutil

    model = FLUX.make()
    inputs = cuda_inputs(0)
    with torch.no_grad():
        expected = output(model.cuda()(**inputs))
    model.cpu()

    def cycle():
        wrap_model_for_offload(model, device="cuda", prefetch=1)
        backend = model._offload_state.engine.backend
        assert backend.pinned_bytes > 0
        with torch.no_grad():
            assert torch.equal(output(model(**inputs)), expected)
        unwrap_model(model)
        assert backend.pinned_bytes == 0

    cycle()
    gc.collect()
    device_base, host_base = torch.cuda.memory_allocated(), psutil.Process().memory_info().rss
    for _ in range(19):
        cycle()
    gc.collect()
    assert torch.cuda.memory_allocated() == device_base
    assert psutil.Process().memory_info().rss - host_base <= 64 << 20


def test_two_threads_with_their_own_streams_get_correct_results():
    """Each thread computes on its own stream: a slot is reused only after the reads of both."""
    import threading

    resident = FLUX.make().cuda()
    model = streamed(prefetch=2)
    slow_compute(model, cycles=50_000)
    with torch.no_grad():
        expected = {step: output(resident(**cuda_inputs(step))) for step in range(16)}
    results, errors = {}, []

    def worker(parity):
        try:
            with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream()):
                for step in range(parity, 16, 2):
                    results[step] = output(model(**cuda_inputs(step)))
                torch.cuda.current_stream().synchronize()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(parity,)) for parity in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [step for step in range(16) if not torch.equal(results[step], expected[step])] == []


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_peak_vram_and_pinned_bytes_within_bounds(prefetch):
    weights = FLUX.make()
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.parameters())
    largest_weight = max(p.numel() * p.element_size() for p in weights.parameters())
    resident = weights.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        resident(**cuda_inputs(0))
    activations = torch.cuda.max_memory_allocated() - base
    del resident, weights
    torch.cuda.empty_cache()

    model = streamed(prefetch=prefetch)
    engine = model._offload_state.engine
    largest_group = max(a.nbytes for a in engine.arenas)
    assert engine.backend.pinned_bytes <= 1.02 * weight_bytes and engine.backend.pinned_bytes >= weight_bytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        for step in range(3):
            model(**cuda_inputs(step))
    peak = torch.cuda.max_memory_allocated() - base
    # Weights on the device are the slots, allocated at wrap time (inside `base`): exactly
    # (prefetch + 1) x the largest group. Beyond them a forward holds its activations and the
    # weight copies handed to the op running now (a weight and its bias; allocator rounding).
    assert sum(b.numel() for b in engine.backend.slot_buffers) == (prefetch + 1) * largest_group
    assert peak <= activations + 2 * largest_weight + 8192, (peak, activations, largest_weight)
    assert torch.cuda.memory_allocated() - base <= 1024  # nothing held after the forward


def test_cuda_graphs_work_or_refuse_clearly():
    model = streamed(prefetch=1)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    resident = FLUX.make().cuda()
    with torch.no_grad():
        try:
            for step in range(4):
                out = output(compiled(**cuda_inputs(step)))
                torch.testing.assert_close(out, output(resident(**cuda_inputs(step))), atol=1e-5, rtol=1e-5)
        except RuntimeError as e:
            assert "CUDA graph" in str(e)
