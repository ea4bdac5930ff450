"""A budget keeps part of the model resident where it computes and streams the rest; set_budget
plans again without wrapping again. On the CPU the disk tier makes the budget real (weights
within it stay in RAM, the rest stream from disk); a streaming engine on the fake backend stands
in for the CUDA path (resident groups are used in place, the others fetched through the engine).
Outputs equal the plain model; compiled with compile_repeated_blocks: 0 breaks, no recompile when
the budget changes once a resident and a streamed block of each kind have run."""

import pytest
import torch
from models import CASES, output
from torch._dynamo.utils import counters

import compile_rules
from offload_tensor import offload_report, set_budget, wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend
from offload_tensor.engine.streaming import StreamingEngine

FLUX, WAN = CASES[0], CASES[1]


def run(model, case=FLUX, seed=0):
    with torch.no_grad():
        return output(model(**case.inputs(seed)))


def wrapped(path, budget, tier, case=FLUX, **kwargs):
    if tier == "disk":
        return wrap_model_for_offload(case.make(), offload=path / "disk", budget=budget, **kwargs)
    return wrap_model_for_offload(case.make(), engine=StreamingEngine(FakeBackend()), budget=budget, **kwargs)


def check_budget_respected(model):
    state = model._offload_state
    plan = state.plan
    assert plan.resident_bytes + plan.slot_bytes + plan.placement.reserve <= plan.placement.budget
    resident = {n for g in plan.groups if g.resident for n in g.weights}
    for name, w in state.weights.items():
        assert (w._key is None) == (name in resident), name  # resident: used in place, no fetch
    report = offload_report(model)
    assert report.resident_bytes - sum(b.numel() * b.element_size() for b in model.buffers()) == plan.resident_bytes
    assert report.offloaded_bytes == plan.streamed_bytes


@pytest.mark.parametrize("tier", ["disk", "fake-cuda"])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_budget_keeps_what_fits_resident_and_outputs_equal_plain(tier, fraction, tmp_path):
    probe = wrapped(tmp_path / "probe", None, tier)  # all streamed: what the groups weigh
    plan = probe._offload_state.plan
    budget = plan.minimum_budget + int(fraction * (plan.weight_bytes - plan.minimum_budget))
    model = wrapped(tmp_path, budget, tier)
    check_budget_respected(model)
    resident = model._offload_state.plan.resident_bytes
    assert (resident == 0) == (fraction == 0.0) and (resident == plan.weight_bytes) == (fraction == 1.0)
    for seed in range(3):
        assert run(model, seed=seed).equal(run(FLUX.make(), seed=seed))
    engine = model._offload_state.engine
    if fraction < 1.0:
        assert engine.scheduler.stats.copies > 0


@pytest.mark.parametrize("tier", ["disk", "fake-cuda"])
def test_set_budget_moves_groups_and_never_recompiles_once_both_were_seen(tier, tmp_path):
    plain = compile_rules.check(FLUX.make(), repeated_blocks=True, **FLUX.inputs(0))
    probe = wrapped(tmp_path / "probe", None, tier)
    full = probe._offload_state.plan
    half = full.minimum_budget + (full.weight_bytes - full.minimum_budget) // 2
    model = wrapped(tmp_path, half, tier)
    report = compile_rules.check(model, repeated_blocks=True, fullgraph=True, **FLUX.inputs(0))
    assert report.graph_breaks == 0
    block_classes = {type(m).__name__ for m in model.modules() if type(m).__name__ in model._repeated_blocks}
    assert report.graphs <= plain.graphs + len(block_classes), f"plain: {plain}\nwrapped: {report}"
    model.compile_repeated_blocks(fullgraph=True)
    expected = {s: run(FLUX.make(), seed=s) for s in range(4)}
    budgets = [full.minimum_budget, full.weight_bytes * 2, half]
    with torch.no_grad():  # visit both kinds of every block class once
        for budget in budgets:
            set_budget(model, budget)
            torch.testing.assert_close(run(model), expected[0], atol=1e-5, rtol=0)
    counters.clear()
    torch._dynamo.config.error_on_recompile = True
    try:
        for seed, budget in enumerate(budgets * 2):
            plan = set_budget(model, budget)
            check_budget_respected(model)
            torch.testing.assert_close(run(model, seed=seed % 4), expected[seed % 4], atol=1e-5, rtol=0)
            if budget >= 2 * full.weight_bytes:
                assert plan.resident_bytes == plan.weight_bytes
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled again


def test_budget_on_a_loaded_checkpoint_and_wan(tmp_path):
    model = Wan = WAN.make()
    Wan.save_pretrained(tmp_path / "wan")
    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = type(model).from_config(model.config).eval()
    probe = wrap_model_for_offload(WAN.make(), offload=tmp_path / "probe").__dict__["_offload_state"].plan
    budget = probe.minimum_budget + probe.weight_bytes // 3
    loaded = wrap_model_for_offload(meta, checkpoint=tmp_path / "wan", offload=tmp_path / "disk", budget=budget)
    check_budget_respected(loaded)
    assert run(loaded, WAN).equal(run(WAN.make(), WAN))


BAD = [
    (dict(budget="12 gigs"), "not a size"),
    (dict(budget=-5), "negative"),
    (dict(budget="-5GiB"), "budget='-5GiB' is negative"),
    (dict(budget=10), r"below the minimum for FluxTransformer2DModel: .* \(2 copies of its largest group, .*: 2 slots"),
    (dict(max_memory={"cuda:1": "1GiB"}), "not the compute device"),
    (dict(max_memory="1GiB"), "must be a dict"),
    (dict(budget="1GiB", max_memory={"cpu": "1GiB"}), "not both"),
    (dict(reserve="1GiB"), "within a budget"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_budgets_are_refused_before_anything_changes(kwargs, message, tmp_path):
    model = FLUX.make()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=message):
        wrap_model_for_offload(model, offload=tmp_path / "disk", **kwargs)
    assert list(model.parameters()) == params and all(type(p) is torch.nn.Parameter for p in params)


def test_budget_without_a_tier_to_stream_from_is_refused():
    with pytest.raises(ValueError, match="offload='disk'"):
        wrap_model_for_offload(FLUX.make(), device="cpu", budget="1GiB")
    model = wrap_model_for_offload(FLUX.make())  # zero-copy on the CPU
    with pytest.raises(ValueError, match="needs a tier to stream from"):
        set_budget(model, "1GiB")


def test_set_budget_on_a_checkpoint_loaded_on_the_cpu_is_refused_and_changes_nothing(tmp_path):
    """Loaded from a checkpoint, the groups have RAM arenas as homes; computing on the CPU with
    offload='cpu' there is still no tier to stream from, as wrap_model_for_offload says."""
    from test_checkpoint import meta_like

    FLUX.make().save_pretrained(tmp_path / "ckpt")
    expected = run(FLUX.make())
    model = wrap_model_for_offload(meta_like(FLUX), checkpoint=tmp_path / "ckpt", device="cpu")
    params, plan = list(model.parameters()), model._offload_state.plan
    with pytest.raises(ValueError, match="needs a tier to stream from.*offload='disk'"):
        set_budget(model, "400KB")
    assert list(model.parameters()) == params and model._offload_state.plan is plan
    assert torch.equal(run(model), expected)


def test_ram_too_small_says_what_is_needed_and_offers_the_disk_tier(tmp_path):
    FLUX.make().save_pretrained(tmp_path / "ckpt")
    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = type(FLUX.make()).from_config(FLUX.make().config)
    with pytest.raises(ValueError, match=r"need .* of host RAM .* offload='disk'"):
        wrap_model_for_offload(meta, checkpoint=tmp_path / "ckpt", max_memory={"cpu": "100KiB"}, device="cpu")
