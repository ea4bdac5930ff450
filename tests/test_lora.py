"""LoRA (peft adapters through diffusers' add_adapter / fuse_lora) on offloaded weights."""

import copy

import pytest
import torch
from models import CASES, ENGINE_NAMES, engine_for, output

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
    with pytest.raises(RefusedOpError, match="would re-quantize it"):
        model.fuse_lora()
    assert torch.equal(q.materialize(), before)


@pytest.mark.parametrize("engine", list(ENGINE_NAMES))
def test_lora_adapter_trains_on_top_of_offloaded_weights(engine):
    """Offloaded weights are frozen (requires_grad_(True) is refused); an adapter on top of them
    trains: its loss falls, gradients reach it, the base weights stay bit-unchanged."""
    model = wrap_model_for_offload(FLUX.make(), engine=engine_for(engine), prefetch=1)
    base = {n: p.materialize().clone() for n, p in model.named_parameters()}
    with pytest.raises(RefusedOpError, match="frozen.*adapter"):
        model.requires_grad_(True)
    with_adapter(model)
    adapter = [p for n, p in model.named_parameters() if "lora" in n]
    assert adapter and all(p.requires_grad and type(p) is torch.nn.Parameter for p in adapter)
    optimizer = torch.optim.AdamW(adapter, lr=1e-2)
    inputs = FLUX.inputs(0)
    target = torch.zeros_like(output(model(**inputs)))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(output(model(**inputs)), target)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if n in base:
            assert not p.requires_grad and p.grad is None and torch.equal(p.materialize(), base[n]), n
