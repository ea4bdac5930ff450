"""Fixtures for tests, benchmarks and the demo: tiny seeded diffusers models built from small
configs (nothing downloaded), their inputs, and an engine that records what it fetches.

Not part of the library's working path: nothing in offload_tensor imports this module except the
demo.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from offload_tensor.engine import SynchronousEngine

TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)


TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def tiny_wan(seed: int = 0) -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def tiny_wan_inputs(seed: int = 0, device: str | torch.device = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
        timestep=torch.tensor([3]),
    )
    return {k: v.to(device) for k, v in inputs.items()} | {"return_dict": False}


def tiny_flux(seed: int = 0) -> nn.Module:
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as e:
        raise SystemExit("the demo needs diffusers: pip install 'offload-tensor[diffusers]'") from e
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()


def tiny_flux_inputs(seed: int = 0, device: str | torch.device = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.randn(16, 3, generator=g),
        txt_ids=torch.randn(8, 3, generator=g),
    )
    return {k: v.to(device) for k, v in inputs.items()} | {"return_dict": False}


class RecordingEngine(SynchronousEngine):
    """A synchronous engine that records the key of every fetch, in run-time order (for tests and
    the compile checker)."""

    def __init__(self) -> None:
        self.keys: list[int] = []

    def fetch(self, key: int, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        self.keys.append(key)
        return super().fetch(key, payload, device)
