"""A LoRA training step over offloaded weights against the same step on the plain model: step time,
peak memory (host RSS; device memory on a GPU) and the LoRA gradients, eager and compiled
(`compile_repeated_blocks(fullgraph=True)`), streamed from RAM and from the disk tier.

The model: FLUX.1-dev's architecture (head dim 128, joint attention 4096, pooled 768, 64 input
channels, its rotary axes) narrowed to `--heads` heads (default 6: hidden 768), `--double` double
and `--single` single blocks (default 6 and 12: 0.48 GB of bf16 weights in 25 groups), random
seeded weights. A LoRA (r=16) on the attention projections trains on a flow-matching-style loss
(MSE of the output against a random target). Every configuration runs in a process of its own
(peak RSS is a property of a process; the peak is reset before each step through
/proc/self/clear_refs), `--steps` steps after one untimed step (which compiles).

Configurations (`--only`):
  plain        the plain model, resident where it computes
  ours_ram     wrapped, every group streamed from host RAM (on the CPU there is nothing to
               stream from RAM: zero-copy, the wrapper's own cost)
  ours_disk    wrapped, every group streamed from the disk tier
each eager and `_crb` (compile_repeated_blocks). Reported: median step time, the peak rise of
host RSS (and device memory) over the process before the step, both beyond the plain model's
step of the same mode, in % of the weight bytes; whether the LoRA gradients equal the plain
model's of the same mode (else the largest abs difference over the largest abs value); the plain
compiled row's own against plain eager is the rounding a different graph makes in bf16.

    python bench/train.py [--device cpu|cuda] [--steps 2] [--threads N] [--only NAME ...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/train.py` finds `bench`
CONFIGS = [f"{m}{c}" for m in ("plain", "ours_ram", "ours_disk") for c in ("", "_crb")]


def lora_model(args, method: str, work: Path):
    """The Flux-shaped model (`method`: plain, ours_ram, ours_disk) with a seeded LoRA on it."""
    import torch
    from peft import LoraConfig

    from bench.models import build_model

    model, cfg = build_model(args, device=args.device)
    if method != "plain":
        from offload_tensor import wrap_model_for_offload

        tier = dict(offload="disk", disk_path=work / "disk") if method == "ours_disk" else {}
        model = wrap_model_for_offload(model, device=args.device, **tier)
        if args.device != "cpu":
            torch.cuda.empty_cache()  # the weights made on the GPU went to host arenas
    torch.manual_seed(7)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))  # fmt: skip
    return model.train(), cfg


def one(args) -> dict:
    """Measure one configuration in this process; its LoRA gradients go to `<work>/<config>.pt`."""
    import torch

    from bench.models import inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    method, compiled = args.one.removesuffix("_crb"), args.one.endswith("_crb")
    work = Path(args.work)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, cfg = lora_model(args, method, work)
    if compiled:
        model.compile_repeated_blocks(fullgraph=True)
    x = inputs(args, cfg, device)
    target = torch.randn_like(x["hidden_states"], dtype=torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    times, host_rises, device_rises = [], [], []
    for step in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            device_before = torch.cuda.memory_allocated(device)
        before = _rss()
        _reset_peak_rss()
        start = time.perf_counter()
        out = model(**x)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        del out
        if cuda:
            torch.cuda.synchronize(device)
        if step == 0:
            first_s = time.perf_counter() - start  # compiles
            continue
        times.append(time.perf_counter() - start)
        host_rises.append(_peak_rss() - before)
        if cuda:
            device_rises.append(torch.cuda.max_memory_allocated(device) - device_before)
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, work / f"{args.one}.pt")
    counters = {}
    if compiled:
        from torch._dynamo.utils import counters as dynamo

        counters = dict(graph_breaks=sum(dynamo["graph_break"].values()), graphs=dynamo["stats"]["unique_graphs"])
    return dict(config=args.one, method=method, compiled=compiled, weight_bytes=weight_bytes, first_step_s=first_s,
                step_s=statistics.median(times), step_s_all=times, peak_rss_rise_bytes=max(host_rises),
                peak_device_rise_bytes=max(device_rises) if device_rises else None, loss=loss.item(),
                lora_tensors=len(grads), **counters)  # fmt: skip


def _rss() -> int:
    import gc

    gc.collect()
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def grads_vs(grads: dict, reference: dict) -> dict:
    """LoRA gradients against a reference's: bit-equal, and the largest abs difference over the
    largest abs value of any one tensor (also used by `python -m bench gpu`'s training phase)."""
    import torch

    if grads.keys() != reference.keys():
        return dict(equal=False, why="different LoRA parameters")
    worst = max(
        ((grads[k].double() - reference[k].double()).abs().max() / reference[k].double().abs().max().clamp(min=1e-30))
        .item()
        for k in grads
    )
    return dict(equal=all(torch.equal(grads[k], reference[k]) for k in grads), max_rel_diff=worst)


def compare_grads(work: Path, config: str, reference: str) -> dict:
    import torch

    return dict(vs=reference) | grads_vs(torch.load(work / f"{config}.pt"), torch.load(work / f"{reference}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--double", type=int, default=6)
    parser.add_argument("--single", type=int, default=12)
    parser.add_argument("--image-tokens", type=int, default=192)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 keeps a shared 2-core machine from stalling "
                             "every op at a barrier")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one configuration
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dims = f"flux-{args.heads}-heads"
    if args.one:
        print(json.dumps(one(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="offload_tensor_train_bench_") as work:
        for config in args.only:  # plain first: the others are read against it
            cmd = [sys.executable, __file__, "--one", config, "--work", work] + [
                a for a in sys.argv[1:] if a not in args.only and a != "--only"
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                rows.append(dict(config=config, error=(done.stderr.strip().splitlines() or ["?"])[-1][:300]))
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        by = {r["config"]: r for r in rows if "error" not in r}
        for r in rows:
            reference = "plain_crb" if r.get("compiled") else "plain"
            if r["config"] == "plain_crb" and "plain" in by:  # compiled vs eager rounding: the noise floor
                r |= compare_grads(Path(work), "plain_crb", "plain")
            if "error" in r or reference not in by or r["config"] == reference:
                continue
            base = by[reference]
            r |= compare_grads(Path(work), r["config"], reference)
            rise = r["peak_rss_rise_bytes"] - base["peak_rss_rise_bytes"]
            r["rss_beyond_plain_pct"] = 100 * rise / r["weight_bytes"]
            if r["peak_device_rise_bytes"] is not None:
                r["device_beyond_plain_pct"] = (
                    100 * (r["peak_device_rise_bytes"] - base["peak_device_rise_bytes"]) / r["weight_bytes"]
                )
            r["step_over_plain"] = r["step_s"] / base["step_s"]
    write(args, rows)


def write(args, rows: list[dict]) -> None:
    import torch

    from bench.harness import cpu_name

    device = torch.cuda.get_device_name() if args.device != "cpu" else cpu_name()
    result = dict(device=device, torch=torch.__version__, python=platform.python_version(),
                  date=datetime.date.today().isoformat(), command=" ".join(["python", "bench/train.py", *sys.argv[1:]]),
                  model=dict(heads=args.heads, double=args.double, single=args.single,
                             image_tokens=args.image_tokens, text_tokens=args.text_tokens),
                  rows=rows)  # fmt: skip
    name = f"{'cpu' if args.device == 'cpu' else 'gpu'}-train{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    weights = next((r["weight_bytes"] for r in rows if "weight_bytes" in r), 0)
    lines = [
        f"# LoRA training step over offloaded weights ({device}, torch {result['torch']}, {result['date']})",
        "",
        f"`{result['command']}`: Flux-shaped, {args.heads} heads, {args.double} double + {args.single} single "
        f"blocks, {weights / 1e9:.2f} GB of bf16 weights, {args.image_tokens} + {args.text_tokens} tokens, LoRA r=16 "
        "on the attention projections; each configuration in its own process, median of "
        f"{args.steps} steps after an untimed one.",
        "",
        "| config | step s | x plain | first step s | peak RSS rise GB | beyond plain (% weights) | device beyond "
        "plain (% weights) | LoRA grads vs plain | graph breaks |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} | | | | | | | |")
            continue
        grads = "-" if "vs" not in r else ("bit-equal" if r["equal"] else f"max rel {r['max_rel_diff']:.1e}")
        grads += f" (vs {r['vs']})" if r.get("vs") and r["vs"] != ("plain_crb" if r["compiled"] else "plain") else ""
        lines.append(
            f"| {r['config']} | {r['step_s']:.2f} | {r.get('step_over_plain', 1.0):.2f} | {r['first_step_s']:.1f} | "
            f"{r['peak_rss_rise_bytes'] / 1e9:.3f} | {_pct(r.get('rss_beyond_plain_pct'))} | "
            f"{_pct(r.get('device_beyond_plain_pct'))} | {grads} | {r.get('graph_breaks', '-')} |"
        )
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1f}%"


if __name__ == "__main__":
    main()
