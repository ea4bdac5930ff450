"""LoRA (peft adapters through diffusers' add_adapter / fuse_lora) on offloaded weights."""

import copy

import pytest
import torch

from models import CASES, output
from offload_tensor import OffloadedTensor, RefusedOpError, wrap_model_for_offload

peft = pytest.importorskip("peft")
FLUX = CASES[0]


def adapter():
    from peft import LoraConfig

    # init_lora_weights=False: both LoRA matrices random, so the adapter changes the output
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def with_adapter(model):
    torch.manual_seed(7)
    model.add_adapter(adapter())
    return model


def run(model):
    with torch.no_grad():
        return output(model(**FLUX.inputs(0)))


def test_adapter_added_before_wrapping():
    plain = with_adapter(FLUX.make())
    expected = run(plain)
    assert not torch.equal(expected, run(FLUX.make()))
    model = wrap_model_for_offload(copy.deepcopy(plain))
    assert all(isinstance(p, OffloadedTensor) for p in model.parameters())  # LoRA weights offloaded too
    assert torch.equal(run(model), expected)


def test_adapter_added_after_wrapping():
    expected = run(with_adapter(FLUX.make()))
    model = with_adapter(wrap_model_for_offload(FLUX.make()))
    assert torch.equal(run(model), expected)


@pytest.mark.parametrize("safe_fusing", [False, True])
def test_fuse_and_unfuse_write_through_plain_payloads(safe_fusing):
    plain = with_adapter(FLUX.make())
    plain.fuse_lora(safe_fusing=safe_fusing)
    expected = run(plain)
    model = with_adapter(wrap_model_for_offload(FLUX.make()))
    unfused = run(model)
    model.fuse_lora(safe_fusing=safe_fusing)
    assert torch.equal(run(model), expected)
    assert isinstance(model.transformer_blocks[0].attn.to_q.base_layer.weight, OffloadedTensor)
    model.unfuse_lora()
    torch.testing.assert_close(run(model), unfused, atol=1e-5, rtol=1e-5)  # W + d - d: rounding only


def test_fuse_on_quantized_payload_is_a_clear_error():
    model = wrap_model_for_offload(FLUX.make(), storage_dtype=torch.float8_e4m3fn)
    with_adapter(model)
    q = model.transformer_blocks[0].attn.to_q.base_layer.weight
    before = q.materialize().clone()
    with pytest.raises(RefusedOpError, match="would re-quantize it, which is not exact"):
        model.fuse_lora()
    assert torch.equal(q.materialize(), before)
