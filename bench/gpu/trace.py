"""The summary of a profiler trace of one step (torch.profiler's Chrome trace, whose format is
stable across torch releases): is the copy stream busy while compute runs, how much host time
the fetch path takes, and how compute waits for copies.

Reads only events: kernels and host-to-device copies by stream (categories "kernel" and
"gpu_memcpy"), the scheduler's ranges ("offload_tensor.fetch", ".copy", ".wait", recorded while
a profiler records), any op named "offload_tensor::..." (the fetch op, or a later op that
fetches a whole group), and CUDA runtime calls that wait or record events."""

from __future__ import annotations

from collections import Counter, defaultdict

RANGES = ("offload_tensor.fetch", "offload_tensor.copy", "offload_tensor.wait")
OP_PREFIX = "offload_tensor::"
RUNTIME_CALLS = ("cudaStreamWaitEvent", "cudaEventRecord", "cudaEventSynchronize", "cudaStreamSynchronize",
                 "cudaDeviceSynchronize", "cudaMemcpyAsync")  # fmt: skip


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the overlap of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(events: list[dict], step_range: str) -> dict:
    """Figures of one step from Chrome-trace `events` (times in seconds); `step_range` names the
    `record_function` range around the step."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]

    def span(e) -> tuple[float, float]:
        return float(e["ts"]) / 1e6, (float(e["ts"]) + float(e["dur"])) / 1e6

    step = [e for e in complete if e.get("name") == step_range and e.get("cat") != "gpu_user_annotation"]
    kernels_by_stream: dict[object, list] = defaultdict(list)
    h2d_by_stream: dict[object, list] = defaultdict(list)
    for e in complete:
        cat, name = e.get("cat", ""), e.get("name", "")
        stream = (e.get("args") or {}).get("stream")
        if cat == "kernel":
            kernels_by_stream[stream].append(span(e))
        elif cat == "gpu_memcpy" and ("HtoD" in name or "Host to Device" in name):
            h2d_by_stream[stream].append(span(e))
    kernels = union([s for spans in kernels_by_stream.values() for s in spans])
    copies = union([s for spans in h2d_by_stream.values() for s in spans])
    copy_streams = sorted(h2d_by_stream, key=str)
    compute_streams = sorted(kernels_by_stream, key=str)

    ranges = {name: [e for e in complete if e.get("name") == name and e.get("cat") == "user_annotation"]
              for name in RANGES}  # fmt: skip
    ops = Counter()
    op_seconds: Counter = Counter()
    for e in complete:
        if e.get("cat") == "cpu_op" and e.get("name", "").startswith(OP_PREFIX):
            ops[e["name"]] += 1
            op_seconds[e["name"]] += float(e["dur"]) / 1e6
    runtime = Counter(e["name"] for e in complete if e.get("cat") == "cuda_runtime" and e.get("name") in RUNTIME_CALLS)

    step_s = max((float(e["dur"]) / 1e6 for e in step), default=None)
    device_events = kernels + copies
    device_span = (max(b for _, b in device_events) - min(a for a, _ in device_events)) if device_events else None
    fetch_s = sum(float(e["dur"]) for e in ranges["offload_tensor.fetch"]) / 1e6
    summary = dict(
        step_s=step_s,
        device=bool(device_events),
        compute_streams=[str(s) for s in compute_streams],
        copy_streams=[str(s) for s in copy_streams],
        kernel_busy_s=length(kernels) if device_events else None,
        h2d_busy_s=length(copies) if device_events else None,
        h2d_overlapped_by_compute_s=intersection(copies, kernels) if device_events else None,
        h2d_copies=sum(len(v) for v in h2d_by_stream.values()),
        device_span_s=device_span,
        compute_idle_s=(device_span - length(kernels)) if device_events else None,
        fetch_ranges=len(ranges["offload_tensor.fetch"]),
        fetch_host_s=fetch_s,
        fetch_host_fraction_of_step=(fetch_s / step_s) if step_s else None,
        copy_ranges=len(ranges["offload_tensor.copy"]),
        wait_ranges=len(ranges["offload_tensor.wait"]),
        wait_host_s=sum(float(e["dur"]) for e in ranges["offload_tensor.wait"]) / 1e6,
        offload_ops=dict(ops),
        offload_op_host_s={k: round(v, 6) for k, v in op_seconds.items()},
        runtime_calls=dict(runtime),
    )
    if summary["h2d_busy_s"]:
        summary["h2d_overlap_fraction"] = summary["h2d_overlapped_by_compute_s"] / summary["h2d_busy_s"]
    return summary
