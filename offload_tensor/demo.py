"""The demo behind `offload-tensor demo` (and `offload-tensor bench`): a tiny Flux transformer,
plain and wrapped, eager and compiled with compile_repeated_blocks(fullgraph=True), compared side
by side. On CUDA the wrapped model streams its weights from pinned host RAM; on the CPU from the
disk tier (a temporary folder), so the demo moves weights on every machine.

Random init from a small config (seeded); nothing is downloaded. Needs diffusers
(`pip install offload-tensor[diffusers]`).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from offload_tensor.testing import tiny_flux, tiny_flux_inputs

# Why a tiny model steps slower wrapped than plain (on the CPU most of all): printed by demo and bench.
TINY_MODELS = "tiny models move tiny groups: their step time is dominated by per-op costs, not by the bus"
WARM_UP_STEPS = 2  # untimed: compile, and let the streaming engine learn the order


def _warm_up(model, inputs: dict) -> None:
    with torch.no_grad():
        for _ in range(WARM_UP_STEPS):
            model(**inputs)


def _side_by_side(plain, wrapped, inputs: dict, steps: int, device: torch.device):
    """Both models warmed up, then timed: (plain ms/step, its output, wrapped ms/step, its output)."""
    _warm_up(plain, inputs)
    _warm_up(wrapped, inputs)
    return (*_step_ms(plain, inputs, steps, device), *_step_ms(wrapped, inputs, steps, device))


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
    folder = tempfile.TemporaryDirectory(prefix="offload_tensor_demo_")
    tier = "pinned host RAM" if compute.type == "cuda" else f"disk ({folder.name})"
    print(
        f"offload_tensor demo: tiny Flux transformer on {compute}, weights streamed from {tier} "
        f"(torch {torch.__version__})"
    )

    plain = tiny_flux().to(compute)
    offload = {} if compute.type == "cuda" else {"offload": "disk", "disk_path": folder.name}
    wrapped = wrap_model_for_offload(tiny_flux(), device=compute, storage_dtype=storage_dtype, **offload)
    results: dict = {"device": str(compute)}
    rows = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            plain_health = compile_rules.check(plain, repeated_blocks=True, fullgraph=True, **inputs)
            wrapped_health = compile_rules.check(wrapped, repeated_blocks=True, fullgraph=True, **inputs)
            plain.compile_repeated_blocks(fullgraph=True)
            wrapped.compile_repeated_blocks(fullgraph=True)
        plain_ms, plain_out, wrapped_ms, wrapped_out = _side_by_side(plain, wrapped, inputs, steps, compute)
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
    timed = f"{steps} timed step" + ("s" if steps != 1 else "")
    print(f"(ms/step: the median of {timed}, after {WARM_UP_STEPS} untimed ones that compile and learn the order)")
    print(f"({TINY_MODELS})")
    print("(compiled: compile_repeated_blocks(fullgraph=True); counts are plain / wrapped; the plain model's own")
    print(" recompile is its single-stream blocks seeing a strided input, see docs/design.md, 'Counting graphs')")
    print()
    print(report)
    print()
    results["verdict"] = _verdict(rows, compute, tier)
    print(results["verdict"])
    return results


def _verdict(rows: list[dict], compute: torch.device, tier: str) -> str:
    """One line: what ran, whether the outputs equal the plain model's, the graph breaks."""
    if all(r["equal"] for r in rows):
        outputs = "outputs equal to the plain model's, eager and compiled"
    else:
        diffs = (f"{r['mode']} " + ("equal" if r["equal"] else f"max diff {r['max_abs_diff']:.1e}") for r in rows)
        outputs = "outputs against the plain model's: " + ", ".join(diffs)
    compiled = next(r for r in rows if r["mode"] == "compiled")
    return (
        f"verdict: tiny Flux on {compute}, weights streamed from {tier}: {outputs}; {compiled['graph_breaks']} graph "
        f"breaks with compile_repeated_blocks(fullgraph=True) (plain: {compiled['plain_graph_breaks']})"
    )


def bench(model: str = "flux-tiny", device: str | None = None, steps: int = 10) -> list[dict]:
    """`offload-tensor bench`: step time of a tiny model, plain and wrapped (streamed from pinned
    RAM on CUDA, from the disk tier on the CPU), eager and compiled, and the bandwidth the
    weights move at on this machine. For the benchmarks behind the README's figures see bench/."""
    import os

    from offload_tensor import offload_report, wrap_model_for_offload
    from offload_tensor.testing import tiny_wan, tiny_wan_inputs

    build, make_inputs = (tiny_flux, tiny_flux_inputs) if model == "flux-tiny" else (tiny_wan, tiny_wan_inputs)
    compute = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = make_inputs(device=compute)
    folder = tempfile.TemporaryDirectory(prefix="offload_tensor_bench_")
    offload = {} if compute.type == "cuda" else {"offload": "disk", "disk_path": folder.name}
    rows = []
    for compiled in (False, True):
        plain = build().to(compute)
        wrapped = wrap_model_for_offload(build(), device=compute, **offload)
        if compiled:
            plain.compile_repeated_blocks(fullgraph=True)
            wrapped.compile_repeated_blocks(fullgraph=True)
        plain_ms, _, wrapped_ms, _ = _side_by_side(plain, wrapped, inputs, steps, compute)
        moved = offload_report(wrapped).streamed_per_step
        rows.append(
            dict(mode="compiled" if compiled else "eager", plain_ms=plain_ms, wrapped_ms=wrapped_ms, moved=moved)
        )
    if compute.type == "cuda":
        from offload_tensor.planner import measured_bandwidth
        from offload_tensor.policy import Placement

        bandwidth, what = measured_bandwidth(Placement(compute)), "pinned host-to-device"
    else:
        from offload_tensor.engine.host_store import aligned_empty

        files = [os.path.join(folder.name, f) for f in os.listdir(folder.name)]
        buffer = memoryview(aligned_empty(sum(os.path.getsize(f) for f in files) + 4096).numpy())
        start, total = time.perf_counter(), 0
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, not the page cache
            total += os.preadv(fd, [buffer[total:]], 0)
            os.close(fd)
        bandwidth, what = total / (time.perf_counter() - start), "disk read (page cache dropped)"
    print(f"offload_tensor bench: {model} on {compute}, {steps} steps per configuration (torch {torch.__version__})")
    print(f"{'':10} {'plain ms/step':>14} {'wrapped ms/step':>16} {'moved per step':>15}")
    for row in rows:
        print(f"{row['mode']:10} {row['plain_ms']:>14.3f} {row['wrapped_ms']:>16.3f} {row['moved'] / 1024:>12.1f} KiB")
    print(f"bandwidth: {bandwidth / 1e9:.2f} GB/s, {what} ({TINY_MODELS})")
    return rows
