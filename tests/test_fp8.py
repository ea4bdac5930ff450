"""fp8 storage: half the bytes of bf16, error within what fp8 predicts, dtype unchanged, compiles clean.

The SQNR bounds follow from the formats. Rounding to a float format with m mantissa bits leaves a
relative error uniform in +-2^-(m+1), i.e. SQNR = 10*log10(3 * 2^(2m+2)) dB for values in the
normal range: 28.9 dB for e4m3 (m=3), 22.8 dB for e5m2 (m=2). Scaling per output channel keeps
each channel's largest value at the top of the range, so the weight SQNR sits near that figure;
one scale per tensor pushes small channels down the range (toward subnormals) and costs a little.
We assert 3 dB below the per-element figure for weights. Through a network the errors of
independent weights add up; on the tiny Flux the output stays within 6 dB of the weight figure.
"""

import pytest
import torch
from conftest import sqnr_db
from models import CASES, output
from torch import nn

import compile_rules
from offload_tensor import OffloadedTensor, offload_report, plan, wrap_model_for_offload

FORMAT_SQNR_DB = {torch.float8_e4m3fn: 28.9, torch.float8_e5m2: 22.8}
FLUX = CASES[0]


@pytest.mark.parametrize("storage_dtype", list(FORMAT_SQNR_DB))
@pytest.mark.parametrize("fp8_scale", ["channel", "tensor"])
def test_weight_error_within_format_bound(storage_dtype, fp8_scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Conv2d(4, 8, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    wrap_model_for_offload(model, storage_dtype=storage_dtype, fp8_scale=fp8_scale)
    for ref, p in zip(reference, model.parameters()):
        if ref.ndim >= 2:
            assert p.qdata.dtype == storage_dtype
            assert p.scale.numel() == (ref.shape[0] if fp8_scale == "channel" else 1)
            assert sqnr_db(ref, p.materialize()) >= FORMAT_SQNR_DB[storage_dtype] - 3
        else:  # biases keep the compute dtype, exactly
            assert torch.equal(p.materialize(), ref)


def test_payload_is_half_of_bf16_and_dtype_is_unchanged():
    model = FLUX.make().to(torch.bfloat16)
    bf16_bytes = offload_report(wrap_model_for_offload(model)).by_kind["plain"]
    model = FLUX.make().to(torch.bfloat16)
    matrix_bf16 = sum(p.numel() * 2 for p in model.parameters() if p.ndim >= 2)
    vector_bf16 = sum(p.numel() * 2 for p in model.parameters() if p.ndim < 2)
    scales = sum(p.shape[0] * 4 for p in model.parameters() if p.ndim >= 2)
    wrap_model_for_offload(model, storage_dtype=torch.float8_e4m3fn)
    report = offload_report(model)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert report.by_kind["fp8"] == matrix_bf16 // 2 + scales  # fp8 values are exactly half, plus fp32 scales
    assert report.by_kind["plain"] == vector_bf16
    assert report.by_kind["fp8"] + report.by_kind["plain"] > 0.5 * bf16_bytes  # tiny dims: scales show
    # At a real width the fp32 scales vanish: a 1024x1024 bf16 matrix stores in 0.502x its bytes.
    big = wrap_model_for_offload(
        nn.Linear(1024, 1024, bias=False).to(torch.bfloat16), storage_dtype=torch.float8_e4m3fn
    )
    assert offload_report(big).by_kind["fp8"] == 1024 * 1024 + 1024 * 4 <= 0.502 * 1024 * 1024 * 2


@pytest.mark.parametrize("storage_dtype", list(FORMAT_SQNR_DB))
def test_flux_output_error_within_bound_and_compiles_clean(storage_dtype):
    model = FLUX.make()
    with torch.no_grad():
        reference = output(model(**FLUX.inputs(0)))
    wrap_model_for_offload(model, storage_dtype=storage_dtype)
    with torch.no_grad():
        eager = output(model(**FLUX.inputs(0)))
    assert not torch.equal(eager, reference)
    assert sqnr_db(reference, eager) >= FORMAT_SQNR_DB[storage_dtype] - 3 - 6
    plain = compile_rules.check(FLUX.make(), repeated_blocks=True, **FLUX.inputs(0))
    report = compile_rules.check(model, repeated_blocks=True, fullgraph=True, **FLUX.inputs(0))
    assert report.graph_breaks == 0 and report.graphs <= plain.graphs, report
    torch.testing.assert_close(output(report.output), eager, atol=1e-5, rtol=1e-5)


def test_rewrapping_is_refused_and_changes_nothing():
    model = FLUX.make()
    wrap_model_for_offload(model, storage_dtype=torch.float8_e4m3fn)
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_model_for_offload(model, storage_dtype=torch.float8_e4m3fn)
    assert all(p is before[n] and isinstance(p, OffloadedTensor) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ["float8_e4m3fn", "torch.float8_e4m3fn", "float8_e5m2"])
def test_storage_dtype_by_name_is_the_dtype(name):
    """Configs carry dtypes as strings: a dtype's name means that dtype, in wrap and in plan."""
    dtype = getattr(torch, name.removeprefix("torch."))
    by_name = wrap_model_for_offload(FLUX.make(), storage_dtype=name)
    by_dtype = wrap_model_for_offload(FLUX.make(), storage_dtype=dtype)
    assert by_name.__dict__["_offload_state"].plan.storage.dtype is dtype
    with torch.no_grad():
        assert torch.equal(output(by_name(**FLUX.inputs(0))), output(by_dtype(**FLUX.inputs(0))))
    assert plan(FLUX.make(), storage_dtype=name).table() == plan(FLUX.make(), storage_dtype=dtype).table()
