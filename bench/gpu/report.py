"""From the phases' records to the result: each configuration's bound and ratios, the verdicts
against the targets (computed from the figures, never written in), the markdown, and the short
table printed last.

The bound of a step is `max(compute, streamed bytes / bandwidth)`: compute is the resident
compiled step (the same model with every weight on the GPU), bandwidth the pinned host-to-device
copy rate measured in the environment phase."""

from __future__ import annotations

from bench.gpu.config import TARGETS

SECTIONS = ("environment", "gpu_tests", "configs", "correctness", "stress", "profile", "cudagraph", "train", "verdicts")
HEADLINE = "ours_p1_b0"  # ours, compiled, budget 0 (every group streamed), prefetch 1
PEERS = ("diffusers_block_stream", "diffusers_block_stream_crb")


def with_bounds(configs: list[dict], environment: dict) -> list[dict]:
    """Each configuration with its bound, step/bound and pinned/weight."""
    compute = next((c["step_s"] for c in configs if c.get("name") == "resident" and "step_s" in c), None)
    bandwidth = (environment.get("h2d_pinned") or {}).get("bytes_per_s")
    out = []
    for c in configs:
        c = dict(c)
        if "step_s" in c and compute is not None:
            transfer = c.get("streamed_bytes", 0) / bandwidth if bandwidth else None
            c["compute_s"] = compute
            c["transfer_s"] = transfer
            c["bound_s"] = max(compute, transfer or 0.0)
            c["step_over_bound"] = c["step_s"] / c["bound_s"]
        if c.get("weight_bytes") and c.get("pinned_bytes") is not None:
            c["pinned_over_weight"] = c["pinned_bytes"] / c["weight_bytes"]
        out.append(c)
    return out


def _verdict(measured: float | None, ok) -> str:
    return "not measured" if measured is None else ("met" if ok(measured) else "not met")


def verdicts(configs: list[dict], stress: dict) -> list[dict]:
    """The targets, each with the figure it is read against and whether it is met."""
    by_name = {c["name"]: c for c in configs if "step_s" in c}
    head = by_name.get(HEADLINE, {})
    rows = []
    ratio = head.get("step_over_bound")
    rows.append(dict(target=f"{HEADLINE}: compiled offloaded step <= {TARGETS.step_over_bound:.2f} x bound",
                     measured=ratio, shown=f"{ratio:.2f} x" if ratio is not None else "-",
                     verdict=_verdict(ratio, lambda r: r <= TARGETS.step_over_bound)))  # fmt: skip
    ours = [c for c in by_name.values() if c.get("method") == "ours" and "step_over_bound" in c]
    worst = max(ours, key=lambda c: c["step_over_bound"], default=None)
    rows.append(dict(target=f"every ours config: step <= {TARGETS.step_over_bound:.2f} x bound",
                     measured=worst and worst["step_over_bound"],
                     shown=f"worst {worst['step_over_bound']:.2f} x ({worst['name']})" if worst else "-",
                     verdict=_verdict(worst and worst["step_over_bound"],
                                      lambda r: r <= TARGETS.step_over_bound)))  # fmt: skip
    for peer in PEERS:
        speedup = by_name[peer]["step_s"] / head["step_s"] if peer in by_name and head else None
        rows.append(dict(target=f"{HEADLINE} >= {TARGETS.speedup_over_diffusers:.1f} x faster than {peer}",
                         measured=speedup, shown=f"{speedup:.2f} x" if speedup is not None else "-",
                         verdict=_verdict(speedup, lambda r: r >= TARGETS.speedup_over_diffusers)))  # fmt: skip
    pinned = head.get("pinned_over_weight")
    rows.append(dict(target=f"{HEADLINE}: pinned / weight <= {TARGETS.pinned_over_weight:.2f}", measured=pinned,
                     shown=f"{pinned:.3f}" if pinned is not None else "-",
                     verdict=_verdict(pinned, lambda r: r <= TARGETS.pinned_over_weight)))  # fmt: skip
    mismatches = stress.get("mismatches")
    rows.append(dict(target=f"stress: {TARGETS.stress_mismatches} mismatches", measured=mismatches,
                     shown=f"{mismatches} of {stress.get('forwards')}" if mismatches is not None else "-",
                     verdict=_verdict(mismatches, lambda m: m <= TARGETS.stress_mismatches)))  # fmt: skip
    return rows


def correctness(configs: list[dict], stress: dict) -> dict:
    """Every offloaded configuration's output against the resident model's."""
    rows = []
    for c in configs:
        if c.get("method") == "resident":
            continue
        row = {k: c.get(k) for k in ("name", "equal", "max_abs_diff", "rel_diff", "finite", "vs_resident", "error")}
        rows.append({k: v for k, v in row.items() if v is not None})
    return dict(configs=rows, stress={k: stress.get(k) for k in ("forwards", "mismatches", "worst_max_abs_diff")})


# -- markdown -----------------------------------------------------------------------------------
def _gb(n) -> str:
    return f"{n / 1e9:.2f}" if isinstance(n, (int, float)) else "-"


def _bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _s(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def _mark(value: float | None, ok: bool) -> str:
    return "-" if value is None else f"{value:.2f} ({'met' if ok else 'not met'})"


def _vs_resident(c: dict) -> str:
    if "equal" not in c:
        return c.get("vs_resident", "-")
    return "equal" if c["equal"] else f"max {c['max_abs_diff']:.2e}, rel {c['rel_diff']:.1e}"


def markdown(result: dict) -> str:
    env = result["environment"]
    dry = result["dry_run"]
    lines = [f"# GPU check: {env.get('device', 'unknown device')}", ""]
    if dry:
        lines += ["**Dry run on the CPU** (a tiny Flux-shaped model, the disk tier standing in for pinned RAM): "
                  "the figures check the flow, not the targets.", ""]  # fmt: skip
    pinned, pageable = env.get("h2d_pinned") or {}, env.get("h2d_pageable") or {}
    lines += [
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, driver {env.get('driver')}, Python {env.get('python')}; "
        f"diffusers {(env.get('packages') or {}).get('diffusers')}; {env.get('cpu_cores')} CPU cores, "
        f"{_gb(env.get('ram_bytes'))} GB RAM, {_gb(env.get('device_memory_bytes'))} GB device memory.",
        f"Host-to-device: pinned {_s((pinned.get('bytes_per_s') or 0) / 1e9, 1)} GB/s, pageable "
        f"{_s((pageable.get('bytes_per_s') or 0) / 1e9, 1)} GB/s"
        + (f" ({pinned['stand_in']})" if pinned.get("stand_in") else "")
        + (f"; the library's measured_bandwidth: {env['library_measured_bandwidth'] / 1e9:.1f} GB/s"
           if env.get("library_measured_bandwidth") else "") + ".",
        f"`{result['command']}` on {result['date']}: {result['wall_s']:.0f} s of {result['deadline_s']} s.",
        "",
        "## Phases",
        "",
        "| phase | status | seconds | estimate s (H200) |",
        "|---|---|---:|---:|",
    ]  # fmt: skip
    for p in result["phases"]:
        lines.append(f"| {p['name']} | {p['status']} | {_s(p.get('seconds'), 1)} | {p['estimate_s']:.0f} |")
    sizes = result["scale"]
    configs = result["configs"]
    weights = next((c["weight_bytes"] for c in configs if c.get("weight_bytes")), None)
    lines += [
        "",
        f"## Step time: Flux-shaped ({sizes['dims']}, {sizes['double']} double + {sizes['single']} single blocks, "
        f"{_bytes(weights)} of bf16 weights), {sizes['image_tokens']} image + {sizes['text_tokens']} text tokens",
        "",
        f"Bound = max(compute, streamed bytes / pinned bandwidth). Targets: step/bound <= {TARGETS.step_over_bound}, "
        f"pinned/weight <= {TARGETS.pinned_over_weight} (ours), {TARGETS.speedup_over_diffusers} x faster than "
        "diffusers.",
        "",
        "| config | step s | bound s | step / bound | speedup vs diffusers block+stream | peak VRAM | pinned "
        "| pinned / weight | streamed / step | host RSS | output vs resident |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    peer = next((c for c in configs if c["name"] == PEERS[0] and "step_s" in c), None)
    for c in configs:
        if "step_s" not in c:
            lines.append(f"| {c['name']} | failed: {c.get('error', 'no figure')[:120]} | | | | | | | | | |")
            continue
        ours = c.get("method") == "ours"
        ratio = c.get("step_over_bound")
        step_cell = _mark(ratio, ratio is not None and ratio <= TARGETS.step_over_bound) if ours else _s(ratio, 2)
        pinned_ratio = c.get("pinned_over_weight")
        pin_cell = _mark(pinned_ratio, pinned_ratio is not None and pinned_ratio <= TARGETS.pinned_over_weight) \
            if ours else _s(pinned_ratio, 2)
        speedup = peer["step_s"] / c["step_s"] if peer else None
        speed_cell = _mark(speedup, speedup is not None and speedup >= TARGETS.speedup_over_diffusers) \
            if ours else _s(speedup, 2)
        lines.append(
            f"| {c['name']} | {_s(c['step_s'])} | {_s(c.get('bound_s'))} | {step_cell} | {speed_cell} | "
            f"{_bytes(c.get('peak_vram_bytes'))} | {_bytes(c.get('pinned_bytes'))} | {pin_cell} | "
            f"{_bytes(c.get('streamed_bytes'))} | {_bytes(c.get('rss_bytes'))} | {_vs_resident(c)} |"
        )
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {v['target']} | {v['shown']} | {v['verdict']} |" for v in result["verdicts"]]
    lines += _tests(result["gpu_tests"]) + _stress(result["stress"]) + _profile(result["profile"])
    lines += _cudagraph(result["cudagraph"]) + _train(result["train"])
    return "\n".join(lines) + "\n"


def _status(section: dict) -> list[str]:
    return [f"Not measured: {section['status']}."] if "status" in section else []


def _tests(t: dict) -> list[str]:
    lines = ["", "## pytest -m gpu", ""] + _status(t)
    if "status" in t:
        return lines
    lines.append(f"`{t.get('command')}`: {t.get('passed', '-')} passed, {t.get('failures', '-')} failed, "
                 f"{t.get('errors', '-')} errors, {t.get('skipped', '-')} skipped in {_s(t.get('seconds'), 0)} s"
                 + (" (timed out)" if t.get("timed_out") else "") + f". Last line: `{t.get('last_line', '')}`")
    lines += [f"- {f}" for f in t.get("failed", [])[:30]]
    return lines


def _stress(s: dict) -> list[str]:
    lines = ["", "## Stress", ""] + _status(s)
    if "status" not in s:
        lines.append(f"{s['forwards']} compiled forwards of a Flux-shaped model ({s['blocks']} blocks, budget 0, "
                     f"prefetch {s['prefetch']}) with a spin of up to {s['longest_spin_s'] * 1e3:.1f} ms before every "
                     f"block ({s['spin']}), each output compared with the same model's without spins: "
                     f"**{s['mismatches']} mismatches** (target {TARGETS.stress_mismatches}); scheduler misses "
                     f"{s.get('scheduler_misses', '-')}; {s['seconds']:.1f} s.")  # fmt: skip
    return lines


def _profile(p: dict) -> list[str]:
    lines = ["", "## Profile of one compiled offloaded step", ""] + _status(p)
    if "status" in p:
        return lines
    lines.append(f"Flux-shaped model with {p['blocks']} blocks, budget 0, prefetch {p['prefetch']}; trace in "
                 f"`{p['trace_file']}`. Step {_s(p['step_s_unprofiled'])} s unprofiled, {_s(p.get('step_s'))} s "
                 "profiled.")  # fmt: skip
    if p.get("device"):
        lines.append(
            f"- Copy stream busy while compute runs: {_s(p.get('h2d_overlapped_by_compute_s'))} s of "
            f"{_s(p.get('h2d_busy_s'))} s of host-to-device copies overlap kernels "
            f"({_s((p.get('h2d_overlap_fraction') or 0) * 100, 0)}%); {p['h2d_copies']} copies on streams "
            f"{', '.join(p['copy_streams'])}, kernels on {', '.join(p['compute_streams'])}."
        )
        lines.append(f"- Compute idle inside the step (waiting for copies or for the host): "
                     f"{_s(p.get('compute_idle_s'))} s of {_s(p.get('device_span_s'))} s.")  # fmt: skip
    else:
        lines.append("- Copy stream / compute overlap: n/a on the CPU (no device timeline).")
    lines.append(f"- Host time in the fetch path: {_s(p['fetch_host_s'], 4)} s in {p['fetch_ranges']} fetches "
                 f"({_s((p.get('fetch_host_fraction_of_step') or 0) * 100, 1)}% of the step); "
                 f"{p['copy_ranges']} copies issued; ops: {p.get('offload_ops') or '-'}.")  # fmt: skip
    lines.append(f"- Event waits: {p['wait_ranges']} waits ({_s(p['wait_host_s'], 4)} s on the host); runtime calls "
                 f"{p.get('runtime_calls') or '-'}.")  # fmt: skip
    return lines


def _cudagraph(g: dict) -> list[str]:
    lines = ["", "## CUDA-graph probe: compile_repeated_blocks(mode=\"reduce-overhead\")", ""] + _status(g)
    if "status" in g:
        return lines
    lines.append(f"Outcome: **{g['outcome']}**" + (f": `{g['error']}`" if g.get("error") else "")
                 + f" (Flux-shaped model with {g['blocks']} blocks, budget 0, prefetch 1, backend {g['backend']}"
                 + ("; only inductor takes the mode" if g["backend"] != "inductor" else "") + ").")  # fmt: skip
    if g.get("forwards"):
        times = ", ".join(_s(f["seconds"]) for f in g["forwards"])
        worst = max((f["vs_default"].get("max_abs_diff") or 0.0) for f in g["forwards"])
        lines.append(f"- Forwards (s): {times}; the default mode's step: {_s(g.get('default_step_s'))} s. Outputs "
                     f"bit-equal to the default mode's: {g['equal_to_default']} (largest difference {worst:.2e}).")
    lines.append(f"- inductor counters: {g.get('inductor_counters') or '{}'}; graph_partition "
                 f"{g.get('graph_partition')}; fetch op tagged cudagraph_unsafe: {g.get('cudagraph_unsafe_tag')}.")
    lines += [f"- log: {m}" for m in g.get("messages", [])[:8]]
    lines.append("- What the engine needs for captured copies: bench/gpu/README.md, \"CUDA graphs\".")
    return lines


def _train(rows) -> list[str]:
    lines = ["", "## LoRA training step (compile_repeated_blocks)", ""]
    if isinstance(rows, dict):
        return lines + _status(rows)
    lines += ["| config | step s | x resident | peak VRAM rise over the step | host RSS | LoRA grads vs resident |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    resident = next((r for r in rows if r.get("method") == "resident" and "step_s" in r), None)
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['name']} | failed: {r.get('error', 'no figure')[:120]} | | | | |")
            continue
        ratio = r["step_s"] / resident["step_s"] if resident else None
        if r.get("method") == "resident":
            grads = "-"
        elif "grads_equal" in r:
            grads = "equal" if r["grads_equal"] else f"max rel {r['grads_max_rel_diff']:.1e}"
        else:
            grads = r.get("grads_vs_resident", "-")
        lines.append(f"| {r['name']} | {_s(r['step_s'])} | {_s(ratio, 2)} | {_bytes(r.get('peak_vram_rise_bytes'))} | "
                     f"{_bytes(r.get('rss_bytes'))} | {grads} |")  # fmt: skip
    return lines


def short_table(result: dict) -> str:
    """The few lines printed last: phases and verdicts."""
    rows = [("phase", "status", "s")] + [(p["name"], p["status"], _s(p.get("seconds"), 0)) for p in result["phases"]]
    rows += [("", "", "")] + [(v["target"], v["verdict"], v["shown"]) for v in result["verdicts"]]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}" for a, b, c in rows)
