"""Training an adapter (peft LoRA) over offloaded weights, eager.

- A fetched weight never requires grad, so a linear saves no input for a weight gradient.
"""

from __future__ import annotations

import torch
from models import CASES, engine_for

from offload_tensor import wrap_model_for_offload

FLUX = CASES[0]


def test_a_fetched_weight_never_requires_grad():
    model = wrap_model_for_offload(FLUX.make(), engine=engine_for("sync"))
    weight = model.transformer_blocks[0].attn.to_q.weight
    activation = torch.randn(2, weight.shape[1], requires_grad=True)
    assert not weight.materialize(activation).requires_grad
    out = torch.nn.functional.linear(activation, weight)
    assert out.requires_grad and out.grad_fn is not None
