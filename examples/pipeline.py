"""A whole diffusers pipeline under one budget: the denoiser keeps what fits resident, everything
else streams; the transformer compiled; the same image as without offloading.

    pip install torch==2.13.0 && pip install -e ".[diffusers]"   # from the repository root
    python examples/pipeline.py

The pipeline here is a tiny FluxPipeline built offline with random weights (nothing is
downloaded). With a real one, `FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)`
takes its place and the budget is your GPU's, e.g. budget="14GiB" on a 16 GB card. On a
CPU-only machine the budget is RAM, and the rest of the weights stream from the disk tier.
"""

import tempfile

import torch

from offload_tensor import offload_report, plan, unwrap_pipeline, wrap_pipeline_for_offload
from offload_tensor.testing import flux_call, tiny_flux_pipeline

on_gpu = torch.cuda.is_available()
offload = {} if on_gpu else {"offload": "disk", "disk_path": tempfile.mkdtemp(prefix="offload_tensor_pipeline_")}
budget = "600KiB"  # tiny weights; a real model: "14GiB"

# 1. The image without offloading, for comparison.
pipe = tiny_flux_pipeline()
with torch.no_grad():
    expected = pipe(**flux_call())[0]

# 2. Plan first (works on a model on the meta device too): what stays, what streams, per-step bytes.
print(plan(pipe, budget=budget, device="cuda" if on_gpu else "cpu", **offload).table())

# 3. Wrap the whole pipeline under that budget; compile the denoiser's repeated blocks.
wrap_pipeline_for_offload(pipe, budget=budget, **offload)
pipe.transformer.compile_repeated_blocks(fullgraph=True)
with torch.no_grad():
    image = pipe(**flux_call())[0]
print(offload_report(pipe))
print("max abs difference to the pipeline without offloading:", (image - expected).abs().max().item())

# 4. Plain weights back.
unwrap_pipeline(pipe)
