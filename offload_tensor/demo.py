"""The demo behind `offload-tensor demo`: a tiny Flux transformer, plain and wrapped, eager and
compiled with compile_repeated_blocks(fullgraph=True), compared side by side.

Random init from a small config (seeded); nothing is downloaded. Needs diffusers
(`pip install offload-tensor[diffusers]`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

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


def _step_ms(model, inputs: dict, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    times = []
    with torch.no_grad():
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = model(**inputs)[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def run(device: str | None = None, steps: int = 20, storage_dtype: torch.dtype | None = None) -> dict:
    """Run the comparison and print it; returns the figures (used by the tests)."""
    import compile_rules
    from offload_tensor import offload_report, wrap_model_for_offload

    compute = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = tiny_flux_inputs(device=compute)
    print(f"offload_tensor demo: tiny Flux transformer on {compute} (torch {torch.__version__})")

    plain = tiny_flux().to(compute)
    wrapped = wrap_model_for_offload(tiny_flux(), device=compute, storage_dtype=storage_dtype)
    results: dict = {"device": str(compute)}
    rows = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            plain_health = compile_rules.check(plain, repeated_blocks=True, fullgraph=True, **inputs)
            wrapped_health = compile_rules.check(wrapped, repeated_blocks=True, fullgraph=True, **inputs)
            plain.compile_repeated_blocks(fullgraph=True)
            wrapped.compile_repeated_blocks(fullgraph=True)
        plain_ms, plain_out = _step_ms(plain, inputs, steps, compute)
        wrapped_ms, wrapped_out = _step_ms(wrapped, inputs, steps, compute)
        diff = (plain_out - wrapped_out).abs().max().item()
        equal = torch.equal(plain_out, wrapped_out)
        row = dict(mode=mode, plain_ms=plain_ms, wrapped_ms=wrapped_ms, equal=equal, max_abs_diff=diff)
        if mode == "compiled":
            row |= dict(
                plain_graph_breaks=plain_health.graph_breaks, graph_breaks=wrapped_health.graph_breaks,
                plain_graphs=plain_health.graphs, graphs=wrapped_health.graphs,
                plain_recompiles=plain_health.recompiles, recompiles=wrapped_health.recompiles,
            )
        rows.append(row)
    results["rows"] = rows
    report = offload_report(wrapped)
    results["report"] = report

    print()
    print(f"{'':10} {'plain ms/step':>14} {'wrapped ms/step':>16} {'outputs':>22} {'graph breaks':>13} "
          f"{'graphs':>7} {'recompiles':>11}")
    for row in rows:
        same = "equal" if row["equal"] else f"max diff {row['max_abs_diff']:.1e}"
        breaks = graphs = recompiles = "-"
        if row["mode"] == "compiled":
            breaks = f"{row['plain_graph_breaks']} / {row['graph_breaks']}"
            graphs = f"{row['plain_graphs']} / {row['graphs']}"
            recompiles = f"{row['plain_recompiles']} / {row['recompiles']}"
        print(f"{row['mode']:10} {row['plain_ms']:>14.3f} {row['wrapped_ms']:>16.3f} {same:>22} {breaks:>13} "
              f"{graphs:>7} {recompiles:>11}")
    print("(compiled: compile_repeated_blocks(fullgraph=True); counts are plain / wrapped; the plain model's own")
    print(" recompile is its single-stream blocks seeing a strided input, see DESIGN.md section 8)")
    print()
    print(report)
    return results
