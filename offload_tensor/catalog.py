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
        raise ValueError(
            f"{os.fspath(model_or_path)!r} is neither a known model ({', '.join(KNOWN)}) nor a config file."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); pass a diffusers model config.json.") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a config; pass a model's config.json.")
    components = [k for k, v in config.items() if _is_library_class_pair(v)]
    if components:  # plan() takes a pipeline, but the command builds one model from one config
        pipeline = config.get("_class_name", "components " + ", ".join(components))
        raise ValueError(
            f"{path} is the model_index.json of a pipeline ({pipeline}), not a model's config; pass one component's "
            f"config.json, e.g. {_component_config(path.parent, components)}."
        )
    if "_class_name" not in config:
        raise ValueError(
            f"{path} has no _class_name; pass the config.json of a diffusers model (e.g. transformer/config.json)."
        )
    return config


def _is_library_class_pair(value) -> bool:
    """A model_index.json entry: [library, class] (both None for an absent component)."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def _component_config(folder: Path, components: list[str]) -> Path:
    """The config.json of the pipeline's denoiser (where its weights are), else of its first component."""
    name = next((c for c in ("transformer", "unet") if c in components), components[0])
    return folder / name / "config.json"


def meta_model(model_or_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of a known name or config file, on the meta device, in `dtype`."""
    config = config_of(model_or_path)
    name = config.pop("_class_name")
    try:
        import diffusers
    except ImportError as e:
        raise ValueError(f"{name} is a diffusers model: pip install diffusers") from e
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline):
        raise ValueError(
            f"{name} is a pipeline, not a model; pass one of its models' config.json (e.g. transformer/config.json)."
        )
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(
            f"{name} is a scheduler: it has no weights; pass a model's config.json (e.g. transformer/config.json)."
        )
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{name} is not a diffusers model class this diffusers ({diffusers.__version__}) knows.")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)
    return model.to(dtype).eval()
