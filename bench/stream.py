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

    python bench/stream.py [--double 4 --single 8] [--steps 5] [--only NAME ...] [--out bench/results]
    python bench/stream.py --tiny --device cpu --only offload_tensor_block_eager   # plumbing check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def build_model(args):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    if args.tiny:
        cfg = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                   guidance_embeds=True)
    else:
        cfg = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():  # random init, cheap and seeded
        torch.nn.init.normal_(p, std=0.02)
    return model.eval(), cfg


def inputs(args, cfg, device):
    g = torch.Generator().manual_seed(1)
    img, txt = (16, 8) if args.tiny else (4096, 512)
    x = dict(
        hidden_states=torch.randn(1, img, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.randn(img, 3, generator=g),
        txt_ids=torch.randn(txt, 3, generator=g),
    )
    return {k: v.to(device=device, dtype=torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in x.items()} | {
        "return_dict": False
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_one(args) -> dict:
    """One configuration, in this process; returns its row."""
    device = torch.device(args.device)
    model, cfg = build_model(args)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = args.run
    pinned = 0
    if name == "resident_compiled":
        model.to(device).compile_repeated_blocks(fullgraph=True)
    elif name.startswith("offload_tensor_"):
        from offload_tensor import wrap_model_for_offload

        granularity = "leaf" if "_leaf_" in name else "block"
        wrap_model_for_offload(model, device=device, granularity=granularity, prefetch=args.prefetch)
        engine = model._offload_state.engine
        pinned = getattr(getattr(engine, "backend", None), "pinned_bytes", 0)
        if name.endswith("_compiled"):
            model.compile_repeated_blocks(fullgraph=True)
    elif name.startswith("diffusers_block_stream") or name.startswith("diffusers_leaf_stream"):
        level = "block_level" if "_block_" in name else "leaf_level"
        extra = {"num_blocks_per_group": 1} if level == "block_level" else {}
        model.enable_group_offload(device, offload_device=torch.device("cpu"), offload_type=level, use_stream=True, **extra)
        pinned = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_pinned())
        if name.endswith("_crb"):
            model.compile_repeated_blocks()  # fullgraph=True fails on its hooks' graph breaks
    elif name == "diffusers_sequential":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=device)
    else:
        raise SystemExit(f"unknown config {name}; choose from {CONFIGS}")
    x = inputs(args, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.no_grad():
        for step in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            model(**x)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    return {
        "name": name,
        "step_s": statistics.median(times),
        "step_s_all": times,
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "pinned_host_bytes": pinned,
        "weight_bytes": weight_bytes,
        "rss_bytes": rss_bytes(),
    }


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
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (checks the plumbing, not the GPU)")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child: run one config, print JSON
    args = parser.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    device = torch.device(args.device)
    pinned_gbps, pageable_gbps = h2d_gbps(device, True), h2d_gbps(device, False)
    rows = []
    for name in args.only or CONFIGS:
        child = [sys.executable, __file__, "--run", name, *sys.argv[1:]]
        done = subprocess.run(child, capture_output=True, text=True, env=os.environ)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            rows.append({"name": name, "error": (done.stderr or done.stdout)[-2000:]})
            print(f"{name}: failed\n{rows[-1]['error']}", flush=True)
            continue
        rows.append(json.loads(lines[-1][len("RESULT "):]))
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
