"""The Flux-shaped model the benchmarks measure: FLUX.1-dev's block dimensions (or, with
`args.dims == "tiny"`, the same architecture a few hundred times narrower, for flows checked on
the CPU), `args.double`/`args.single` blocks, bf16, random init (seeded), and FLUX.1-dev's input
shapes (`args.image_tokens`/`args.text_tokens` where given)."""

from __future__ import annotations

import re

import torch

DIMS = {
    "flux-dev": dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                     joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
    "tiny": dict(patch_size=1, in_channels=16, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}  # fmt: skip


def dims(name: str) -> dict:
    """`flux-dev`, `tiny`, or `flux-<n>-heads`: FLUX.1-dev's dimensions with n attention heads."""
    if name in DIMS:
        return DIMS[name]
    narrowed = re.fullmatch(r"flux-(\d+)-heads", name)
    if narrowed is None:
        raise ValueError(f"dims={name!r}: use one of {sorted(DIMS)} or 'flux-<n>-heads'")
    return dict(DIMS["flux-dev"], num_attention_heads=int(narrowed.group(1)))


def build_model(args, device: str | torch.device = "cpu"):
    """The Flux-shaped bf16 transformer (random init, seeded), its weights made on `device`: on a
    GPU, 23.8 GB of FLUX.1-dev-sized weights take a second instead of minutes on the CPU. The
    same seed gives the same weights in every process on the same kind of device."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(dims(getattr(args, "dims", "flux-dev")), num_layers=args.double, num_single_layers=args.single)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # random init, cheap and seeded
            torch.nn.init.normal_(p, std=0.02)
    return model.eval(), cfg


def inputs(args, cfg, device):
    """FLUX.1-dev's 1024x1024 shapes: 4096 image tokens, 512 text tokens (unless `args` says)."""
    g = torch.Generator().manual_seed(1)
    img, txt = getattr(args, "image_tokens", 4096), getattr(args, "text_tokens", 512)
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
