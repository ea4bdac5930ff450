"""What the GPU check runs and against what: its phases with their time estimates and limits, the
model sizes of the real run and of the dry run, and the targets the results are read against.

The time estimates are guesses for an H100/H200 (nothing here has run on a GPU yet); the parent
skips a phase once the time left is below its estimate, so a run always ends with its JSON."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    estimate_s: float  # expected seconds on an H200, imports, building and compiling included
    timeout_s: float  # the child is killed after this many seconds (or when the deadline comes)


# In order of what the targets need first: the resident compute time and our budget-0 step come
# before the peer and the stress; the CUDA-graph probe, the likeliest to crash, comes last.
PHASES = (
    Phase("environment", "environment and host-to-device bandwidth", 15, 90),
    Phase("gpu_tests", "pytest -m gpu", 75, 150),
    Phase("resident", "resident, compiled: the compute time", 45, 150),
    Phase("ours", "ours, budgets 0/25/50/75%, prefetch 1 then 2", 130, 240),
    Phase("diffusers", "diffusers group offloading, block_level + stream", 65, 150),
    Phase("stress", "stress: spin kernels before every block", 25, 120),
    Phase("ours_fp8", "ours, fp8 storage, budget 0", 45, 150),
    Phase("profile", "profiler trace of one compiled offloaded step", 20, 120),
    Phase("cudagraph", "CUDA-graph probe (mode='reduce-overhead')", 40, 120),
    # Last: past the 8 minutes the other phases are estimated to take, it runs where they took
    # less; otherwise it is skipped, and `--phases train` runs it alone.
    Phase("train", "LoRA training step: resident, ours at budgets 0 and 50%", 150, 300),
)
PHASE_NAMES = tuple(p.name for p in PHASES)
DEADLINE_S = 480  # the whole check, on the GPU: 8 minutes
DRY_DEADLINE_S = 170  # the dry run, on a 2-core CPU: under 3 minutes


@dataclass(frozen=True)
class Scale:
    """The scale of a run. `double`/`single`: blocks of the measured model (FLUX.1-dev: 19 and
    38); `small_*`: the model of the stress, the profile and the CUDA-graph probe (the same block
    dimensions and inputs, fewer blocks: what they look at is per block). `backend`: what
    `compile_repeated_blocks` compiles with."""

    dims: str
    double: int
    single: int
    small_double: int
    small_single: int
    image_tokens: int
    text_tokens: int
    warmup: int  # forwards before timing (the first one compiles)
    steps: int  # timed forwards per configuration
    stress_forwards: int
    spin_s: float  # the longest spin before a block in the stress
    backend: str


GPU = Scale("flux-dev", 19, 38, 2, 4, 4096, 512, warmup=2, steps=4, stress_forwards=100, spin_s=2e-3,
            backend="inductor")
# FLUX.1-dev's block counts at a tiny width: budgets as fractions of the weights leave the same
# room for the slots (a block is ~3% of the weights) as in the real run. aot_eager: dynamo and
# AOTAutograd trace as on the GPU (fullgraph, the fetch op, set_budget's graphs), without
# inductor's code generation, which takes ~30 s per set of graphs on 2 cores, cold: five sets
# (resident, ours, fp8, diffusers, reduce-overhead) would not fit in the dry run's 3 minutes.
DRY = Scale("tiny", 19, 38, 2, 4, 64, 16, warmup=2, steps=2, stress_forwards=100, spin_s=2e-4, backend="aot_eager")

BUDGET_FRACTIONS = (0.0, 0.25, 0.5, 0.75)  # of the weight bytes; 0: every group streamed


@dataclass(frozen=True)
class Targets:
    """What the real run's results are read against."""

    step_over_bound: float = 1.10  # a compiled offloaded step, at most this times its bound
    speedup_over_diffusers: float = 1.5  # ours at budget 0 against diffusers block_level + stream
    pinned_over_weight: float = 1.02  # pinned host bytes per weight byte streamed from RAM
    stress_mismatches: int = 0


TARGETS = Targets()
