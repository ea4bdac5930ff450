"""The disk tier with payloads of several inner tensors (fp8 data and scale, torchao's int8 data
and scales): the fetch op returns a weight's inner tensors as one list, which must not alias each
other, so the disk backend must not hand them over as views of one read buffer."""


import pytest
import torch
from models import CASES, output
from torch import nn

from offload_tensor import wrap_model_for_offload
from offload_tensor.engine.disk import _BufferPool
from offload_tensor.engine.host_store import Region

FP8 = torch.float8_e4m3fn
FLUX = CASES[0]


def linears():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.GELU()), nn.Linear(64, 8)
    ).eval()


@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_fp8_on_the_disk_tier_equals_fp8_in_memory(granularity, tmp_path):
    expected_model = wrap_model_for_offload(linears(), storage_dtype=FP8, granularity=granularity)
    model = wrap_model_for_offload(
        linears(), offload="disk", disk_path=tmp_path, storage_dtype=FP8, granularity=granularity
    )
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(4, 32, generator=torch.Generator().manual_seed(step))
            assert torch.equal(model(x), expected_model(x))


def test_torchao_int8_on_the_disk_tier_equals_the_quantized_model(tmp_path):
    pytest.importorskip("torchao")
    from test_quantized import quantized

    model = quantized(FLUX, "torchao", "int8wo")
    with torch.no_grad():
        expected = [output(model(**FLUX.inputs(step))) for step in range(3)]
    wrap_model_for_offload(model, offload="disk", disk_path=tmp_path)
    assert any(p._kind.name == "torchao" for p in model.parameters())
    with torch.no_grad():
        for step in range(3):
            assert torch.equal(output(model(**FLUX.inputs(step))), expected[step])


def test_only_the_largest_inner_tensor_views_the_read_buffer_and_the_buffer_is_reused():
    from offload_tensor.engine.disk import _unaliased

    pool = _BufferPool(keep_bytes=4096)
    buffer = pool.take(4096)
    data = Region(0, torch.Size([16, 16]), (16, 1), torch.uint8)
    scale = Region(256, torch.Size([16]), (1,), torch.float32)
    tensors = _unaliased([data, scale], buffer)
    storage = buffer.untyped_storage().data_ptr()
    del buffer  # as in DiskBackend._load: only the handed-over tensors hold the buffer now
    assert tensors[0].untyped_storage().data_ptr() == storage  # the bulk is not copied
    assert tensors[1].untyped_storage().data_ptr() != storage  # the scale has storage of its own
    assert pool.take(4096).untyped_storage().data_ptr() != storage  # still held through the data view: not reused
    del tensors
    assert pool.take(4096).untyped_storage().data_ptr() == storage  # free once the weight is dropped: reused
