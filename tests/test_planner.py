"""The planner: its numbers equal sums computed here from the parameters, on tiny models and on
the real FLUX.1-dev and Wan2.1-14B transformer configs built on the meta device; the resident set
it chooses fits the budget and streams the fewest bytes."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASES

from offload_tensor import plan
from offload_tensor.catalog import PUBLISHED_BF16_BYTES, meta_model
from offload_tensor.planner import choose_resident

FLUX, WAN, SD3 = CASES[0], CASES[1], CASES[2]


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("case", [FLUX, WAN, SD3], ids=["flux", "wan", "sd3"])
def test_plan_numbers_equal_sums_over_the_parameters(case):
    model = case.make()
    p = plan(model, device="cuda", prefetch=2)
    blocks = [m for m in model.modules() if type(m).__name__ in (getattr(model, "_repeated_blocks", None)
              or getattr(model, "_no_split_modules", None) or ())]  # fmt: skip
    assert p.weight_bytes == nbytes(model.parameters())
    assert p.block_bytes == max((nbytes(b.parameters()) for b in blocks), default=0)
    assert p.leaf_bytes == max(nbytes(p for p in m._parameters.values() if p is not None) for m in model.modules())
    assert p.resident_bytes == 0 and p.streamed_bytes == p.weight_bytes  # no budget on a GPU: all streamed
    largest = max(g.nbytes for g in p.groups)
    # prefetch 2: three slots, and on a GPU the group in use, copied out of its slot
    assert p.slot_bytes == 3 * largest and p.fetched_bytes == largest and p.minimum_budget == 4 * largest
    assert p.pinned_bytes == p.weight_bytes  # every arena pinned once, at exact size
    assert "S_total" in p.table() and "min budget" in p.table()


@pytest.mark.parametrize("name", ["flux-dev", "wan2.1-14b"])
def test_real_model_configs_on_meta_match_the_published_sizes(name):
    model = meta_model(name, torch.bfloat16)
    p = plan(model, budget="12GiB", bandwidth="25GB")
    published = PUBLISHED_BF16_BYTES[name]
    assert abs(p.weight_bytes - published) / published < 0.01, (p.weight_bytes, published)
    assert p.device_bytes <= 12 * 2**30
    assert p.streamed_bytes == p.weight_bytes - p.resident_bytes
    assert "at 25.0 GB/s" in p.table()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=7), st.integers(0, 400), st.integers(1, 4))
def test_chosen_residents_fit_and_stream_the_fewest_bytes(sizes, budget, copies):
    """Against every subset: the chosen one fits beside what streaming takes (`copies` x the
    largest streamed group), and no subset that fits keeps more bytes resident."""

    def fits(chosen):
        streamed = [s for i, s in enumerate(sizes) if i not in chosen]
        return sum(sizes[i] for i in chosen) + copies * max(streamed, default=0) <= budget

    best = max((sum(sizes[i] for i in c) for k in range(len(sizes) + 1)
                for c in itertools.combinations(range(len(sizes)), k) if fits(set(c))), default=None)  # fmt: skip
    chosen = choose_resident(sizes, budget, copies)
    if best is None:
        return  # nothing fits: wrap refuses the budget (tested in test_budget)
    assert fits(chosen)
    # greedy by size per candidate largest-streamed group: optimal for equal-size blocks, and
    # within the largest group of the best otherwise
    assert sum(sizes[i] for i in chosen) >= best - max(sizes)


@pytest.mark.parametrize("budget", [None, "400KB"])
def test_plan_for_the_disk_tier_needs_no_folder(budget, tmp_path):
    """A plan writes no file: offload='disk' without disk_path plans the same as with one."""
    without = plan(FLUX.make(), device="cpu", offload="disk", budget=budget)
    with_folder = plan(FLUX.make(), device="cpu", offload="disk", disk_path=tmp_path, budget=budget)
    assert "weights live on disk" in without.table().splitlines()[0]
    assert without.table() == with_folder.table()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; pass a folder"):  # a folder given is still checked
        plan(FLUX.make(), device="cpu", offload="disk", disk_path=tmp_path / "file")


BAD_PLANS = {
    "bandwidth 0": ({"bandwidth": 0}, "bandwidth=0 is not a rate; use bytes per second > 0"),
    "bandwidth negative": ({"bandwidth": -1.5e9}, "bandwidth=-1500000000.0 is negative; use bytes per second > 0"),
    "bandwidth negative string": ({"bandwidth": "-3GB"}, "bandwidth='-3GB' is negative"),
    "budget negative string": ({"budget": "-5GiB"}, "budget='-5GiB' is negative"),
    "ram negative string": ({"ram": "-1GB"}, "ram='-1GB' is negative"),
    "prefetch past the groups": ({"prefetch": 10**6}, "prefetch=1000000 is more than FluxTransformer2DModel's 67"),
}


@pytest.mark.parametrize("kwargs, message", list(BAD_PLANS.values()), ids=list(BAD_PLANS))
def test_plan_refuses_what_wrap_refuses(kwargs, message):
    """plan() checks its settings as wrap_model_for_offload does (the command line calls it)."""
    with pytest.raises(ValueError, match=message):
        plan(meta_model("flux-dev"), **kwargs)


def test_plan_takes_a_bandwidth_as_a_number_or_a_size():
    model = meta_model("flux-dev")
    assert plan(model, bandwidth=25e9).table() == plan(model, bandwidth="25GB").table()
    assert plan(model, prefetch=66).minimum_budget == 68 * max(g.nbytes for g in plan(model).groups)  # + in use
