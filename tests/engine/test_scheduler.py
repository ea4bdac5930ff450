"""The streaming scheduler on the fake backend: order, window, ring, misses, races, arenas; and
wrapped models with the scheduler serving every fetch, eager and compiled."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASES, output

import compile_rules
from offload_tensor import offload_report, wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend, StreamRaceError
from offload_tensor.engine.host_store import build_arena
from offload_tensor.engine.scheduler import Scheduler
from offload_tensor.engine.streaming import StreamingEngine

CPU = torch.device("cpu")


def make_engine(groups=6, weights_per_group=3, prefetch=1, scheduler_cls=Scheduler, **backend):
    g = torch.Generator().manual_seed(0)
    payloads = [[(torch.randn(5 + w, 4, generator=g),) for w in range(weights_per_group)] for _ in range(groups)]
    expected = [[p[0].clone() for p in group] for group in payloads]
    engine = StreamingEngine(FakeBackend(**backend))
    arenas = [build_arena(group) for group in payloads]
    engine.prepare(arenas, prefetch, keys_of(groups, weights_per_group))
    arena_payloads = [arena.payloads() for arena in arenas]
    if scheduler_cls is not Scheduler:
        s = engine.scheduler
        engine.scheduler = scheduler_cls(s.group_of, s.prefetch, s.backend)
    return engine, arena_payloads, expected


def keys_of(groups, weights_per_group):
    """Weight keys as wrap assigns them: one int per weight, unique."""
    return [[1000 * g + w for w in range(weights_per_group)] for g in range(groups)]


def forward(engine, payloads, expected, order):
    for g in order:
        for w, (payload, value) in enumerate(zip(payloads[g], expected[g])):
            (out,) = engine.fetch(1000 * g + w, payload, CPU)
            assert torch.equal(out, value)
            assert out.data_ptr() != payload[0].data_ptr()  # handed over, not the arena


def test_learns_the_order_then_prefetches_it():
    engine, payloads, expected = make_engine(groups=6, prefetch=1)
    s = engine.scheduler
    forward(engine, payloads, expected, range(6))
    assert s.recording  # the cycle closes when its first group comes back
    forward(engine, payloads, expected, range(6))
    assert s.order == list(range(6)) and not s.recording and s.stats.misses == 0
    hits, copies = s.stats.hits, s.stats.copies
    forward(engine, payloads, expected, range(6))
    assert s.stats.hits - hits == 6 and s.stats.misses == 0  # every group was where the guess put it
    assert s.stats.copies - copies == 6  # one copy per group per forward, nothing more


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
def test_window_holds_the_next_groups(prefetch):
    engine, payloads, expected = make_engine(groups=7, prefetch=prefetch)
    forward(engine, payloads, expected, range(7))
    forward(engine, payloads, expected, range(7))
    s = engine.scheduler
    for g in range(7):
        forward(engine, payloads, expected, [g])
        held = {slot.group for slot in s.slots}
        assert {(g + i) % 7 for i in range(prefetch + 1)} <= held
        assert len(s.slots) == prefetch + 1


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("compute_s,copy_s_per_byte", [(1e-3, 1e-9), (1e-6, 1e-6)], ids=["compute-bound", "copy-bound"])
def test_ring_reuses_slots_only_after_their_reads(prefetch, compute_s, copy_s_per_byte):
    engine, payloads, expected = make_engine(
        groups=5, prefetch=prefetch, compute_s=compute_s, copy_s_per_byte=copy_s_per_byte
    )
    for _ in range(4):
        forward(engine, payloads, expected, range(5))  # the referee raises on any early reuse
    copies = [entry for entry in engine.backend.log if entry[0] == "copy"]
    assert {slot for _, _, slot, _, _ in copies} == set(range(prefetch + 1))


def test_a_group_visited_twice_per_forward_is_learnt():
    engine, payloads, expected = make_engine(groups=4, prefetch=1)
    order = [0, 1, 0, 2, 3]
    for _ in range(3):
        forward(engine, payloads, expected, order)
    s = engine.scheduler
    hits, misses = s.stats.hits, s.stats.misses
    forward(engine, payloads, expected, order)
    assert s.stats.misses == misses and s.stats.hits - hits == len(order)


@st.composite
def cycles_with_repeats(draw):
    """A forward's group sequence as compiled code may produce it: every group at least once,
    some several times, no group twice in a row, at least one group once; and where the
    stream starts (a first forward cut short by an exception starts learning mid-cycle)."""
    groups = draw(st.integers(2, 8))
    once = draw(st.integers(0, groups - 1))
    extra = draw(st.lists(st.sampled_from([g for g in range(groups) if g != once] or [once]), max_size=10))
    seq = draw(st.permutations(list(range(groups)) + [g for g in extra if g != once]))
    seq = [g for i, g in enumerate(seq) if i == 0 or g != seq[i - 1]]
    if len(seq) > 1 and seq[0] == seq[-1]:
        seq = seq[:-1]
    return groups, seq, draw(st.integers(0, len(seq) - 1))


@settings(max_examples=200, deadline=None)
@given(cycles_with_repeats(), st.integers(0, 3))
def test_order_with_repeats_is_learnt_from_any_start(cycle, prefetch):
    groups, seq, start = cycle
    engine, payloads, expected = make_engine(groups=groups, weights_per_group=1, prefetch=prefetch)
    forward(engine, payloads, expected, seq[start:])  # values are checked on every fetch
    s = engine.scheduler
    for _ in range(len(seq) + 2):  # each wrong guess marks a group: at most one per group, then right
        forward(engine, payloads, expected, seq)
    misses = s.stats.misses
    forward(engine, payloads, expected, seq)
    forward(engine, payloads, expected, seq)
    assert s.stats.misses == misses, (seq, s.order)


def test_out_of_order_request_is_a_miss_served_correctly_then_relearnt():
    engine, payloads, expected = make_engine(groups=6, prefetch=2)
    forward(engine, payloads, expected, range(6))
    forward(engine, payloads, expected, range(6))
    s = engine.scheduler
    new_order = [0, 1, 4, 3, 2, 5]
    forward(engine, payloads, expected, new_order)  # outputs checked inside
    assert s.stats.misses >= 1
    forward(engine, payloads, expected, new_order)
    forward(engine, payloads, expected, new_order)
    misses = s.stats.misses
    forward(engine, payloads, expected, new_order)
    assert s.stats.misses == misses
    start = s.order.index(new_order[0])  # the order is a cycle: compare up to rotation
    assert s.order[start:] + s.order[:start] == new_order


class _IgnoreRelease:
    def __init__(self, backend):
        self.backend = backend

    def copy(self, group, slot, wait_for):
        return self.backend.copy(group, slot, None)

    def __getattr__(self, name):
        return getattr(self.backend, name)


class _NoReleaseWait(Scheduler):
    """Planted race: copies into a slot without waiting for its readers."""

    def __post_init__(self):
        super().__post_init__()
        self.backend = _IgnoreRelease(self.backend)


class _NoReadyWait(Scheduler):
    """Planted race: reads a slot without waiting for its copy."""

    def fetch(self, key, whole_group=False):
        group = self.group_of[key]
        if group != self.current:
            self._move_to(group)
        slot = self._slot_holding(group)
        return self.backend.read(group, slot.index, key)


@pytest.mark.parametrize("planted", [_NoReleaseWait, _NoReadyWait])
def test_fake_backend_catches_a_planted_race(planted):
    # slow compute exposes early slot reuse; slow copies expose reads before the copy landed
    slow = (
        dict(compute_s=1e-3, copy_s_per_byte=1e-9)
        if planted is _NoReleaseWait
        else dict(compute_s=1e-9, copy_s_per_byte=1e-3)
    )
    engine, payloads, expected = make_engine(groups=5, prefetch=1, scheduler_cls=planted, **slow)
    with pytest.raises(StreamRaceError):
        for _ in range(3):
            forward(engine, payloads, expected, range(5))


def test_arenas_are_exact_size_one_per_group():
    model = CASES[0].make()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = StreamingEngine(FakeBackend())
    wrap_model_for_offload(model, engine=engine, granularity="block")
    assert weight_bytes <= engine.host_bytes <= 1.02 * weight_bytes
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(engine.arenas) < len(list(model.parameters())) and len(engine.arenas) >= blocks
    for p in model.parameters():  # every payload lives in its group's arena
        assert any(
            a.buffer.data_ptr() <= p._inner[0].data_ptr() < a.buffer.data_ptr() + a.nbytes for a in engine.arenas
        )
    assert offload_report(model).by_kind["plain"] == weight_bytes


MODELS = [CASES[0], CASES[1]]  # Flux, Wan


@pytest.mark.parametrize("case", MODELS, ids=[c.name for c in MODELS])
@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_wrapped_model_with_scheduler_equals_plain_over_20_forwards(case, granularity, prefetch):
    plain = case.make()
    engine = StreamingEngine(FakeBackend())
    model = wrap_model_for_offload(case.make(), engine=engine, granularity=granularity, prefetch=prefetch)
    with torch.no_grad():
        for step in range(20):
            assert torch.equal(output(model(**case.inputs(step))), output(plain(**case.inputs(step))))
    s = engine.scheduler
    assert s.stats.misses == 0 and s.stats.hits > 0
    per_forward = len(s.order)
    assert s.stats.copies <= 20 * per_forward  # one copy per group per forward at most


@pytest.mark.parametrize("mode", ["whole", "repeated_blocks"])
def test_compiled_fetches_consult_the_scheduler(mode):
    case = CASES[0]
    plain = compile_rules.check(case.make(), repeated_blocks=mode == "repeated_blocks", **case.inputs(0))
    engine = StreamingEngine(FakeBackend())
    model = wrap_model_for_offload(case.make(), engine=engine, prefetch=2)
    report = compile_rules.check(model, repeated_blocks=mode == "repeated_blocks", fullgraph=True, **case.inputs(0))
    assert report.graph_breaks == 0 and report.graphs <= plain.graphs
    torch.testing.assert_close(output(report.output), output(plain.output), atol=1e-5, rtol=0)
    s = engine.scheduler
    hits, misses = s.stats.hits, s.stats.misses
    compiled = torch.compile(model, fullgraph=True) if mode == "whole" else model
    with torch.no_grad():
        for step in range(3):
            compiled(**case.inputs(step))
    assert s.stats.misses == misses and s.stats.hits > hits  # prefetched in the learnt order


@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_groups_follow_blocks_or_modules(granularity):
    from offload_tensor.planner import group_weights, unique_weights

    model = CASES[0].make()
    weights = unique_weights(model)
    groups = [names for _, names, _ in group_weights(model, weights, granularity)]
    assert sorted(n for g in groups for n in g) == sorted(weights)  # each weight exactly once
    block = model.transformer_blocks[0]
    block_ids = {id(p) for p in block.parameters()}
    holding = [g for g in groups if any(id(weights[n]) in block_ids for n in g)]
    if granularity == "block":
        assert len(holding) == 1 and {id(weights[n]) for n in holding[0]} == block_ids
    else:
        assert len(holding) == sum(1 for m in block.modules() if any(p is not None for p in m._parameters.values()))


def test_transformers_no_split_modules_are_blocks():
    from offload_tensor.planner import group_weights, unique_weights

    bert = CASES[-1].make()
    weights = unique_weights(bert)
    groups = [names for _, names, _ in group_weights(bert, weights, "block")]
    layer_ids = {id(p) for p in bert.encoder.layer[0].parameters()}
    assert any({id(weights[n]) for n in g} == layer_ids for g in groups)


@pytest.mark.parametrize("change", ["load_state_dict", "fuse_lora"])
def test_writes_to_payloads_are_not_served_stale_from_slots(change):
    """A write-through (load_state_dict, LoRA fuse) must not leave the old weights in a slot."""
    case = CASES[0]
    engine = StreamingEngine(FakeBackend())
    model = wrap_model_for_offload(case.make(), engine=engine, prefetch=1)
    reference = case.make()
    with torch.no_grad():
        for step in range(3):  # learn the order, fill the slots
            model(**case.inputs(step))
        if change == "load_state_dict":
            for p in reference.parameters():
                p.add_(0.25)
            model.load_state_dict(reference.state_dict())
        else:
            from peft import LoraConfig

            config = LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False)
            for m in (model, reference):
                torch.manual_seed(3)
                m.add_adapter(config)
                m.fuse_lora()
        assert torch.equal(output(model(**case.inputs(5))), output(reference(**case.inputs(5))))


def test_one_streaming_engine_serves_one_model():
    engine = StreamingEngine(FakeBackend())
    wrap_model_for_offload(CASES[0].make(), engine=engine)
    second = CASES[0].make()
    params = list(second.parameters())
    with pytest.raises(ValueError, match="already serves a model"):
        wrap_model_for_offload(second, engine=engine)
    assert list(second.parameters()) == params
