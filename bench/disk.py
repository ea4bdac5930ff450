"""Disk-tier benchmark on the CPU: a Flux-shaped model larger than it needs to be in RAM, run
from disk, against the same model in RAM and against diffusers' group offloading to disk.

The model: FLUX.1-dev block dimensions (hidden 3072 = 24 heads x 128, joint attention 4096,
pooled 768, 64 input channels, guidance embedding), 2 double + 4 single blocks, bf16, random
init (seeded): 2.5 GB of weights, saved once as a sharded diffusers checkpoint. Inputs are small
(`--image-tokens`, `--text-tokens`) so that a step's compute on this CPU is of the order of
reading the weights from disk: the benchmark shows whether reading overlaps compute.

Every configuration runs in its own process, in rounds (each round runs every configuration
once; this VM's speed drifts by +-20% over minutes and its disk's by more, so ratios are taken
within a round and the median over rounds is reported). Before each timed step the page cache of
the configuration's weight files is dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`), so each step
reads from the disk. Measured per configuration: median step time, steady RSS above the same
process right after its imports (before any weight exists), bytes read per step, and the disk's
cold read bandwidth on its own files right before its timed steps (direct I/O, page cache
dropped). The bound for a disk-streamed step is `max(compute, bytes read / bandwidth)`, with
compute = the same model loaded into RAM by us (`ours_ram`, same kernels and alignment) in the
same round.

Configurations:
  ram                     diffusers' from_pretrained, in RAM (its weights are views of the mapped
                          file, so some kernels round differently: outputs differ in the last bits)
  ours_ram                wrap_model_for_offload(meta model, checkpoint=...): in RAM, compute time
  ours_disk               ... offload=folder: the disk tier, block groups, prefetch 1
  ours_disk_leaf          ... granularity="leaf", prefetch 2 (a group per module: finer read-ahead)
  ours_disk_crb           ours_disk + compile_repeated_blocks(fullgraph=True)
  ours_disk_leaf_crb      ours_disk_leaf + compile_repeated_blocks(fullgraph=True)
  ours_disk_unchecked     ours_disk without checking the cache's checksums on the first read (the
                          cost of that check: compare the first steps of the two)
  diffusers_block_disk    enable_group_offload(block_level, 1 block per group, offload_to_disk_path=folder)
  diffusers_leaf_disk     enable_group_offload(leaf_level, offload_to_disk_path=folder)
  diffusers_block_disk_crb  ... block_level + compile_repeated_blocks

    python bench/disk.py [--steps 4] [--work /tmp/offload_tensor_disk_bench] [--only NAME ...]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/disk.py` finds `bench`
CONFIGS = [
    "ram",
    "ours_ram",
    "ours_disk",
    "ours_disk_leaf",
    "ours_disk_crb",
    "ours_disk_leaf_crb",
    "ours_disk_unchecked",
    "diffusers_block_disk",
    "diffusers_leaf_disk",
    "diffusers_block_disk_crb",
]
MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56))  # fmt: skip


def drop_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(path, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))


def rss() -> int:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def inputs(args):
    import torch

    g = torch.Generator().manual_seed(1)
    bf16 = dict(dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.randn(1, args.image_tokens, MODEL["in_channels"], generator=g).to(**bf16),
        encoder_hidden_states=torch.randn(1, args.text_tokens, MODEL["joint_attention_dim"], generator=g).to(**bf16),
        pooled_projections=torch.randn(1, MODEL["pooled_projection_dim"], generator=g).to(**bf16),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.randn(args.image_tokens, 3, generator=g),
        txt_ids=torch.randn(args.text_tokens, 3, generator=g),
        return_dict=False,
    )


def setup(work: Path) -> Path:
    """Save the random Flux-shaped checkpoint once (in a child: the parent stays small)."""
    checkpoint = work / "checkpoint"
    if (checkpoint / "config.json").exists():
        return checkpoint
    code = f"""
import torch
from diffusers import FluxTransformer2DModel
torch.manual_seed(0)
with torch.device("meta"):
    model = FluxTransformer2DModel(**{MODEL!r})
model = model.to_empty(device="cpu").to(torch.bfloat16)
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
model.save_pretrained({str(checkpoint)!r}, max_shard_size="500MB")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return checkpoint


def cold_read_bandwidth(files: list[Path], direct: bool) -> float:
    """Bytes per second reading `files` whole after dropping their page cache (64 MiB reads)."""
    from offload_tensor.engine.host_store import aligned_empty

    drop_page_cache(files)
    buffer = memoryview(aligned_empty(64 << 20).numpy())
    total, start = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            offset = 0
            while n := os.preadv(fd, [buffer], offset):
                offset += n
                if n % 512:
                    break
            total += offset
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start)


# -- one configuration (in a child process) -------------------------------------------------------
def child(args) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel

    from offload_tensor import from_pretrained, offload_report

    torch.manual_seed(0)
    bare = rss()
    work, checkpoint, name = Path(args.work), Path(args.work) / "checkpoint", args.child
    folder = work / name.replace("_crb", "").replace("_unchecked", "").replace("_leaf", "-leaf")
    torch.set_num_threads(os.cpu_count())
    if name == "ram":
        model = FluxTransformer2DModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).eval()
        files = []
    elif name.startswith("ours"):
        leaf = "_leaf" in name
        disk = {} if name == "ours_ram" else {"offload": folder}
        model = from_pretrained(FluxTransformer2DModel, checkpoint, prefetch=2 if leaf else args.prefetch,
                                granularity="leaf" if leaf else "block", **disk)  # fmt: skip
        files = weight_files(folder) if disk else []
    else:
        model = FluxTransformer2DModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).eval()
        level = "block_level" if "block" in name else "leaf_level"
        kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
        model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=level,
                                   offload_to_disk_path=str(folder), **kwargs)  # fmt: skip
        files = []  # written on the first forward
    if name.endswith("_crb"):
        model.compile_repeated_blocks(fullgraph=name.startswith("ours"))
    x = inputs(args)
    times = []
    stores = getattr(getattr(model.__dict__.get("_offload_state"), "engine", None), "stores", [])
    if name.endswith("_unchecked"):
        for group in stores:
            group.verified = True  # as if already checked in this process
    checked = sum(g.nbytes for g in stores if not getattr(g, "verified", True))  # 0 where this process wrote the cache
    with torch.no_grad():
        drop_page_cache(files)
        start = time.perf_counter()
        reference = model(**x)[0]  # the first read of every group: checksums checked here
        first_step = time.perf_counter() - start
        reference = model(**x)[0]  # warm up: compile, learn the order, write diffusers' files
        files = files or weight_files(folder) if name not in ("ram", "ours_ram") else []
        backend = getattr(getattr(model.__dict__.get("_offload_state"), "engine", None), "backend", None)
        bandwidth = cold_read_bandwidth(files, direct=True) if files else None  # the disk, right now
        read_before = getattr(backend, "bytes_read", None)
        for _ in range(args.steps):
            drop_page_cache(files)
            start = time.perf_counter()
            model(**x)
            times.append(time.perf_counter() - start)
    record = dict(
        config=name,
        step_s=statistics.median(times),
        steps=times,
        first_step_s=first_step,
        checked_bytes=checked,
        rss_above_bare=rss() - bare,
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()) if name == "ram" else None,
        files_bytes=sum(f.stat().st_size for f in files),
        bandwidth=bandwidth,
        output_checksum=float(reference.double().sum()),
    )
    if read_before is not None:
        record["bytes_read_per_step"] = (backend.bytes_read - read_before) / args.steps
        stats = model._offload_state.engine.scheduler.stats
        record["scheduler"] = dict(hits=stats.hits, misses=stats.misses, copies=stats.copies)
    if name.startswith("ours"):
        report = offload_report(model)
        record["weight_bytes"] = sum(report.by_tier.values())
        record["report"] = str(report)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--work", default="/tmp/offload_tensor_disk_bench")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tag", default="", help="results go to cpu-disk-TAG.{json,md} (a run of some configs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch

    from bench.harness import cpu_name

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = setup(work)
    names = args.only or CONFIGS
    rounds: list[dict[str, dict]] = []
    bandwidths: list[tuple[float, float]] = []  # (buffered, direct), measured at the start of each round
    for r in range(args.rounds):
        bandwidths.append((cold_read_bandwidth(weight_files(checkpoint), direct=False),
                           cold_read_bandwidth(weight_files(checkpoint), direct=True)))  # fmt: skip
        print(
            f"round {r}: cold read bandwidth buffered {bandwidths[-1][0] / 1e9:.2f} GB/s, "
            f"direct {bandwidths[-1][1] / 1e9:.2f} GB/s"
        )
        rounds.append({})
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--steps", str(args.steps),
                   "--prefetch", str(args.prefetch), "--image-tokens", str(args.image_tokens),
                   "--text-tokens", str(args.text_tokens)]  # fmt: skip
            done = subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            if done.returncode != 0:
                record = dict(config=name, error=(done.stderr.strip().splitlines() or ["?"])[-1][:300])
            else:
                record = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"round {r}", name, {k: v for k, v in record.items() if k not in ("steps", "report")}, flush=True)
            rounds[-1][name] = record

    weight_bytes = next((rec["weight_bytes"] for rd in rounds for rec in rd.values() if rec.get("weight_bytes")), None)
    records = []
    for name in names:
        runs = [rd[name] for rd in rounds if "step_s" in rd[name]]
        if not runs:
            records.append(dict(config=name, error=rounds[-1][name].get("error")))
            continue
        record = dict(runs[-1], config=name, step_s=statistics.median(r["step_s"] for r in runs),
                      rounds=[r["step_s"] for r in runs], first_steps=[r.get("first_step_s", 0) for r in runs],
                      checked=[r.get("checked_bytes", 0) for r in runs],
                      rss_above_bare=statistics.median(r["rss_above_bare"] for r in runs))  # fmt: skip
        ratios = []
        for rd, bw in zip(rounds, bandwidths):
            compute = rd.get("ours_ram", {}).get("step_s")
            if compute and "step_s" in rd[name]:
                read = rd[name].get("bytes_read_per_step") or rd[name].get("files_bytes") or 0
                ratios.append(rd[name]["step_s"] / max(compute, read / (rd[name].get("bandwidth") or max(bw))))
        if ratios:
            record["step_over_bound"] = statistics.median(ratios)
            record["step_over_bound_rounds"] = ratios
        if weight_bytes:
            record["rss_over_weights"] = record["rss_above_bare"] / weight_bytes
        records.append(record)
    meta = dict(
        device=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
        date=datetime.date.today().isoformat(), command="python bench/disk.py " + " ".join(sys.argv[1:]),
        cold_read_buffered_bytes_per_s=[b for b, _ in bandwidths],
        cold_read_direct_bytes_per_s=[d for _, d in bandwidths],
        weight_bytes=weight_bytes, image_tokens=args.image_tokens, text_tokens=args.text_tokens, steps=args.steps,
        rounds=args.rounds, prefetch=args.prefetch,
    )  # fmt: skip
    import diffusers

    meta["diffusers"] = diffusers.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cpu-disk" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, records=records, raw_rounds=rounds), indent=1))
    (args.out / f"{stem}.md").write_text(markdown(meta, records))
    print((args.out / f"{stem}.md").read_text())


def markdown(meta: dict, records: list[dict]) -> str:
    gb = 1e9
    lines = [
        f"# Disk tier on the CPU ({meta['date']}, torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"{meta['cores']} cores)",
        "",
        f"`{meta['command']}` on {meta['device']}. Flux-shaped bf16 model, {meta['weight_bytes'] / gb:.2f} GB of "
        f"weights; {meta['image_tokens']} image + {meta['text_tokens']} text tokens; page cache of the weight files "
        "dropped before "
        "every timed step; cold read bandwidth per round (GB/s) buffered "
        + ", ".join(f"{b / gb:.2f}" for b in meta["cold_read_buffered_bytes_per_s"])
        + ", direct I/O "
        + ", ".join(f"{d / gb:.2f}" for d in meta["cold_read_direct_bytes_per_s"])
        + f" (a round's bound uses its higher figure). Medians over {meta['rounds']} rounds of {meta['steps']} steps.",
        "",
        "| config | step s (per round) | step / bound (per round) | read per step GB | disk GB/s "
        "| steady RSS above bare GB "
        "| RSS / weights | first step s (per round; GB checked) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        if "step_s" not in r:
            lines.append(f"| {r['config']} | error: {r.get('error', '')} | | | | |")
            continue
        read = (r.get("bytes_read_per_step") or r.get("files_bytes") or 0) / gb
        per_round = ", ".join(f"{s:.2f}" for s in r["rounds"])
        bound = "-"
        if "step_over_bound" in r:
            bound = f"{r['step_over_bound']:.2f} ({', '.join(f'{x:.2f}' for x in r['step_over_bound_rounds'])})"
        disk = f"{r['bandwidth'] / gb:.2f}" if r.get("bandwidth") else "-"
        first = ", ".join(f"{s:.2f}; {c / gb:.2f}" for s, c in zip(r.get("first_steps", []), r.get("checked", [])))
        lines.append(
            f"| {r['config']} | {r['step_s']:.2f} ({per_round}) | {bound} | {read:.2f} | {disk} | "
            f"{r['rss_above_bare'] / gb:.2f} | {r.get('rss_over_weights', 0):.2f} | {first} |"
        )
    lines += [
        "",
        "step / bound: per round, step / max(compute, bytes read / bandwidth), compute = `ours_ram`'s step in that "
        "round, bandwidth = the cold direct read of the configuration's own weight files right before its timed steps; "
        "the median over rounds. disk GB/s: that measurement (the last round's). For diffusers, bytes read per step "
        "is the size of its offload files (it reads "
        "every group each step). Targets for ours: RSS / weights <= 0.25, step / bound <= 1.15, and no slower than "
        "diffusers' disk offloading. first step: the step right after loading, page cache dropped, in which a reused "
        "cache's checksums are checked (GB checked: 0 where that process wrote the cache itself); "
        "`ours_disk_unchecked` "
        "is `ours_disk` with the check skipped.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
