"""Build an offline Hugging Face cache with stand-ins for the tiny Hub repos that the TorchAo/Quanto
test classes load (there is no network here). Used by the quant-cpu suite only.

Each stand-in is the test file's own tiny config with weights from torch.manual_seed(0), saved with
save_pretrained, laid out as a cache snapshot (refs/main -> snapshots/<rev>/...), so that
`from_pretrained("hf-internal-testing/...")` resolves it under HF_HUB_OFFLINE=1. Values differ from
the real Hub checkpoints: tests comparing against hard-coded numbers fail in both runs.

usage: python make_local_hub.py <cache dir>
"""

import os
import sys

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

REV = "0" * 40

FLUX = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)  # tests/models/transformers/test_models_transformer_flux.py FluxTransformerTesterConfig.get_init_dict
SD35 = dict(
    sample_size=32, patch_size=1, in_channels=8, num_layers=4, attention_head_dim=8, num_attention_heads=4,
    caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=8,
    pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm",
)  # SD35TransformerTesterConfig.get_init_dict with in_channels=8 ("matches the tiny Hub checkpoint")

REPOS = {
    ("hf-internal-testing/tiny-flux-pipe", "transformer"): (FluxTransformer2DModel, FLUX),
    ("hf-internal-testing/tiny-flux-transformer", ""): (FluxTransformer2DModel, FLUX),
    ("hf-internal-testing/tiny-sd35-pipe", "transformer"): (SD3Transformer2DModel, SD35),
}


def main(cache):
    for (repo, sub), (cls, cfg) in REPOS.items():
        root = os.path.join(cache, "models--" + repo.replace("/", "--"))
        snap = os.path.join(root, "snapshots", REV, sub)
        os.makedirs(os.path.join(root, "refs"), exist_ok=True)
        with open(os.path.join(root, "refs", "main"), "w") as f:
            f.write(REV)
        torch.manual_seed(0)
        cls(**cfg).save_pretrained(snap)
        print("built", repo, sub or ".", "->", snap)


if __name__ == "__main__":
    main(sys.argv[1])
