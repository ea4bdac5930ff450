"""The GPU check, the parent: every phase in a child process of its own, with a timeout and
within one deadline, then JSON, markdown and a short table.

    python -m bench gpu [--out DIR] [--dry-run] [--phases NAME ...] [--deadline SECONDS]

A phase that crashes or runs out of time loses only itself: its child's records are appended as
they are measured, and the parent keeps what came. A phase whose estimate no longer fits in the
time left is skipped ("skipped: out of time"), so the run always ends with its JSON. `--dry-run`
runs the same flow on the CPU at tiny sizes (the test suite runs it, so the flow never rots).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu import report
from bench.gpu.config import DEADLINE_S, DRY, DRY_DEADLINE_S, GPU, PHASE_NAMES, PHASES, TARGETS

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu-check"


def run_phase(name: str, spec: dict, timeout: float, log) -> dict:
    """Run one phase's child, its output appended to `log`; returns how it ended."""
    cmd = [sys.executable, "-m", "bench.gpu.phases", name, json.dumps(spec | {"timeout": max(timeout - 15, 10)})]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        "PYTHONUNBUFFERED": "1"}  # fmt: skip
    if spec["device"] == "cpu":
        # The dry run's ops are tiny: one intra-op thread. With two, every op waits at a barrier
        # for a thread that a busy 2-core machine has descheduled (a 6-block forward: 7 ms with
        # one thread, 540 ms with two beside a test run).
        env["OMP_NUM_THREADS"] = "1"
    log.write(f"\n===== {name} =====\n")
    log.flush()
    start = time.perf_counter()
    # A session of its own: on a timeout the phase and whatever it started (pytest's workers,
    # inductor's compile workers) are ended together.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout)
        status = "ok" if returncode == 0 else f"failed (exit {returncode})"
    except subprocess.TimeoutExpired:
        returncode, status = None, f"timed out after {timeout:.0f} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a finished phase, or the phase itself
        except ProcessLookupError:
            pass
        proc.wait()
    return dict(status=status, returncode=returncode, seconds=time.perf_counter() - start)


def read_records(work: Path, name: str) -> list[dict]:
    path = work / f"{name}.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return records


def last_error(log_path: Path, name: str) -> str | None:
    """The last line of a failed phase's output that looks like an error."""
    text = log_path.read_text(errors="replace").split(f"===== {name} =====")[-1]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Exception" in ln]
    return (errors or lines or [None])[-1]


def check(out: Path, dry_run: bool, phases: list[str], deadline_s: float, work: Path, command: str) -> dict:
    scale = DRY if dry_run else GPU
    device = "cpu" if dry_run else "cuda"
    spec = dict(work=str(work), out=str(out), scale=dataclasses.asdict(scale), device=device)
    began = time.perf_counter()
    log_path = out / "gpu-check.log"
    records: dict[str, list[dict]] = {}
    ran = []
    with log_path.open("w") as log:
        for phase in PHASES:
            if phase.name not in phases:
                continue
            left = deadline_s - (time.perf_counter() - began)
            estimate = phase.estimate_s if not dry_run else 1
            entry = dict(name=phase.name, title=phase.title, estimate_s=phase.estimate_s, timeout_s=phase.timeout_s)
            if left < estimate:
                entry |= dict(status="skipped: out of time", seconds=0.0)
            else:
                entry |= run_phase(phase.name, spec, min(phase.timeout_s, left), log)
                records[phase.name] = read_records(work, phase.name)
                if entry["status"] != "ok":
                    log.flush()
                    entry["error"] = last_error(log_path, phase.name)
            ran.append(entry)
            print(f"[{time.perf_counter() - began:6.1f} s] {phase.name}: {entry['status']} "
                  f"({entry['seconds']:.1f} s, estimate {phase.estimate_s:.0f} s on an H200)", flush=True)  # fmt: skip
    every = [r for rs in records.values() for r in rs]
    status = {p["name"]: p["status"] for p in ran}

    def section(kind: str) -> dict:  # a phase's record, or why there is none (phases are named as their records)
        found = [r for r in every if r.get("kind") == kind]
        if found:
            return found[-1]
        if kind not in status:
            return dict(status="not run (not among --phases)")
        return dict(status=status[kind] if status[kind] != "ok" else "ok, but it wrote no record")

    environment = section("environment")
    configs = report.with_bounds([r for r in every if r.get("kind") == "config"], environment)
    stress = section("stress")
    result = dict(
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dry_run=dry_run,
        deadline_s=deadline_s,
        scale=dataclasses.asdict(scale),
        targets=dataclasses.asdict(TARGETS),
        phases=ran,
        environment=environment,
        gpu_tests=section("gpu_tests"),
        configs=configs,
        correctness=report.correctness(configs, stress),
        stress=stress,
        profile=section("profile"),
        cudagraph=section("cudagraph"),
        train=[r for r in every if r.get("kind") == "train"] or section("train"),
        verdicts=report.verdicts(configs, stress),
    )
    result["wall_s"] = time.perf_counter() - began
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "gpu-check.md").write_text(report.markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the results go (default {DEFAULT_OUT})")
    parser.add_argument("--dry-run", action="store_true", help="the same flow on the CPU at tiny sizes")
    parser.add_argument("--phases", nargs="+", choices=PHASE_NAMES, default=list(PHASE_NAMES),
                        help="run only these phases (a rerun of what an earlier run skipped)")  # fmt: skip
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds for the whole check (default {DEADLINE_S}; dry run {DRY_DEADLINE_S})")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch  # only to refuse early: the phases import it themselves

        if not torch.cuda.is_available():
            raise SystemExit("python -m bench gpu: torch sees no GPU here; --dry-run runs the same flow on the CPU.")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
    work = args.work or Path(tempfile.mkdtemp(prefix="offload_tensor_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = check(args.out, args.dry_run, args.phases, deadline, work, " ".join(["python -m bench gpu", *argv]))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out / 'gpu-check.json'}, {args.out / 'gpu-check.md'} ({result['wall_s']:.0f} s)\n")
    print(report.short_table(result))
