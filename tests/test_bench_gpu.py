"""The GPU check (`python -m bench gpu`): its dry run on the CPU goes through every phase and writes
every section (so the flow never rots before a GPU runs it), the deadline skips phases and still
writes the result, and the verdicts and the trace summary are computed from the figures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu import report, run, trace
from bench.gpu.config import PHASE_NAMES, TARGETS

ROOT = Path(__file__).resolve().parents[1]


def check(out: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "bench", "gpu", "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_every_section(tmp_path):
    # ~105 s on an idle 2-core CPU. A deadline larger than the dry run's own 170 s: a machine
    # busy with other tests must not turn a slow phase into a skipped one here.
    start = time.perf_counter()
    done = check(tmp_path, "--deadline", "800")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert all(section in result for section in report.SECTIONS)
    assert [(p["name"], p["status"]) for p in result["phases"]] == [(name, "ok") for name in PHASE_NAMES], (
        result["phases"], elapsed)
    configs = {c["name"]: c for c in result["configs"]}
    expected = {"resident", "diffusers_block_stream", "diffusers_block_stream_crb", "ours_p1_b0_fp8"} | {
        f"ours_p{p}_b{b}" for p in (1, 2) for b in (0, 25, 50, 75)}
    assert set(configs) == expected and not [c for c in configs.values() if "error" in c]
    for name, c in configs.items():
        assert c["step_s"] > 0 and c["bound_s"] > 0, name
        if name.startswith("ours") and not name.endswith("fp8"):
            assert c["equal"], (name, c["max_abs_diff"])  # bf16 weights fetched from the disk tier, bit-exact
    assert result["stress"]["mismatches"] == 0 and result["stress"]["forwards"] == 100
    assert result["gpu_tests"]["returncode"] == 0 and result["gpu_tests"]["tests"] > 0
    assert result["profile"]["fetch_ranges"] > 0 and sum(result["profile"]["offload_ops"].values()) > 0
    assert result["cudagraph"]["equal_to_default"]
    train = {r["name"]: r for r in result["train"]}
    assert set(train) == {"train_resident", "train_ours_b0", "train_ours_b50"}, train
    assert all(r["step_s"] > 0 and r["lora_tensors"] > 0 for r in train.values()), train
    assert all("grads_max_rel_diff" in train[n] for n in ("train_ours_b0", "train_ours_b50")), train
    assert {v["verdict"] for v in result["verdicts"]} <= {"met", "not met"}
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert "## Targets" in markdown and "Dry run on the CPU" in markdown
    assert (tmp_path / "profile-trace.json.gz").stat().st_size > 0
    assert "ours_p1_b0: compiled offloaded step" in done.stdout  # the short table, printed last


def test_a_deadline_skips_phases_and_still_writes_the_result(tmp_path):
    done = check(tmp_path, "--deadline", "0.5", "--phases", "environment", "resident", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [p["status"] for p in result["phases"]] == ["skipped: out of time"] * 2
    assert all(section in result for section in report.SECTIONS)
    assert result["environment"]["status"] == "skipped: out of time"
    assert result["stress"]["status"] == "not run (not among --phases)"
    assert {v["verdict"] for v in result["verdicts"]} == {"not measured"}
    assert "skipped: out of time" in (tmp_path / "gpu-check.md").read_text()


def _config(name, step_s, **fields):
    return dict(name=name, method=name.split("_")[0], step_s=step_s, weight_bytes=100, **fields)


def test_verdicts_are_computed_from_the_figures():
    env = {"h2d_pinned": {"bytes_per_s": 100.0}}
    configs = report.with_bounds([
        _config("resident", 1.0, streamed_bytes=0, pinned_bytes=0),
        _config("ours_p1_b0", 2.1, streamed_bytes=200, pinned_bytes=101),  # bound: 200 / 100 = 2 s
        _config("ours_p1_b50", 1.2, streamed_bytes=50, pinned_bytes=50),  # bound: compute, 1 s
        _config("diffusers_block_stream", 3.3, streamed_bytes=100, pinned_bytes=128),
    ], env)  # fmt: skip
    by_name = {c["name"]: c for c in configs}
    assert by_name["ours_p1_b0"]["bound_s"] == 2.0 and by_name["ours_p1_b50"]["bound_s"] == 1.0
    rows = {v["target"]: v for v in report.verdicts(configs, {"mismatches": 0, "forwards": 100})}
    head = rows[f"ours_p1_b0: compiled offloaded step <= {TARGETS.step_over_bound:.2f} x bound"]
    assert head["verdict"] == "met" and head["measured"] == pytest.approx(1.05)
    every = rows[f"every ours config: step <= {TARGETS.step_over_bound:.2f} x bound"]
    assert every["verdict"] == "not met" and "ours_p1_b50" in every["shown"]
    speedup = rows[f"ours_p1_b0 >= {TARGETS.speedup_over_diffusers:.1f} x faster than diffusers_block_stream"]
    assert speedup["verdict"] == "met" and speedup["measured"] == pytest.approx(3.3 / 2.1)
    assert rows[f"ours_p1_b0 >= {TARGETS.speedup_over_diffusers:.1f} x faster than diffusers_block_stream_crb"][
        "verdict"] == "not measured"
    assert rows[f"ours_p1_b0: pinned / weight <= {TARGETS.pinned_over_weight:.2f}"]["verdict"] == "met"
    assert rows["stress: 0 mismatches"]["verdict"] == "met"
    assert report.verdicts(configs, {"mismatches": 1, "forwards": 100})[-1]["verdict"] == "not met"


def test_trace_summary_measures_copies_under_compute():
    def event(cat, name, ts, dur, stream=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [
        event("user_annotation", "bench.step", 0, 1000),
        event("kernel", "gemm", 100, 300, stream=7),
        event("kernel", "gemm", 500, 300, stream=7),
        event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 300, 400, stream=20),  # 300-700: 300 us under kernels
        event("user_annotation", "offload_tensor.fetch", 10, 20),
        event("user_annotation", "offload_tensor.wait", 12, 2),
        event("cpu_op", "offload_tensor::fetch", 11, 15),
        event("cpu_op", "offload_tensor::fetch_group", 40, 5),  # any op of ours counts
        event("cuda_runtime", "cudaStreamWaitEvent", 13, 1),
    ]
    s = trace.summarize(events, "bench.step")
    assert s["step_s"] == pytest.approx(1e-3)
    assert s["h2d_busy_s"] == pytest.approx(400e-6) and s["h2d_overlapped_by_compute_s"] == pytest.approx(300e-6)
    assert s["h2d_overlap_fraction"] == pytest.approx(0.75) and s["copy_streams"] == ["20"]
    assert s["compute_idle_s"] == pytest.approx(100e-6)  # 100-800 us spanned, 600 us of kernels
    assert s["fetch_ranges"] == 1 and s["wait_ranges"] == 1
    assert s["offload_ops"] == {"offload_tensor::fetch": 1, "offload_tensor::fetch_group": 1}
    assert s["runtime_calls"] == {"cudaStreamWaitEvent": 1}


def test_phases_are_the_ones_the_child_knows():
    from bench.gpu import phases

    assert set(PHASE_NAMES) == set(phases.PHASES) | {"gpu_tests"}
    assert run.PHASES and run.DEFAULT_OUT.parent.name == "results"
