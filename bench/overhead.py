"""Wrapped / plain step-time ratio on the CPU, eager and compiled, MLP stack and tiny Flux.

Every configuration is built once; each round times plain, wrapped, wrapped, plain (ABBA), so
drift in machine speed hits both sides of a ratio alike; the reported ratio is the median over
rounds of the per-round ratio. Weights take the zero-copy path (offload device == compute device),
so the ratio is the cost of the wrapper itself: dispatch, plus flattening the subclass at the
compiled graph's boundary; except `flux-tiny-streamed`, whose every group the streaming engine
serves (fake backend: real copies, a virtual clock), so its overhead is the host cost of fetching.

`compiled-blocks` (flux models): `compile_repeated_blocks(fullgraph=True)` on both sides.

    python bench/overhead.py [--rounds 15] [--threads N] [--only MODEL ...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from offload_tensor import wrap_model_for_offload

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/overhead.py` finds `bench`
from bench.harness import cpu_name


def mlp(width: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(8)]).eval()
    return model, {"input": torch.randn(8, width)}


def flux() -> tuple[nn.Module, dict]:
    from offload_tensor.testing import tiny_flux, tiny_flux_inputs  # the demo's (and the tests') tiny Flux

    return tiny_flux(), tiny_flux_inputs()


# mlp-8x16 computes almost nothing: its step-time difference is the wrapper's fixed cost per step.
# flux-tiny-streamed: every group streamed by the streaming engine (on the fake backend, whose
# clock is virtual: no sleep), so its difference is the host cost of fetching, per weight or per group.
MODELS = {
    "mlp-8x1024-b8": lambda: mlp(1024),
    "flux-tiny": flux,
    "mlp-8x16-b8": lambda: mlp(16),
    "flux-tiny-streamed": flux,
}


def modes(name: str) -> tuple[str, ...]:
    return ("eager", "compiled", "compiled-blocks") if name.startswith("flux") else ("eager", "compiled")


def compiled(model: nn.Module, mode: str):
    if mode == "compiled":
        return torch.compile(model, fullgraph=True)
    if mode == "compiled-blocks":
        model.compile_repeated_blocks(fullgraph=True)
    return model


def wrap_options(name: str) -> dict:
    if name.endswith("-streamed"):
        from offload_tensor.engine.fake import FakeBackend
        from offload_tensor.engine.streaming import StreamingEngine

        return {"engine": StreamingEngine(FakeBackend())}
    return {}


def step_time(fn, inputs: dict, steps: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(steps):
            fn(**inputs)
        return (time.perf_counter() - start) / steps


def calibrate(fn, inputs: dict, target_s: float = 0.25) -> int:
    per = step_time(fn, inputs, 3)
    return max(3, int(target_s / per))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS), help="measure only these")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.only:
        build = MODELS[name]
        for mode in modes(name):
            torch._dynamo.reset()
            plain, inputs = build()
            wrapped, _ = build()
            wrap_model_for_offload(wrapped, device="cpu", **wrap_options(name))
            plain, wrapped = compiled(plain, mode), compiled(wrapped, mode)
            for fn in (plain, wrapped):  # warm up (and compile)
                step_time(fn, inputs, 3)
            steps = calibrate(plain, inputs)
            ratios, plain_s, wrapped_s = [], [], []
            for _ in range(args.rounds):
                # ABBA within a round, so a drift in machine speed cancels out of the ratio
                p1, w1 = step_time(plain, inputs, steps), step_time(wrapped, inputs, steps)
                w2, p2 = step_time(wrapped, inputs, steps), step_time(plain, inputs, steps)
                p, w = (p1 + p2) / 2, (w1 + w2) / 2
                plain_s.append(p)
                wrapped_s.append(w)
                ratios.append(w / p)
            row = {
                "model": name,
                "mode": mode,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "plain_step_ms": statistics.median(plain_s) * 1e3,
                "wrapped_step_ms": statistics.median(wrapped_s) * 1e3,
                "overhead_us_per_step": statistics.median(w - p for w, p in zip(wrapped_s, plain_s)) * 1e6,
                "weights": sum(1 for _ in build()[0].parameters()),
                "steps_per_round": steps,
                "rounds": args.rounds,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)

    result = {
        "device": cpu_name(),
        "device_kind": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "targets": {"eager": 1.05, "compiled": 1.02, "compiled-blocks": 1.02},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Wrapper overhead on the CPU ({result['date']}, torch {result['torch']}, {result['threads']} threads)",
        "",
        f"`{result['command']}`: wrapped/plain step time, median of {args.rounds} interleaved rounds.",
        "",
        "| model | weights | mode | plain ms/step | wrapped ms/step | overhead us/step | ratio (median) | min..max "
        "| target |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['weights']} | {row['mode']} | {row['plain_step_ms']:.3f} | "
            f"{row['wrapped_step_ms']:.3f} | {row['overhead_us_per_step']:.0f} | "
            f"{row['ratio_median']:.3f} | {row['ratio_min']:.3f}..{row['ratio_max']:.3f} | "
            f"<= {result['targets'][row['mode']]} |"
        )
    floor = {row["mode"]: row for row in rows if row["model"] == "mlp-8x16-b8"}
    if len(floor) == 2:
        eager_op = floor["eager"]["overhead_us_per_step"] / 8  # its 8 F.linear calls
        compiled_weight = floor["compiled"]["overhead_us_per_step"] / floor["compiled"]["weights"]
        flux_pct = " (eager) and ".join(
            f"{(row['ratio_median'] - 1) * 100:.0f}%" for row in rows
            if row["model"] == "flux-tiny" and row["mode"] in ("eager", "compiled")
        ) + " (compiled)"
        lines += [
            "",
            "Reading it: `mlp-8x16-b8` computes almost nothing, so its difference is the wrapper's fixed cost: "
            f"{eager_op:.1f} us per weighted op in eager (the `__torch_function__` round trip that lets `F.linear` "
            f"see the payload) and {compiled_weight:.1f} us per weight per compiled call (dynamo's per-call "
            "metadata guard on each subclass input, and AOTAutograd flattening it). Where ops compute for "
            "milliseconds (`mlp-8x1024-b8`) that cost is inside the noise; the tiny Flux runs 60 weighted ops "
            f"(108 weights) of tens of microseconds, so the same fixed cost is {flux_pct} of its step. Per-round "
            "ratios on this 2-core VM spread widely (min..max); the medians are what we report.",
        ]
    (args.out / "cpu-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
