"""Measurements a phase takes, on CUDA or, in the dry run, their CPU stand-ins: timed steps,
memory (device peak, pinned host, RSS), outputs against a reference, host-to-device bandwidth,
and the spin that delays compute in the stress.

Every function works on both devices, so the dry run goes through the code that builds the
records of the real one; a figure that has no meaning on the CPU is None or says it is a
stand-in."""

from __future__ import annotations

import random
import resource
import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_output(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else first_output(result[0])


def timed_steps(model, inputs: dict, device: torch.device, warmup: int, steps: int) -> tuple[dict, torch.Tensor]:
    """Run `warmup` forwards (the first one's time kept: it compiles), then `steps` timed ones;
    the peak device memory is that of the timed steps."""
    times, first = [], None
    out = None
    with torch.no_grad():
        for step in range(warmup + steps):
            if step == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            out = first_output(model(**inputs))
            sync(device)
            elapsed = time.perf_counter() - start
            if step == 0:
                first = elapsed
            if step >= warmup:
                times.append(elapsed)
    record = dict(
        step_s=statistics.median(times),
        step_s_all=times,
        first_step_s=first,
        peak_vram_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        **host_memory(),
    )
    return record, out


def host_memory() -> dict:
    import psutil

    return dict(
        rss_bytes=psutil.Process().memory_info().rss,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    )


def allocator_pinned_bytes() -> int | None:
    """Pinned host bytes held by torch's caching host allocator (`tensor.pin_memory()`, what
    diffusers' stream mode uses; rounded up to powers of two), where this torch reports them."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("reserved_bytes.current"))


def compare(out: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """The output against the resident model's: bit-equal, or how far (max abs, relative norm)."""
    if reference is None:
        return dict(vs_resident="no reference (the resident phase did not run)")
    out, reference = out.detach().cpu(), reference.cpu()
    if out.shape != reference.shape:
        return dict(vs_resident=f"shape {tuple(out.shape)} against {tuple(reference.shape)}")
    diff = (out.double() - reference.double()).abs()
    return dict(
        equal=bool(torch.equal(out, reference)),
        max_abs_diff=diff.max().item(),
        rel_diff=(diff.norm() / reference.double().norm().clamp(min=1e-30)).item(),
        finite=bool(torch.isfinite(out).all()),
    )


def h2d_bandwidth(device: torch.device, pinned: bool, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Host-to-device copy bandwidth (median of `repeats` copies of `nbytes`, timed with events).
    Without CUDA: a host-to-host copy of 64 MiB, marked as the stand-in it is."""
    if device.type != "cuda":
        nbytes = 64 << 20
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            rates.append(nbytes / (time.perf_counter() - start))
        return dict(bytes_per_s=statistics.median(rates), nbytes=nbytes, stand_in="host-to-host copy (no GPU)")
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=pinned)
    sync(device)
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=pinned)
        end.record()
        end.synchronize()
        rates.append(nbytes / (start.elapsed_time(end) / 1e3))
    del host, dev
    return dict(bytes_per_s=statistics.median(rates), nbytes=nbytes, all_bytes_per_s=rates)


class Spin:
    """Delays compute before a block by a random time up to `longest_s` (seeded): on CUDA a spin
    kernel (`torch.cuda._sleep`) on the compute stream, so copies run ahead of the reads they
    must wait for; on the CPU a busy wait, the stand-in."""

    def __init__(self, device: torch.device, longest_s: float, seed: int = 0) -> None:
        self.device = device
        self.longest_s = longest_s
        self.rng = random.Random(seed)
        self.enabled = True
        self.cycles_per_s = _sleep_rate(device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if not self.enabled:
            return
        seconds = self.rng.uniform(0, self.longest_s)
        if self.cycles_per_s is not None:
            torch.cuda._sleep(int(seconds * self.cycles_per_s))
        else:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass

    @property
    def kind(self) -> str:
        return "torch.cuda._sleep on the compute stream" if self.cycles_per_s else "busy wait on the CPU (stand-in)"


def _sleep_rate(device: torch.device, cycles: int = 10_000_000) -> float:
    """Cycles per second of `torch.cuda._sleep` on this GPU."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)
