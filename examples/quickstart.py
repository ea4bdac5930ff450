"""Quickstart: wrap a diffusers transformer for offloading, compile it, run it, read the report.

    pip install torch==2.13.0 && pip install -e ".[diffusers]"   # from the repository root
    python examples/quickstart.py

Uses a tiny Flux transformer with random weights (nothing is downloaded); with a real model,
`FluxTransformer2DModel.from_pretrained(...)` takes its place. On a machine with CUDA the weights
stay in CPU RAM and are fetched to the GPU as the forward reaches them; on a CPU-only machine the
compute device is the CPU and nothing needs moving.
"""

import torch

import compile_rules
from offload_tensor import offload_report, unwrap_model, wrap_model_for_offload
from offload_tensor.testing import tiny_flux, tiny_flux_inputs

device = "cuda" if torch.cuda.is_available() else "cpu"
inputs = tiny_flux_inputs(device=device)

# 1. A model, and its output without offloading, for comparison.
model = tiny_flux().to(device)
with torch.no_grad():
    expected = model(**inputs)[0]

# 2. Wrap: every parameter becomes an OffloadedTensor. The model keeps reporting its dtype and
#    the compute device; the weights live on the CPU (here in fp8, half of bf16's bytes).
model = wrap_model_for_offload(model.cpu(), device=device, storage_dtype=torch.float8_e4m3fn)
print(offload_report(model))
print("model.dtype:", model.dtype, "| a weight:", model.transformer_blocks[0].attn.to_q.weight)

# 3. Compile the repeated blocks with fullgraph=True: offloading adds no graph break.
print(compile_rules.check(model, repeated_blocks=True, fullgraph=True, **inputs))
model.compile_repeated_blocks(fullgraph=True)
with torch.no_grad():
    out = model(**inputs)[0]
snr = 10 * torch.log10(expected.pow(2).sum() / (out - expected).pow(2).sum())
print(f"fp8 weights: output SQNR {snr.item():.1f} dB against the unquantized model")

# 4. Plain parameters back (fp8 payloads come back dequantized).
unwrap_model(model)
print("unwrapped:", type(model.transformer_blocks[0].attn.to_q.weight).__name__)
