"""The Flux-shaped model the benchmarks measure: FLUX.1-dev's block dimensions with fewer blocks,
bf16, random init (seeded), and FLUX.1-dev's input shapes."""

from __future__ import annotations

import torch


def build_model(args):
    """The Flux-shaped bf16 transformer (random init, seeded); `args.double`/`args.single` blocks."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
               pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():  # random init, cheap and seeded
        torch.nn.init.normal_(p, std=0.02)
    return model.eval(), cfg


def inputs(args, cfg, device):
    """FLUX.1-dev's 1024x1024 shapes: 4096 image tokens, 512 text tokens."""
    g = torch.Generator().manual_seed(1)
    img, txt = 4096, 512
    x = dict(
        hidden_states=torch.randn(1, img, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.randn(img, 3, generator=g),
        txt_ids=torch.randn(txt, 3, generator=g),
    )
    return {
        k: v.to(device=device, dtype=torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in x.items()
    } | {"return_dict": False}
