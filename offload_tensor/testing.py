"""Fixtures for tests, examples, benchmarks and the demo: tiny seeded diffusers models and whole
pipelines built from small configs (nothing downloaded), their inputs, and an engine that
records what it fetches.

Not part of the library's working path: only the demo and the catalog of known models (its tiny
configs) import it.
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


# -- tiny pipelines, built offline: seeded tiny components and word-level tokenizers made here, in
# the shapes diffusers' own pipeline tests use
def word_tokenizer(max_length: int):
    """A fast tokenizer over a small word vocabulary: all the pipelines need of a tokenizer
    (padding, truncation, ids, decode)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "a", "cat", "dog", "on", "the", "moon", "photo", "of", "red", "blue", "sky"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_length
    )


def tiny_flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=0)).eval()  # fmt: skip
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0)).eval()  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0609,
                        scaling_factor=1.5035).eval()  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(16),
        transformer=tiny_flux(),
    )


def flux_call(seed: int = 0) -> dict:
    return dict(prompt="a photo of a cat on the moon", num_inference_steps=2, guidance_scale=3.5, height=32, width=32,
                max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(seed))  # fmt: skip


def tiny_wan_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()  # fmt: skip
    torch.manual_seed(0)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0)).eval()  # fmt: skip
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()  # fmt: skip
    return WanPipeline(
        tokenizer=word_tokenizer(16),
        text_encoder=umt5,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def wan_call(seed: int = 0) -> dict:
    return dict(prompt="a red cat", negative_prompt="blue sky", height=16, width=16, num_frames=9,
                num_inference_steps=2, guidance_scale=6.0, max_sequence_length=16, output_type="pt",
                generator=torch.Generator().manual_seed(seed))  # fmt: skip


class RecordingEngine(SynchronousEngine):
    """A synchronous engine that records the key of every fetch, in run-time order (for tests and
    the compile checker)."""

    def __init__(self) -> None:
        self.keys: list[int] = []

    def fetch(self, key: int, payload: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        self.keys.append(key)
        return super().fetch(key, payload, device)
