"""offload_report: where a wrapped model's bytes are, in the plan's own tier names."""

from dataclasses import replace

import torch
from models import CASES

from offload_tensor import offload_report, plan, wrap_model_for_offload
from offload_tensor.catalog import meta_model
from offload_tensor.planner import format_bytes, tier_of
from offload_tensor.policy import Placement, Tier

FLUX = CASES[0]


def test_plan_and_placement_name_the_tiers_alike_on_cuda():
    """Planned for CUDA (no GPU needed): resident groups are on the "gpu" tier in the placement,
    in tier_of, and in bytes_in."""
    assert Placement("cuda").resolved(for_plan=True).resident_tier is Tier.GPU
    model = meta_model("flux-tiny")
    probe = plan(model, device="cuda")
    p = plan(model, device="cuda", budget=(probe.minimum_budget + probe.weight_bytes) // 2)  # between: both tiers
    tiers = {tier_of(g, p.device) for g in p.groups}
    assert tiers == {Tier.GPU, Tier.RAM} and all(isinstance(t, Tier) for t in tiers)
    assert p.bytes_in("gpu") == p.resident_bytes > 0 and p.bytes_in("ram") == p.streamed_bytes > 0


def test_report_files_resident_bytes_under_the_plans_tier_on_cuda(tmp_path):
    """A model wrapped with part of it resident, its recorded device then set to CUDA, as a CUDA
    wrap records it (this machine may have no GPU): the report's tiers are the plan's."""
    model = FLUX.make()
    probe = plan(FLUX.make(), device="cpu", offload="disk")
    budget = probe.minimum_budget + probe.weight_bytes // 3
    wrap_model_for_offload(model, offload="disk", disk_path=tmp_path, budget=budget)
    state = model.__dict__["_offload_state"]
    cuda = torch.device("cuda", 0)
    state.plan = replace(state.plan, device=cuda, placement=replace(state.plan.placement, device=cuda))
    report = offload_report(model)
    expected = {t: state.plan.bytes_in(t) for t in Tier if state.plan.bytes_in(t)}
    assert set(expected) == {Tier.GPU, Tier.DISK}
    assert report.by_tier == expected
    disk, gpu = format_bytes(expected[Tier.DISK]), format_bytes(expected[Tier.GPU])
    assert f"weights by tier: disk {disk}, gpu {gpu}" in str(report)


def test_summary_says_what_streams_from_where(tmp_path):
    """The summary names what stays where the model computes and what streams from which tier,
    in words that do not read as a failure (it said "loaded partially: 0 B resident")."""
    everything = offload_report(wrap_model_for_offload(FLUX.make()))
    assert everything.summary.startswith("all ") and everything.summary.endswith("resident on cpu; nothing streams")
    streamed = offload_report(wrap_model_for_offload(FLUX.make(), offload="disk", disk_path=tmp_path / "all"))
    weights = sum(streamed.by_tier.values())
    assert streamed.summary == f"all {format_bytes(weights)} of weights stream from disk to cpu"
    probe = plan(FLUX.make(), device="cpu", offload="disk")
    budget = probe.minimum_budget + probe.weight_bytes // 3
    part = offload_report(wrap_model_for_offload(FLUX.make(), offload=tmp_path / "part", budget=budget))
    assert part.summary == (
        f"{format_bytes(part.resident_bytes)} resident on cpu, {format_bytes(part.offloaded_bytes)} stream from disk"
    )
