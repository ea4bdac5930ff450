"""offload_report: where a wrapped model's bytes are, in the plan's own tier names."""

from dataclasses import replace

import torch

from models import CASES
from offload_tensor import offload_report, plan, wrap_model_for_offload
from offload_tensor.catalog import meta_model
from offload_tensor.planner import tier_of
from offload_tensor.policy import Tier, placement

FLUX = CASES[0]


def test_plan_and_placement_name_the_tiers_alike_on_cuda():
    """Planned for CUDA (no GPU needed): resident groups are on the "gpu" tier in the placement,
    in tier_of, and in bytes_in."""
    assert placement("cuda", "cpu", None, check_device=False).resident_tier is Tier.GPU
    model = meta_model("flux-tiny")
    probe = plan(model, device="cuda")
    p = plan(model, device="cuda", budget=probe.minimum_budget + probe.weight_bytes // 3)
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
    assert "gpu" in report.summary and "device" not in report.summary
