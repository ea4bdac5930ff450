"""The `offload-tensor` command (also `python -m offload_tensor`).

`--help` and `--version` import nothing heavy (no torch). Every bad input ends with exit status 2
and one line that says what to do; no traceback (a bug keeps its traceback).
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  offload-tensor plan --model flux-dev --budget 12GiB --ram 32GiB
  offload-tensor plan --config transformer/config.json --budget 16GiB --fp8
  offload-tensor demo                      # CUDA when there is one, else the CPU (disk tier)
  offload-tensor bench --steps 5
"""
MODELS = ("flux-dev", "wan2.1-14b", "flux-tiny", "wan-tiny")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("offload-tensor")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="offload-tensor",
        description="Run PyTorch models larger than GPU memory, offloaded and compiled.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"offload-tensor {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,demo,bench}", parser_class=_Parser)

    plan = commands.add_parser("plan", help="what a model needs at a VRAM budget: resident, streamed, per-step bytes")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=MODELS, help="a known model (transformer of FLUX.1-dev, Wan2.1 14B, ...)")
    source.add_argument("--config", metavar="CONFIG.json", help="a diffusers model's config.json (transformer/...)")
    plan.add_argument("--budget", help="device memory for weights, e.g. 12GiB (default: nothing resident)")
    plan.add_argument("--ram", help="host RAM for weights, e.g. 32GiB (default: this machine's)")
    plan.add_argument("--device", default="cuda", help="the compute device the plan is for (default: cuda)")
    plan.add_argument("--offload", default="cpu", choices=("cpu", "disk"), help="where streamed weights live")
    plan.add_argument("--dtype", default="bfloat16", help="weight dtype (default: bfloat16)")
    plan.add_argument("--fp8", action="store_true", help="store matrices in fp8 (float8_e4m3fn)")
    plan.add_argument("--prefetch", type=int, default=1, help="groups fetched ahead (default: 1)")
    plan.add_argument("--granularity", default="block", choices=("block", "leaf"))
    plan.add_argument(
        "--bandwidth", help="host-to-device (or disk) bandwidth, e.g. 25GB (default: measured if possible)"
    )

    demo = commands.add_parser("demo", help="tiny Flux: plain vs wrapped, eager vs compile_repeated_blocks")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    demo.add_argument("--steps", type=int, default=20, help="timed steps per configuration (>= 1)")
    demo.add_argument("--fp8", action="store_true", help="store weights in fp8 (float8_e4m3fn)")

    bench = commands.add_parser("bench", help="measure bandwidth and step time of a model, plain and offloaded")
    bench.add_argument("--model", default="flux-tiny", choices=("flux-tiny", "wan-tiny"))
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per configuration (>= 1)")
    return parser


# Libraries the commands import print warnings about their own optional parts when they load (torchao
# on a machine without its CUDA kernels, torch's pytree registrations, diffusers' dtype advice): noise
# for someone who asked for a plan or a demo, so the commands show only their errors.
_QUIET = ("torchao", "torch.utils._pytree", "diffusers", "transformers")


def _quiet() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # they set their loggers' levels on import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


# Options that take a size. argparse takes a value that starts with "-" for an option unless it is a
# plain negative number, so `--budget -5GiB` would be "expected one argument"; `_sizes_as_values`
# hands such a value to its option, which then says that it is negative, as `--budget=-5GiB` does.
_SIZE_OPTIONS = ("--budget", "--ram", "--bandwidth")


def _sizes_as_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _SIZE_OPTIONS and arg.startswith("-") and not arg.startswith("--"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(_sizes_as_values(sys.argv[1:] if argv is None else argv))
    _quiet()
    try:
        if args.command == "plan":
            _plan(args)
        elif args.command == "demo":
            _check_steps(args.steps)
            import torch

            from offload_tensor.demo import run

            run(device=_device(args.device), steps=args.steps, storage_dtype=torch.float8_e4m3fn if args.fp8 else None)
        elif args.command == "bench":
            _check_steps(args.steps)
            from offload_tensor.demo import bench

            bench(model=args.model, device=_device(args.device), steps=args.steps)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError) as e:  # bad input and the machine's limits: our errors name the problem and the fix
        # (anything else is a bug, shown with its traceback)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"offload-tensor {args.command}: error: {first}", file=sys.stderr)
        sys.exit(2)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"--steps {steps}: use a number of steps >= 1.")


def _device(device: str | None) -> str:
    """The device to run on: validated before any model is built."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device}: use cuda, cuda:N or cpu.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    return device


def _plan(args) -> None:
    import torch

    from offload_tensor.catalog import meta_model
    from offload_tensor.pipeline import plan
    from offload_tensor.policy import parse_bandwidth, parse_bytes

    for name, parse in (("budget", parse_bytes), ("ram", parse_bytes), ("bandwidth", parse_bandwidth)):
        if getattr(args, name) is not None:  # before the model is built
            parse(getattr(args, name), f"--{name}")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype {args.dtype}: not a torch dtype; use bfloat16, float16 or float32.")
    model = meta_model(args.model or args.config, dtype)
    result = plan(
        model,
        budget=args.budget,
        ram=args.ram,
        bandwidth=args.bandwidth,
        device=args.device,
        offload=args.offload,
        storage_dtype=torch.float8_e4m3fn if args.fp8 else None,
        prefetch=args.prefetch,
        granularity=args.granularity,
    )
    print(result.table())


if __name__ == "__main__":
    main()
