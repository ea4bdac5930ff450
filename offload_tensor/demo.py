"""The demo behind `offload-tensor demo`: a tiny Flux transformer, plain and wrapped, eager and
compiled with compile_repeated_blocks(fullgraph=True), compared side by side.

Random init from a small config (seeded); nothing is downloaded. Needs diffusers
(`pip install offload-tensor[diffusers]`).
"""

from __future__ import annotations

import statistics
import time

import torch

from offload_tensor.testing import tiny_flux, tiny_flux_inputs


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
    print(" recompile is its single-stream blocks seeing a strided input, see docs/design.md, 'Counting graphs')")
    print()
    print(report)
    return results
