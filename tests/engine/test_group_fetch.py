"""One fetch per group: a streamed group moves and is read in one call of the library's ops, in
compiled code (an inductor pass keeps one fetch_group per group in a graph) and in eager code (the
engine's copy of the group in use), with outputs equal to fetching weight by weight."""

import pytest
import torch
from models import CASES, output

from compile_rules.check import FetchStats
from offload_tensor import wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend
from offload_tensor.engine.streaming import StreamingEngine
from offload_tensor.testing import RecordingEngine

FLUX = CASES[0]


def compiled(model, mode):
    if mode == "blocks":
        model.compile_repeated_blocks(fullgraph=True)
        return model
    return torch.compile(model, fullgraph=True)


def library_calls(model) -> tuple[int, int]:
    """In one forward, as torch.profiler counts them: calls of offload_tensor's ops (compiled
    code, and weights fetched alone), and the scheduler's fetches (its "offload_tensor.fetch"
    range: every copy served, eager code's included)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**FLUX.inputs(1))
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("offload_tensor::"))
    return ops, sum(e.count for e in events if e.key == "offload_tensor.fetch")


@pytest.mark.parametrize("mode", ["whole", "blocks"])
def test_compiled_fetches_each_group_once(mode):
    plain = compiled(FLUX.make(), mode)
    per_weight = compiled(wrap_model_for_offload(FLUX.make(), engine=RecordingEngine()), mode)
    grouped_model = wrap_model_for_offload(FLUX.make(), engine=StreamingEngine(FakeBackend()))
    grouped = compiled(grouped_model, mode)
    weights = sum(1 for _ in grouped_model.parameters())
    groups = len(grouped_model._offload_state.plan.groups)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for seed in range(3):
            expected = output(plain(**FLUX.inputs(seed)))
            assert torch.equal(output(per_weight(**FLUX.inputs(seed))), expected)
            assert torch.equal(output(grouped(**FLUX.inputs(seed))), expected)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    ops, fetches = library_calls(grouped)
    # whole model: every group in the graph; blocks: the blocks' groups in their graphs, the
    # other groups read by eager code (the engine's copy of the group in use)
    assert fetches == groups and 0 < ops <= groups and fetches <= 0.25 * weights, (ops, fetches, groups, weights)
    assert ops == groups if mode == "whole" else ops < groups
    assert library_calls(per_weight)[0] == weights  # what it was: one call per weight
    assert grouped_model._offload_state.engine.scheduler.stats.misses == 0


def test_eager_copies_each_group_once_per_visit_and_a_write_is_seen():
    plain = FLUX.make()
    model = wrap_model_for_offload(FLUX.make(), engine=StreamingEngine(FakeBackend()), granularity="leaf")
    groups = len(model._offload_state.plan.groups)
    with torch.no_grad():
        for seed in range(3):
            FetchStats.calls = 0
            assert torch.equal(output(model(**FLUX.inputs(seed))), output(plain(**FLUX.inputs(seed))))
            assert FetchStats.calls == groups
        model(**FLUX.inputs(0))  # the engine holds its copy of the last group
        for m in (model, plain):
            m.proj_out.weight.mul_(0.5)  # a write into that group: the copy is forgotten
        assert torch.equal(output(model(**FLUX.inputs(0))), output(plain(**FLUX.inputs(0))))
        held = model.proj_out.weight.materialize()
        model.proj_out.weight.mul_(2)
        assert torch.equal(held, plain.proj_out.weight)  # a value read before a write keeps its value
