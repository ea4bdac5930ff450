"""Train a peft LoRA on a wrapped diffusers Flux transformer, with diffusers' training conventions.

    python examples/train_lora.py [--steps 6] [--storage-dtype none] [--out states.pt] [--plain]

The loop is the one of diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`, reduced to
the transformer: the base weights are frozen, a LoRA on the attention projections trains; each
step draws flow-matching noise and timesteps (`compute_density_for_timestep_sampling`, the
`FlowMatchEulerDiscreteScheduler`'s sigmas), mixes `(1 - sigma) * latents + sigma * noise`, and
takes the MSE between the prediction and the velocity target `noise - latents`, weighted by
`compute_loss_weighting_for_sd3`. The model is a tiny seeded Flux (nothing is downloaded), the
"dataset" a few seeded latents and text embeddings; with a real model, `from_pretrained(...)` and
a VAE/text encoder take their place.

The base is stored in fp8 (`--storage-dtype none`: its own dtype): the offloaded weights are a
frozen fp8 base, QLoRA-style; backward fetches each weight again, so none is kept from forward to
backward. `--out` saves the model's state dict before and after training (the suite checks that
only LoRA weights changed; `--plain` trains the model unwrapped, which with `--storage-dtype
none` ends on bit-equal LoRA weights).
"""

import argparse
import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig

from offload_tensor import wrap_model_for_offload
from offload_tensor.testing import tiny_flux, tiny_flux_inputs


def sigmas_of(scheduler, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """The scheduler's sigma at each timestep, shaped to broadcast over latents of `ndim` dims
    (train_dreambooth_lora_flux.py's `get_sigmas`)."""
    indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = scheduler.sigmas[indices].flatten()
    return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--storage-dtype", default="float8_e4m3fn", help='"none": the weights\' own dtype')
    parser.add_argument("--out", help="save the state dict before and after training here")
    parser.add_argument("--plain", action="store_true", help="train without wrapping, for comparison")
    args = parser.parse_args()

    torch.manual_seed(0)
    transformer = tiny_flux()
    storage_dtype = None if args.storage_dtype == "none" else args.storage_dtype
    if not args.plain:
        wrap_model_for_offload(transformer, storage_dtype=storage_dtype)
    transformer.requires_grad_(False)  # the base is frozen (offloaded weights are anyway)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    transformer.train()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    lora = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    # The "dataset": packed latents (batch, tokens, channels) and their prompt's embeddings.
    g = torch.Generator().manual_seed(1)
    batch = 2
    latents = torch.randn(batch, 16, transformer.config.in_channels, generator=g)
    text = tiny_flux_inputs(0)
    prompt_embeds = text["encoder_hidden_states"].expand(batch, -1, -1)
    pooled = text["pooled_projections"].expand(batch, -1)

    for step in range(args.steps):
        noise = torch.randn(latents.shape, generator=g)
        u = compute_density_for_timestep_sampling(
            weighting_scheme="none", batch_size=batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
        )
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = sigmas_of(scheduler, timesteps, latents.ndim)
        noisy = (1.0 - sigmas) * latents + sigmas * noise

        prediction = transformer(
            hidden_states=noisy,
            timestep=timesteps / 1000,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text["txt_ids"],
            img_ids=text["img_ids"],
            return_dict=False,
        )[0]
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - latents  # flow matching: the velocity
        loss = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(batch, -1), 1)
        loss = loss.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert math.isfinite(loss.item())
        print(f"step {step}: loss {loss.item():.6f}", flush=True)

    if args.out:
        after = {k: v.clone() for k, v in transformer.state_dict().items()}
        torch.save({"before": before, "after": after}, args.out)


if __name__ == "__main__":
    main()
