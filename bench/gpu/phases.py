"""One phase of the GPU check, run in a child process of its own:

    python -m bench.gpu.phases NAME SPEC_JSON

Each phase appends its records to `<work>/<NAME>.jsonl` as soon as each is measured, so what was
measured before a crash or a timeout survives it. On the CPU (the dry run, or a machine without
CUDA) every phase runs its CPU stand-in: weights stream from the disk tier instead of pinned RAM,
diffusers offloads without streams, the stress spins on the host.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from bench.gpu import measure, trace
from bench.gpu.config import BUDGET_FRACTIONS, Scale
from bench.models import build_model
from bench.models import inputs as flux_inputs

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "triton", "diffusers", "torchao", "optimum-quanto", "accelerate", "transformers",
            "safetensors", "xxhash", "tqdm", "psutil", "pytest", "pytest-xdist", "hypothesis")  # fmt: skip
STEP_RANGE = "bench.step"


@dataclass(frozen=True)
class Spec:
    """What the parent hands a phase."""

    work: str  # the run's scratch folder: records, the reference output, disk-tier files
    out: str  # the run's output folder (the profile's trace goes there)
    scale: Scale
    device: str  # "cuda", or "cpu" for the dry run

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def emit(spec: Spec, phase: str, record: dict) -> None:
    with open(Path(spec.work) / f"{phase}.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


# -- environment ------------------------------------------------------------------------------
def environment(spec: Spec, phase: str) -> None:
    import psutil

    from bench.harness import cpu_name
    from offload_tensor.planner import measured_bandwidth
    from offload_tensor.policy import Placement

    device = torch.device(spec.device)
    record = dict(
        kind="environment",
        compute_device=spec.device,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        cpu=cpu_name(),
        cpu_cores=os.cpu_count(),
        ram_bytes=psutil.virtual_memory().total,
        packages={name: _version(name) for name in PACKAGES},
    )
    if spec.cuda:
        props = torch.cuda.get_device_properties(device)
        record |= dict(device=props.name, device_memory_bytes=props.total_memory,
                       capability=f"{props.major}.{props.minor}", driver=_driver())  # fmt: skip
    else:
        record |= dict(device=cpu_name(), driver=None)
    record["h2d_pinned"] = measure.h2d_bandwidth(device, pinned=True)
    record["h2d_pageable"] = measure.h2d_bandwidth(device, pinned=False)
    record["library_measured_bandwidth"] = measured_bandwidth(Placement(device=device))  # None without CUDA
    emit(spec, phase, record)


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)  # fmt: skip
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# -- pytest -m gpu ----------------------------------------------------------------------------
def gpu_tests(spec: Spec, phase: str, timeout: float) -> None:
    """Every GPU-marked test (all skipped without CUDA); its summary from the JUnit XML."""
    junit = Path(spec.work) / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "--continue-on-collection-errors", "tests"]  # fmt: skip
    if spec.cuda and _version("pytest-xdist"):
        cmd[3:3] = ["-n", "4"]  # the tests compile on the host: 4 of the 16 cores at a time
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        timed_out = True
    record = dict(kind="gpu_tests", command=" ".join(["python", *cmd[1:]]), returncode=proc.returncode,
                  seconds=time.perf_counter() - start, timed_out=timed_out,
                  last_line=next((ln for ln in reversed(output.splitlines()) if ln.strip()), ""))  # fmt: skip
    if junit.exists():
        record |= junit_summary(junit)
    emit(spec, phase, record)
    print(output[-6000:])


def junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for outcome in ("failure", "error"):
            node = case.find(outcome)
            if node is not None:
                message = ((node.get("message") or node.text or "").strip().splitlines() or [""])[0][:200]
                failed.append(f"{case.get('classname')}::{case.get('name')}: {outcome}: {message}")
    return total | dict(passed=total["tests"] - total["failures"] - total["errors"] - total["skipped"], failed=failed)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


# -- the models -------------------------------------------------------------------------------
def model_and_inputs(spec: Spec, small: bool = False):
    """The Flux-shaped model, its weights made on the compute device, and FLUX.1-dev's inputs."""
    s = spec.scale
    args = argparse.Namespace(dims=s.dims, double=s.small_double if small else s.double,
                              single=s.small_single if small else s.single, image_tokens=s.image_tokens,
                              text_tokens=s.text_tokens)  # fmt: skip
    model, cfg = build_model(args, device=spec.device)
    return model, flux_inputs(args, cfg, spec.device)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def wrap_ours(model: nn.Module, spec: Spec, phase: str, **kwargs) -> nn.Module:
    """Our wrap, everything streamed: from pinned host RAM on CUDA; from the disk tier on the CPU,
    where host RAM is where the model computes and nothing would stream."""
    from offload_tensor import wrap_model_for_offload

    if spec.cuda:
        return wrap_model_for_offload(model, device="cuda", **kwargs)
    disk = Path(spec.work) / f"disk-{phase}"
    return wrap_model_for_offload(model, device="cpu", offload="disk", disk_path=disk, **kwargs)


def ours_fields(model: nn.Module) -> dict:
    from offload_tensor import offload_report

    report = offload_report(model)
    pinned = report.pinned_bytes + (measure.allocator_pinned_bytes() or 0)
    fields = dict(pinned_bytes=pinned, streamed_bytes=report.streamed_per_step, resident_bytes=report.resident_bytes,
                  offloaded_bytes=report.offloaded_bytes, summary=report.summary)  # fmt: skip
    stats = getattr(getattr(getattr(model._offload_state, "engine", None), "scheduler", None), "stats", None)
    if stats is not None:
        fields |= dict(scheduler_hits=stats.hits, scheduler_misses=stats.misses, scheduler_copies=stats.copies)
    return fields


def compile_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(graph_breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"])


def fetches_per_step(model, inputs) -> int | None:
    """Calls of the fetch op in one forward (the op counts itself)."""
    try:
        from compile_rules.check import FetchStats
    except ImportError:
        return None
    before = FetchStats.calls
    with torch.no_grad():
        model(**inputs)
    return FetchStats.calls - before


def reference(spec: Spec) -> torch.Tensor | None:
    path = Path(spec.work) / "reference.pt"
    return torch.load(path) if path.exists() else None


# -- resident, ours, diffusers ----------------------------------------------------------------
def resident(spec: Spec, phase: str) -> None:
    s, device = spec.scale, torch.device(spec.device)
    start = time.perf_counter()
    model, inputs = model_and_inputs(spec)
    build_s = time.perf_counter() - start
    model.compile_repeated_blocks(fullgraph=True, backend=s.backend)
    record, out = measure.timed_steps(model, inputs, device, s.warmup, s.steps)
    torch.save(out.cpu(), Path(spec.work) / "reference.pt")
    emit(spec, phase, dict(kind="config", name="resident", method="resident", compile="crb", build_s=build_s,
                           weight_bytes=weight_bytes(model), pinned_bytes=measure.allocator_pinned_bytes() or 0,
                           streamed_bytes=0, **record, **compile_counts()))  # fmt: skip


def ours(spec: Spec, phase: str, prefetches: tuple[int, ...], fp8: bool = False) -> None:
    """Ours at every budget, for each prefetch, compiled once: `set_budget` re-plans without
    wrapping again, and once a resident and a streamed block of each kind ran, nothing
    recompiles; another prefetch is a new wrap of the same model (unwrapped first), whose blocks
    keep their compiled code."""
    from offload_tensor import is_wrapped, unwrap_model

    start = time.perf_counter()
    model, inputs = model_and_inputs(spec)
    total = weight_bytes(model)
    build_s = time.perf_counter() - start
    for prefetch in prefetches:
        start = time.perf_counter()
        if is_wrapped(model):
            unwrap_model(model)
        model = wrap_ours(model, spec, phase, prefetch=prefetch,
                          **(dict(storage_dtype=torch.float8_e4m3fn) if fp8 else {}))  # fmt: skip
        if spec.cuda:
            torch.cuda.empty_cache()  # the weights made on the GPU went to host arenas
        wrap_s = time.perf_counter() - start
        if prefetch == prefetches[0]:
            model.compile_repeated_blocks(fullgraph=True, backend=spec.scale.backend)
        for fraction in (0.0,) if fp8 else BUDGET_FRACTIONS:
            fields = dict(kind="config", name=f"ours_p{prefetch}_b{round(fraction * 100)}" + ("_fp8" if fp8 else ""),
                          method="ours", compile="crb", prefetch=prefetch, storage="fp8_e4m3fn" if fp8 else "bf16",
                          budget_fraction=fraction, weight_bytes=total, build_s=build_s, wrap_s=wrap_s)  # fmt: skip
            try:
                fields |= at_budget(model, inputs, spec, int(fraction * total))
            except Exception as e:  # one budget failing must not hide the others
                fields["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            emit(spec, phase, fields)


def at_budget(model, inputs: dict, spec: Spec, budget: int) -> dict:
    """Steps of a wrapped model at `budget` bytes (0: as wrapped, every group streamed)."""
    from offload_tensor import set_budget

    s, device = spec.scale, torch.device(spec.device)
    replan_s = None
    if budget:
        start = time.perf_counter()
        set_budget(model, budget)
        replan_s = time.perf_counter() - start
    # the first forward at budget 0 compiles; at the first budget with resident groups, their graphs
    record, out = measure.timed_steps(model, inputs, device, 1 if budget else s.warmup, s.steps)
    return dict(budget_bytes=budget, replan_s=replan_s, **record, **ours_fields(model), **compile_counts(),
                **measure.compare(out, reference(spec)), fetches_per_step=fetches_per_step(model, inputs))  # fmt: skip


def diffusers(spec: Spec, phase: str) -> None:
    """diffusers' group offloading, block_level (one block per group) with a copy stream, eager and
    with `compile_repeated_blocks(fullgraph=False)` (its hooks break graphs). On the CPU, without
    streams (diffusers needs a device with streams for them)."""
    s, device = spec.scale, torch.device(spec.device)
    start = time.perf_counter()
    model, inputs = model_and_inputs(spec)
    total = weight_bytes(model)
    model = model.to("cpu")  # diffusers offloads from the CPU copy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=spec.cuda)  # fmt: skip
    wrap_s = time.perf_counter() - start
    ref = reference(spec)
    base = dict(kind="config", method="diffusers", use_stream=spec.cuda, weight_bytes=total, streamed_bytes=total,
                build_s=build_s, wrap_s=wrap_s)  # fmt: skip
    for name, compile_mode in (("diffusers_block_stream", "none"), ("diffusers_block_stream_crb", "crb")):
        fields = dict(base, name=name, compile=compile_mode)
        try:
            if compile_mode == "crb":
                torch._dynamo.reset()
                model.compile_repeated_blocks(fullgraph=False, backend=s.backend)
            record, out = measure.timed_steps(model, inputs, device, s.warmup, s.steps)
            fields |= dict(**record, pinned_bytes=_pinned_parameters(model, measure.allocator_pinned_bytes()),
                           **compile_counts(), **measure.compare(out, ref))  # fmt: skip
        except Exception as e:
            fields["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        emit(spec, phase, fields)


def _pinned_parameters(model: nn.Module, allocator: int | None) -> int:
    """Pinned host bytes of a hook-based offloader: the caching host allocator's count where torch
    reports it (it includes the rounding), else the pinned parameters' bytes."""
    if allocator is not None:
        return allocator
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu" and p.is_pinned())


# -- stress, profile, CUDA-graph probe (the small model) ---------------------------------------
class SpinBefore(nn.Module):
    """A block with a spin before it: outside the compiled block, on the compute stream."""

    def __init__(self, block: nn.Module, spin) -> None:
        super().__init__()
        self.block = block
        self.spin = spin

    def forward(self, *args, **kwargs):
        self.spin()
        return self.block(*args, **kwargs)


def stress(spec: Spec, phase: str) -> None:
    """Forwards of the compiled, fully streamed model with a spin of random length before every
    block, so copies run ahead of the reads of the slots they overwrite; each output is compared
    with the same model's output without spins (bit-equal, or a mismatch)."""
    s, device = spec.scale, torch.device(spec.device)
    model, inputs = model_and_inputs(spec, small=True)
    spin = measure.Spin(device, s.spin_s)
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = SpinBefore(block, spin)
    model = wrap_ours(model, spec, phase, prefetch=1)
    model.compile_repeated_blocks(fullgraph=True, backend=s.backend)
    spin.enabled = False
    _, expected = measure.timed_steps(model, inputs, device, spec.scale.warmup, 1)
    spin.enabled = True
    mismatches, worst = 0, 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(s.stress_forwards):
            out = measure.first_output(model(**inputs))
            if not torch.equal(out, expected):
                mismatches += 1
                worst = max(worst, (out.float() - expected.float()).abs().max().item())
    measure.sync(device)
    emit(spec, phase, dict(kind="stress", forwards=s.stress_forwards, mismatches=mismatches, worst_max_abs_diff=worst,
                           seconds=time.perf_counter() - start, spin=spin.kind, longest_spin_s=s.spin_s,
                           blocks=s.small_double + s.small_single, prefetch=1, **ours_fields(model)))  # fmt: skip


def profile(spec: Spec, phase: str) -> None:
    """One compiled, fully streamed step under the profiler; the trace, gzipped, goes to the
    output folder, its summary to the record."""
    s, device = spec.scale, torch.device(spec.device)
    model, inputs = model_and_inputs(spec, small=True)
    model = wrap_ours(model, spec, phase, prefetch=1)
    model.compile_repeated_blocks(fullgraph=True, backend=s.backend)
    record, _ = measure.timed_steps(model, inputs, device, s.warmup, s.steps)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if spec.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(STEP_RANGE):
            model(**inputs)
            measure.sync(device)
    path = Path(spec.work) / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    with open(path, "rb") as src, gzip.open(Path(spec.out) / "profile-trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    emit(spec, phase, dict(kind="profile", blocks=s.small_double + s.small_single, prefetch=1,
                           step_s_unprofiled=record["step_s"], trace_file="profile-trace.json.gz",
                           **trace.summarize(events, STEP_RANGE), **ours_fields(model)))  # fmt: skip


# torch's artifact loggers (`getArtifactLogger(module, "cudagraphs")` is named module + ".__cudagraphs"):
# where inductor says why it skipped CUDA graphs, and how it partitioned a graph around an op.
CUDAGRAPH_LOGGERS = ("torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.cudagraph_trees.__cudagraphs",
                     "torch._inductor.scheduler.__cudagraphs", "torch._inductor.compile_fx.__perf_hints",
                     "torch._inductor.graph.__perf_hints")  # fmt: skip


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:400])


def cudagraph(spec: Spec, phase: str) -> None:
    """`compile_repeated_blocks(mode="reduce-overhead")` on the offloaded model: what happens, as
    it is (an error, CUDA graphs skipped and why, partitions around the fetches, or graphs that
    replay), and whether the outputs equal those of the same model compiled in the default mode
    (a stale weight replayed would differ far beyond rounding) and run eagerly."""
    from torch._dynamo.utils import counters

    s, device = spec.scale, torch.device(spec.device)
    model, inputs = model_and_inputs(spec, small=True)
    model = wrap_ours(model, spec, phase, prefetch=1)
    with torch.no_grad():
        eager = measure.first_output(model(**inputs))
    model.compile_repeated_blocks(fullgraph=True, backend=s.backend)
    default, compiled = measure.timed_steps(model, inputs, device, s.warmup, s.steps)
    for module in model.modules():  # as compile_rules.check leaves a model: uncompiled
        module._compiled_call_impl = None
    torch._dynamo.reset()
    counters.clear()
    captured = _Messages()
    torch._logging.set_logs(cudagraphs=True, perf_hints=True)
    loggers = [logging.getLogger(name) for name in CUDAGRAPH_LOGGERS]
    for logger in loggers:
        logger.addHandler(captured)
    # inductor takes the mode; another backend (aot_eager in the dry run) ignores it, with a warning
    backend = {} if s.backend == "inductor" else dict(backend=s.backend)
    forwards, error = [], None
    try:
        model.compile_repeated_blocks(fullgraph=True, mode="reduce-overhead", **backend)
        with torch.no_grad():
            for _ in range(s.warmup + s.steps):
                measure.sync(device)
                start = time.perf_counter()
                out = measure.first_output(model(**inputs)).clone()  # a replayed graph reuses its output
                measure.sync(device)
                forwards.append(dict(seconds=time.perf_counter() - start, vs_default=measure.compare(out, compiled),
                                     vs_eager=measure.compare(out, eager)))  # fmt: skip
    except Exception as e:
        error = f"{type(e).__name__}: {str(e)[:600]}"
    finally:
        torch._logging.set_logs()
        for logger in loggers:
            logger.removeHandler(captured)
    inductor = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k or "partition" in k}
    if error:
        outcome = "raised"
    elif inductor.get("cudagraph_skips"):
        outcome = "ran, CUDA graphs skipped"
    elif inductor.get("cudagraph_partitions"):
        outcome = "ran, CUDA graphs between the fetches (graph partitions)"
    else:
        outcome = "ran"
    emit(spec, phase, dict(kind="cudagraph", outcome=outcome, error=error, forwards=forwards,
                           default_step_s=default["step_s"],
                           equal_to_default=bool(forwards) and all(f["vs_default"].get("equal") for f in forwards),
                           inductor_counters=inductor, messages=sorted(set(captured.messages))[:12],
                           graph_partition=getattr(torch._inductor.config, "graph_partition", None),
                           cudagraph_unsafe_tag=hasattr(torch.Tag, "cudagraph_unsafe"),
                           blocks=s.small_double + s.small_single, backend=s.backend, **compile_counts()))  # fmt: skip


# -- training (issue: training adapters) -------------------------------------------------------
def train(spec: Spec, phase: str) -> None:
    """A LoRA training step (r=16 on the attention projections, MSE against a random target) of the
    measured model, `compile_repeated_blocks(fullgraph=True)`: resident, then ours at budgets 0 and
    50% of the weights. Step time, peak device memory over the step, host RSS, and the LoRA
    gradients against the resident model's (bf16, compiled: equal, or how far)."""
    from peft import LoraConfig

    from offload_tensor import set_budget

    s, device = spec.scale, torch.device(spec.device)
    lora = dict(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    reference = None
    for method, fractions in (("resident", (None,)), ("ours", (0.0, 0.5))):
        model, inputs = model_and_inputs(spec)
        total = weight_bytes(model)
        if method == "ours":
            model = wrap_ours(model, spec, phase, prefetch=1)
            if spec.cuda:
                torch.cuda.empty_cache()
        torch.manual_seed(7)
        model.add_adapter(LoraConfig(**lora))
        model.train().compile_repeated_blocks(fullgraph=True, backend=s.backend)
        target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3)).to(device)
        for fraction in fractions:
            name = f"train_{method}" + ("" if fraction is None else f"_b{round(fraction * 100)}")
            fields = dict(kind="train", name=name, method=method, budget_fraction=fraction, weight_bytes=total)
            try:
                if fraction:
                    set_budget(model, int(fraction * total))
                record, grads = _train_steps(model, inputs, target, device, s.warmup, s.steps)
                fields |= record | compile_counts()
                if method == "ours":
                    fields |= ours_fields(model) | _compare_grads(grads, reference)
                else:
                    reference = grads
            except Exception as e:  # one configuration failing must not hide the others
                fields["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            emit(spec, phase, fields)
        del model
        if spec.cuda:
            torch.cuda.empty_cache()


def _train_steps(model, inputs: dict, target, device: torch.device, warmup: int, steps: int):
    times, first, peaks = [], None, []
    for step in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        measure.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = measure.first_output(model(**inputs))
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()
        del out
        measure.sync(device)
        elapsed = time.perf_counter() - start
        first = elapsed if step == 0 else first
        if step >= warmup:
            times.append(elapsed)
            if device.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated(device) - before)
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    record = dict(step_s=statistics.median(times), step_s_all=times, first_step_s=first, lora_tensors=len(grads),
                  peak_vram_rise_bytes=max(peaks) if peaks else None, **measure.host_memory())  # fmt: skip
    return record, grads


def _compare_grads(grads: dict, reference: dict | None) -> dict:
    if reference is None:
        return dict(grads_vs_resident="no reference (the resident step failed)")
    from bench.train import grads_vs

    found = grads_vs(grads, reference)
    if "why" in found:
        return dict(grads_vs_resident=found["why"])
    return dict(grads_equal=found["equal"], grads_max_rel_diff=found["max_rel_diff"])


PHASES = {
    "environment": environment,
    "resident": resident,
    "ours": lambda spec, phase: ours(spec, phase, prefetches=(1, 2)),
    "ours_fp8": lambda spec, phase: ours(spec, phase, prefetches=(1,), fp8=True),
    "diffusers": diffusers,
    "stress": stress,
    "profile": profile,
    "cudagraph": cudagraph,
    "train": train,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase")
    parser.add_argument("spec", help="the Spec as JSON, and `timeout` (seconds) for gpu_tests")
    args = parser.parse_args(argv)
    fields = json.loads(args.spec)
    timeout = fields.pop("timeout", 600)
    spec = Spec(scale=Scale(**fields.pop("scale")), **fields)
    if spec.cuda and not torch.cuda.is_available():
        raise SystemExit("this phase was asked to run on CUDA, but torch sees no GPU here")
    if args.phase == "gpu_tests":
        gpu_tests(spec, args.phase, timeout)
    else:
        PHASES[args.phase](spec, args.phase)


if __name__ == "__main__":
    main()
