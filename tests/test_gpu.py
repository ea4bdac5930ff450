"""The CUDA path of the core: weights on the CPU, computed on the GPU. Skipped without CUDA; the
same code runs on the CPU in the other tests through a copying engine."""

import pytest
import torch
from models import CASES, output

import compile_rules
from offload_tensor import offload_report, wrap_model_for_offload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
FLUX = CASES[0]


def _cuda_inputs(seed):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in FLUX.inputs(seed).items()}


@pytest.mark.parametrize("storage_dtype", [None, torch.float8_e4m3fn])
def test_flux_offloaded_to_cpu_equals_resident_model(storage_dtype):
    resident = FLUX.make().cuda()
    model = wrap_model_for_offload(FLUX.make(), device="cuda", storage_dtype=storage_dtype)
    report = offload_report(model)
    assert report.offloaded_bytes > 0 and all(p.device.type == "cuda" for p in model.parameters())
    assert all(t.device.type == "cpu" for p in model.parameters() for t in p._inner)
    with torch.no_grad():
        expected = output(resident(**_cuda_inputs(0)))
        eager = output(model(**_cuda_inputs(0)))
    if storage_dtype is None:
        assert torch.equal(eager, expected)
    health = compile_rules.check(model, repeated_blocks=True, fullgraph=True, **_cuda_inputs(0))
    assert health.graph_breaks == 0 and health.fetches_per_forward > 0
    torch.testing.assert_close(output(health.output), eager, atol=1e-4, rtol=1e-4)
