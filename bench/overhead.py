"""Wrapped / plain step-time ratio on the CPU, eager and compiled, MLP stack and tiny Flux.

Every configuration is built once; rounds interleave them (plain, wrapped, plain, wrapped, ...)
so drift in machine speed hits both sides of a ratio alike; the reported ratio is the median over
rounds of the per-round ratio. Weights take the zero-copy path (offload device == compute device),
so the ratio is the cost of the wrapper itself: dispatch, plus flattening the subclass at the
compiled graph's boundary.

    python bench/overhead.py [--rounds 15] [--out bench/results]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def mlp() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.GELU()) for _ in range(8)]).eval()
    return model, {"input": torch.randn(8, 1024)}


def flux() -> tuple[nn.Module, dict]:
    from models import CASES  # the tests' tiny Flux, so the bench measures what the tests check

    case = CASES[0]
    return case.make(), case.inputs(0)


MODELS = {"mlp-8x1024-b8": mlp, "flux-tiny": flux}


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
    args = parser.parse_args()

    rows = []
    for name, build in MODELS.items():
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            plain, inputs = build()
            wrapped, _ = build()
            wrap_model_for_offload(wrapped, device="cpu")
            if mode == "compiled":
                plain, wrapped = torch.compile(plain, fullgraph=True), torch.compile(wrapped, fullgraph=True)
            for fn in (plain, wrapped):  # warm up (and compile)
                step_time(fn, inputs, 3)
            steps = calibrate(plain, inputs)
            ratios, plain_s, wrapped_s = [], [], []
            for _ in range(args.rounds):
                p = step_time(plain, inputs, steps)
                w = step_time(wrapped, inputs, steps)
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
                "steps_per_round": steps,
                "rounds": args.rounds,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)

    result = {
        "device": platform.processor() or platform.machine(),
        "device_kind": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "targets": {"eager": 1.05, "compiled": 1.02},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Wrapper overhead on the CPU ({result['date']}, torch {result['torch']}, {result['threads']} threads)",
        "",
        f"`{result['command']}`: wrapped/plain step time, median of {args.rounds} interleaved rounds.",
        "",
        "| model | mode | plain ms/step | wrapped ms/step | ratio (median) | min..max | target |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['plain_step_ms']:.3f} | {row['wrapped_step_ms']:.3f} | "
            f"{row['ratio_median']:.3f} | {row['ratio_min']:.3f}..{row['ratio_max']:.3f} | "
            f"<= {result['targets'][row['mode']]} |"
        )
    (args.out / "cpu-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
