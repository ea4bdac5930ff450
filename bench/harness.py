"""The benchmark harness: configurations are data, each runs in its own subprocess, repeats are
interleaved, results are JSON lines (appended, never overwritten) with the device, versions, date
and command, and a report renders a markdown table and PNG plots from them.

    python -m bench run cpu-compile-health [--repeats 2] [--only diffusers]
    python -m bench report cpu-compile-health
    python -m bench list
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REQUIRED_FIELDS = ("device", "torch", "diffusers", "torchao", "date", "command")


@dataclass(frozen=True)
class Config:
    """One thing to measure. Everything a run depends on is here."""

    model: str = "flux-tiny"  # flux-tiny | wan-tiny | flux-shaped
    # resident | ours | diffusers_group | model_cpu_offload | sequential_cpu_offload | accelerate_cpu_offload | mmgp
    method: str = "ours"
    compile: str = "crb"  # none | full (torch.compile) | crb (compile_repeated_blocks)
    quant: str = "none"  # none | fp8 | int8wo | qint8
    granularity: str = "block"  # block | leaf (ours, diffusers_group)
    prefetch: int = 1  # ours
    use_stream: bool = False  # diffusers_group
    record_stream: bool = False  # diffusers_group
    low_cpu_mem_usage: bool = False  # diffusers_group
    dtype: str = "float32"
    measure: str = "health"  # health (graph breaks, recompiles, graphs, compile time) | step (time, memory)
    device: str = "cpu"
    steps: int = 5

    @property
    def name(self) -> str:
        parts = [self.model, self.method]
        if self.method in ("ours", "diffusers_group"):
            parts.append(self.granularity)
        if self.method == "diffusers_group":
            parts += [f for f in ("use_stream", "record_stream", "low_cpu_mem_usage") if getattr(self, f)]
        if self.quant != "none":
            parts.append(self.quant)
        parts.append(self.compile)
        return "/".join(parts)


def _health(model: str, methods: list[dict]) -> list[Config]:
    return [Config(model=model, compile=c, **m) for m in methods for c in ("crb", "full")]


_CPU_METHODS = [
    dict(method="resident"),
    dict(method="ours"),
    dict(method="ours", granularity="leaf"),
    dict(method="ours", quant="fp8"),
    dict(method="ours", quant="int8wo"),
    dict(method="ours", quant="qint8"),
    dict(method="diffusers_group", granularity="block"),
    dict(method="diffusers_group", granularity="leaf"),
    dict(method="diffusers_group", granularity="leaf", low_cpu_mem_usage=True),
    dict(method="model_cpu_offload"),
    dict(method="sequential_cpu_offload"),
    dict(method="accelerate_cpu_offload"),
    dict(method="mmgp"),
]

SUITES: dict[str, list[Config]] = {
    "cpu-compile-health": _health("flux-tiny", _CPU_METHODS) + _health("wan-tiny", _CPU_METHODS),
    "smoke": [Config(method="resident", compile="full"), Config(method="ours", compile="full")],
    "gpu-step": [
        Config(model="flux-shaped", dtype="bfloat16", device="cuda", measure="step", **m)
        for m in [
            dict(method="resident", compile="crb"),
            dict(method="ours", compile="none"),
            dict(method="ours", compile="crb"),
            dict(method="ours", compile="crb", granularity="leaf"),
            dict(method="ours", compile="crb", quant="int8wo"),
            dict(method="diffusers_group", compile="none", use_stream=True),
            dict(method="diffusers_group", compile="crb", use_stream=True),
            dict(method="diffusers_group", compile="none", use_stream=True, granularity="leaf"),
            dict(method="diffusers_group", compile="crb", use_stream=True, granularity="leaf"),
            dict(method="diffusers_group", compile="none", use_stream=True, record_stream=True, low_cpu_mem_usage=True),
            dict(method="sequential_cpu_offload", compile="none"),
            dict(method="model_cpu_offload", compile="none"),
        ]
    ],
}


# -- one run (in a child process) ----------------------------------------------------------------
def build(config: Config):
    import torch

    from offload_tensor import testing

    dtype = getattr(torch, config.dtype)
    if config.model == "flux-tiny":
        model, inputs = testing.tiny_flux(), testing.tiny_flux_inputs()
    elif config.model == "wan-tiny":
        model, inputs = testing.tiny_wan(), testing.tiny_wan_inputs()
    elif config.model == "flux-shaped":
        from bench.models import build_model
        from bench.models import inputs as flux_inputs

        args = argparse.Namespace(double=4, single=8)  # ~5 GB of bf16 weights
        model, cfg = build_model(args)
        inputs = flux_inputs(args, cfg, "cpu")
    else:
        raise ValueError(f"unknown model {config.model!r}")
    model = model.to(dtype)
    inputs = {
        k: v.to(dtype) if hasattr(v, "is_floating_point") and v.is_floating_point() else v for k, v in inputs.items()
    }
    return model, inputs


def quantize(model, quant: str) -> None:
    if quant in ("none", "fp8"):
        return
    if quant == "int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    elif quant == "qint8":
        from optimum.quanto import freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        quanto_quantize(model, weights=qint8)
        freeze(model)
    else:
        raise ValueError(f"unknown quant {quant!r}")


def apply_method(model, config: Config):
    """Put `model` under the offloading method; returns the callable to run."""
    import torch

    device = torch.device(config.device)
    if config.method == "resident":
        return model.to(device)
    if config.method == "ours":
        from offload_tensor import wrap_model_for_offload

        storage = torch.float8_e4m3fn if config.quant == "fp8" else None
        return wrap_model_for_offload(
            model, device=device, storage_dtype=storage, granularity=config.granularity, prefetch=config.prefetch
        )
    if config.method == "diffusers_group":
        kwargs = dict(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level" if config.granularity == "block" else "leaf_level",
            use_stream=config.use_stream,
            record_stream=config.record_stream,
            low_cpu_mem_usage=config.low_cpu_mem_usage,
        )
        if config.granularity == "block":
            kwargs["num_blocks_per_group"] = 1
        model.enable_group_offload(**kwargs)
        return model
    if config.method == "model_cpu_offload":
        from accelerate import cpu_offload_with_hook

        model, _ = cpu_offload_with_hook(model, execution_device=device)  # what enable_model_cpu_offload does
        return model
    if config.method in ("sequential_cpu_offload", "accelerate_cpu_offload"):
        from accelerate import cpu_offload

        # enable_sequential_cpu_offload is cpu_offload on every component; on one model they coincide
        cpu_offload(model, execution_device=device, offload_buffers=config.method == "sequential_cpu_offload")
        return model
    if config.method == "mmgp":
        from mmgp import offload

        offload.profile({"transformer": model}, profile_no=offload.profile_type.HighRAM_LowVRAM)
        return model
    raise ValueError(f"unknown method {config.method!r}")


def _output(result):
    import torch

    return result if isinstance(result, torch.Tensor) else _output(result[0])


def run_config(config: Config) -> dict:
    import torch

    import compile_rules

    model, inputs = build(config)
    quantize(model, config.quant)
    weight_bytes = sum(_nbytes(p) for p in model.parameters())
    with torch.no_grad():
        reference = (
            _output(
                model.to(config.device)(
                    **{k: v.to(config.device) if hasattr(v, "to") else v for k, v in inputs.items()}
                )
            )
            .float()
            .cpu()
        )
    model = model.cpu()
    inputs = {k: v.to(config.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    model = apply_method(model, config)
    metrics: dict = {}
    if config.measure == "health":
        if config.compile == "none":
            raise ValueError("a health measurement needs compile='crb' or 'full'")
        report = compile_rules.check(model, repeated_blocks=config.compile == "crb", **inputs)
        metrics |= dict(
            graph_breaks=report.graph_breaks,
            graphs=report.graphs,
            recompiles=report.recompiles,
            compile_s=report.compile_seconds,
            fetches_per_forward=report.fetches_per_forward,
            break_reasons=[r.splitlines()[0][:160] for r in report.break_reasons],
            max_abs_diff=(_output(report.output).float().cpu() - reference).abs().max().item(),
        )
    else:
        device = torch.device(config.device)
        if config.compile == "crb":
            model.compile_repeated_blocks(fullgraph=config.method == "ours")
        elif config.compile == "full":
            model = torch.compile(model, fullgraph=config.method == "ours")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with torch.no_grad():
            for step in range(2 + config.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                out = model(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step >= 2:
                    times.append(time.perf_counter() - start)
        import psutil

        metrics |= dict(
            step_s=statistics.median(times),
            step_s_all=times,
            peak_vram_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            pinned_host_bytes=pinned_bytes(model),
            weight_bytes=weight_bytes,
            rss_bytes=psutil.Process().memory_info().rss,
            max_abs_diff=(_output(out).float().cpu() - reference).abs().max().item(),
        )
    return metrics


def _nbytes(t) -> int:
    if hasattr(t, "__tensor_flatten__"):
        return sum(_nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def pinned_bytes(model) -> int:
    """Host bytes pinned for `model`: our engine's arenas, or the pinned parameters of a hook
    based offloader (diffusers' stream mode pins per parameter)."""
    state = getattr(model, "_offload_state", None) or getattr(getattr(model, "_orig_mod", None), "_offload_state", None)
    if state is not None:
        return getattr(getattr(state.engine, "backend", None), "pinned_bytes", 0)
    total = 0
    for p in model.parameters():
        try:
            total += _nbytes(p) if p.device.type == "cpu" and p.is_pinned() else 0
        except (RuntimeError, NotImplementedError):
            pass
    return total


# -- the parent: environment, records, report -----------------------------------------------------
def environment(device: str) -> dict:
    import torch

    def version(name: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return "not installed"

    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    else:
        device_name = cpu_name()
    return {
        "device": device_name,
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "torchao": version("torchao"),
        "optimum-quanto": version("optimum-quanto"),
        "accelerate": version("accelerate"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def validate(record: dict) -> None:
    """Refuse a record that could not be traced back to a machine, versions, date and command."""
    missing = [f for f in REQUIRED_FIELDS if not record.get(f)]
    if missing:
        raise ValueError(
            f"benchmark record without {', '.join(missing)}: refusing to write it ({record.get('config')})"
        )


def append(path: Path, record: dict) -> None:
    validate(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # a rerun appends: earlier results stay
        f.write(json.dumps(record) + "\n")


def run_child(config: Config, timeout: int = 900) -> dict:
    cmd = [sys.executable, "-m", "bench", "child", json.dumps(dataclasses.asdict(config))]
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # compile times are measured cold: no FX-graph or AOTAutograd cache hits from earlier runs
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
    }
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()
        return {"error": next((line for line in reversed(tail) if line.strip()), "no output")[:300]}
    return json.loads(lines[-1][len("RESULT "):])


def run_suite(suite: str, repeats: int, only: str | None, out: Path) -> Path:
    configs = [c for c in SUITES[suite] if not only or only in c.name]
    path = out / f"{suite}.jsonl"
    for repeat in range(repeats):  # interleaved: every config once per round
        for config in configs:
            env = environment(config.device)
            metrics = run_child(config)
            fields = dataclasses.asdict(config)
            fields["compute_device"] = fields.pop("device")  # "device" is the machine (env)
            record = {**env, "suite": suite, "repeat": repeat, "config": config.name, **fields, **metrics}
            append(path, record)
            summary = {
                k: record.get(k) for k in ("graph_breaks", "graphs", "recompiles", "compile_s", "step_s", "error")
            }
            print(config.name, json.dumps({k: v for k, v in summary.items() if v is not None}), flush=True)
    return path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(suite: str, out: Path) -> tuple[Path, Path]:
    """Markdown table and PNG from every record of the suite (medians over repeats)."""
    records = load(out / f"{suite}.jsonl")
    by_config: dict[str, list[dict]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    newest = records[-1]
    rows = []
    for name, rs in by_config.items():
        ok = [r for r in rs if "error" not in r]
        row = {
            "config": name,
            "model": rs[0]["model"],
            "method": rs[0]["method"],
            "compile": rs[0]["compile"],
            "runs": len(rs),
        }
        if not ok:
            row["error"] = rs[-1]["error"]
        else:
            for key in (
                "graph_breaks",
                "graphs",
                "recompiles",
                "compile_s",
                "step_s",
                "max_abs_diff",
                "peak_vram_bytes",
            ):
                values = [r[key] for r in ok if r.get(key) is not None]
                if values:
                    row[key] = statistics.median(values)
        rows.append(row)
    lines = [
        f"# {suite}",
        "",
        f"Device: {newest['device']}; torch {newest['torch']}, diffusers {newest['diffusers']}, torchao "
        f"{newest['torchao']}, optimum-quanto {newest.get('optimum-quanto')}; latest run {newest['date']}.",
        f"Command: `{newest['command']}`; {len(records)} records in `{suite}.jsonl` (medians over repeats).",
        "",
    ]
    health = any("graph_breaks" in r for r in rows)
    if health:
        lines += ["| config | graph breaks | graphs | recompiles | compile s | max abs diff vs resident | runs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['config']} | failed: {r['error'][:90]} | | | | | {r['runs']} |")
            else:
                lines.append(f"| {r['config']} | {r['graph_breaks']:.0f} | {r['graphs']:.0f} | {r['recompiles']:.0f} | "
                             f"{r['compile_s']:.1f} | {r['max_abs_diff']:.1e} | {r['runs']} |")
    else:
        lines += ["| config | step s | peak VRAM GB | max abs diff | runs |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['config']} | failed: {r['error'][:90]} | | | {r['runs']} |")
            else:
                vram = f"{r['peak_vram_bytes'] / 1e9:.2f}" if r.get("peak_vram_bytes") else "-"
                lines.append(f"| {r['config']} | {r['step_s']:.4f} | {vram} | {r['max_abs_diff']:.1e} | {r['runs']} |")
    md = out / f"{suite}.md"
    md.write_text("\n".join(lines) + "\n")
    png = out / f"{suite}.png"
    plot(rows, png, suite, health)
    return md, png


def plot(rows: list[dict], png: Path, suite: str, health: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    models = sorted({r["model"] for r in ok})
    labels = list(dict.fromkeys(r["config"].split("/", 1)[1] for r in ok))
    metrics = [("graph_breaks", "graph breaks (count)"), ("compile_s", "compile time (s)")] if health else [
        ("step_s", "step time (s)")]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(max(8, 0.45 * len(labels) + 3), 3.2 * len(metrics)), squeeze=False
    )
    width = 0.8 / max(1, len(models))
    for ax, (key, label) in zip(axes[:, 0], metrics):
        for i, model in enumerate(models):
            values = {r["config"].split("/", 1)[1]: r.get(key, 0) for r in ok if r["model"] == model}
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [values.get(name, 0) for name in labels], width=width, label=model)
        ax.set_ylabel(label)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("method / granularity / quantization / compile mode (crb = compile_repeated_blocks)")
    fig.suptitle(f"{suite}: {ok[0]['model'] if len(models) == 1 else ', '.join(models)}" if ok else suite)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("suite", choices=sorted(SUITES))
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--only", default=None, help="run configs whose name contains this")
    run.add_argument("--out", type=Path, default=RESULTS)
    rep = sub.add_parser("report")
    rep.add_argument("suite", choices=sorted(SUITES))
    rep.add_argument("--out", type=Path, default=RESULTS)
    sub.add_parser("list")
    child = sub.add_parser("child")
    child.add_argument("config")
    args = parser.parse_args(argv)
    if args.command == "child":
        metrics = run_config(Config(**json.loads(args.config)))
        print("RESULT " + json.dumps(metrics), flush=True)
    elif args.command == "list":
        for suite, configs in SUITES.items():
            print(suite, len(configs), "configs")
    elif args.command == "run":
        run_suite(args.suite, args.repeats, args.only, args.out)
        for path in report(args.suite, args.out):
            print("wrote", path)
    else:
        for path in report(args.suite, args.out):
            print("wrote", path)
