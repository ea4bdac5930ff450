"""Models users plan for, by name, and models from a config file, built on the `meta` device (no
memory, nothing downloaded).

The configs of the released models are written from their published model configs (the
`transformer/config.json` of each diffusers repository).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

FLUX_1_DEV = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}  # fmt: skip
WAN_2_1_14B = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}  # fmt: skip
# The published bf16 sizes of the transformers (the model cards round the parameter counts to "12B"
# and "14B"; the bf16 weights are 23.8 GB and 28.6 GB, i.e. 11.9B and 14.3B parameters): the
# plan's S_total is checked against them.
PUBLISHED_BF16_BYTES = {"flux-dev": 23.8e9, "wan2.1-14b": 28.6e9}


def _known(name: str) -> dict:
    from offload_tensor import testing

    return {
        "flux-dev": FLUX_1_DEV,
        "wan2.1-14b": WAN_2_1_14B,
        "flux-tiny": {"_class_name": "FluxTransformer2DModel", **testing.TINY_FLUX_CONFIG},
        "wan-tiny": {"_class_name": "WanTransformer3DModel", **testing.TINY_WAN_CONFIG},
    }[name]


KNOWN = ("flux-dev", "wan2.1-14b", "flux-tiny", "wan-tiny")


def config_of(model_or_path: str | os.PathLike) -> dict:
    """A known model's config, or a config file's (a diffusers `config.json`)."""
    if str(model_or_path) in KNOWN:
        return dict(_known(str(model_or_path)))
    path = Path(model_or_path)
    if not path.is_file():
        raise ValueError(f"{os.fspath(model_or_path)!r} is neither a known model ({', '.join(KNOWN)}) nor a config file.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); pass a diffusers model config.json.") from e
    if "_class_name" not in config:
        raise ValueError(f"{path} has no _class_name; pass the config.json of a diffusers model (e.g. transformer/config.json).")
    return config


def meta_model(model_or_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of a known name or config file, on the meta device, in `dtype`."""
    config = config_of(model_or_path)
    name = config.pop("_class_name")
    try:
        import diffusers
    except ImportError as e:
        raise ValueError(f"{name} is a diffusers model: pip install diffusers") from e
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{name} is not a diffusers model class this diffusers ({diffusers.__version__}) knows.")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)
    return model.to(dtype).eval()
