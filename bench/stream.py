"""Streaming benchmark for a GPU: a Flux-shaped bf16 transformer offloaded to CPU RAM.

FLUX.1-dev block dimensions (hidden 3072 = 24 heads x 128, joint attention 4096, pooled 768,
64 input channels, guidance embedding) with fewer blocks (default 4 double + 8 single: ~5 GB of
bf16 weights, random init), run at FLUX.1-dev's 1024x1024 input shapes (hidden_states 1x4096x64,
encoder_hidden_states 1x512x4096), one forward per step. Every configuration runs in its own
subprocess (so peak VRAM, pinned bytes and RSS are its own); the parent measures host-to-device
bandwidth and writes JSON + a markdown table.

Configurations (names: ours start with offload_tensor_, diffusers' with diffusers_):
  resident_compiled                 weights on the GPU, compile_repeated_blocks: compute-only time
  offload_tensor_block_eager        ours, block groups, prefetch 1
  offload_tensor_block_compiled     ours + compile_repeated_blocks(fullgraph=True)
  offload_tensor_leaf_compiled      ours, leaf groups
  diffusers_block_stream            enable_group_offload(block_level, 1 block/group, use_stream)
  diffusers_block_stream_crb        ... + compile_repeated_blocks
  diffusers_leaf_stream             enable_group_offload(leaf_level, use_stream)
  diffusers_leaf_stream_crb         ... + compile_repeated_blocks
  diffusers_sequential              accelerate cpu_offload (what enable_sequential_cpu_offload does)

    python bench/stream.py [--steps 5] [--prefetch 1] [--only NAME ...] [--out bench/results]
    python bench/stream.py --tiny --device cpu --only offload_tensor_block_eager   # plumbing check

Each configuration is a configuration of the benchmark harness (bench/harness.py; model
"flux-shaped"), so this script and `python -m bench run gpu-step` share one code path.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/stream.py` finds `bench`

CONFIGS = [
    "resident_compiled",
    "offload_tensor_block_eager",
    "offload_tensor_block_compiled",
    "offload_tensor_leaf_compiled",
    "diffusers_block_stream",
    "diffusers_block_stream_crb",
    "diffusers_leaf_stream",
    "diffusers_leaf_stream_crb",
    "diffusers_sequential",
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Each name is a configuration of the harness (bench/harness.py), run the same way as every other
# benchmark: its own subprocess, the same model builder, the same method code.
def harness_config(name: str, args):
    from bench.harness import Config

    base = dict(model="flux-shaped", dtype="bfloat16", device=args.device, measure="step", steps=args.steps,
                prefetch=args.prefetch)
    if args.tiny:
        base |= dict(model="flux-tiny", dtype="float32")
    table = {
        "resident_compiled": dict(method="resident", compile="crb"),
        "offload_tensor_block_eager": dict(method="ours", compile="none"),
        "offload_tensor_block_compiled": dict(method="ours", compile="crb"),
        "offload_tensor_leaf_compiled": dict(method="ours", compile="crb", granularity="leaf"),
        "diffusers_block_stream": dict(method="diffusers_group", compile="none", use_stream=True),
        "diffusers_block_stream_crb": dict(method="diffusers_group", compile="crb", use_stream=True),
        "diffusers_leaf_stream": dict(method="diffusers_group", compile="none", use_stream=True, granularity="leaf"),
        "diffusers_leaf_stream_crb": dict(method="diffusers_group", compile="crb", use_stream=True, granularity="leaf"),
        "diffusers_sequential": dict(method="sequential_cpu_offload", compile="none"),
    }
    if name not in table:
        raise SystemExit(f"unknown config {name}; choose from {list(table)}")
    return Config(**base, **table[name])


def h2d_gbps(device, pinned: bool, nbytes: int = 1 << 30) -> float | None:
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=pinned)
    sync(device)
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        sync(device)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (checks the plumbing, not the GPU)")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from bench.harness import run_child

    device = torch.device(args.device)
    pinned_gbps, pageable_gbps = h2d_gbps(device, True), h2d_gbps(device, False)
    rows = []
    for name in args.only or CONFIGS:
        rows.append({"name": name, **run_child(harness_config(name, args), timeout=1800)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s_all"}), flush=True)

    compute = next((r["step_s"] for r in rows if r["name"] == "resident_compiled" and "step_s" in r), None)
    for row in rows:
        if "step_s" in row and pinned_gbps:
            transfer = row["weight_bytes"] / (pinned_gbps * 1e9)
            row["bound_s"] = max(compute or 0.0, transfer) if not row["name"].startswith("resident") else compute
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/stream.py", *sys.argv[1:]]),
        "h2d_pinned_gbps": pinned_gbps,
        "h2d_pageable_gbps": pageable_gbps,
        "configs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-stream" if not args.tiny else "tiny-stream-plumbing"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Streaming, {result['device']} (torch {result['torch']}, {result['date']})",
        "",
        f"`{result['command']}`; pinned H2D {pinned_gbps or 0:.1f} GB/s, pageable {pageable_gbps or 0:.1f} GB/s.",
        "",
        "| config | step s | bound s | step/bound | peak VRAM GB | pinned GB | weights GB | RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gb = lambda b: f"{b / 1e9:.2f}" if b is not None else "-"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | | | | |")
            continue
        ratio = f"{r['step_s'] / r['bound_s']:.2f}" if r.get("bound_s") else "-"
        bound = f"{r['bound_s']:.3f}" if r.get("bound_s") else "-"
        lines.append(
            f"| {r['name']} | {r['step_s']:.3f} | {bound} | {ratio} | {gb(r['peak_vram_bytes'])} | "
            f"{gb(r['pinned_host_bytes'])} | {gb(r['weight_bytes'])} | {gb(r['rss_bytes'])} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
