"""The `offload-tensor` command."""

from __future__ import annotations

import argparse
import logging

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload-tensor", description="Offloaded, compiled PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="tiny Flux: plain vs wrapped, eager vs compile_repeated_blocks")
    demo.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    demo.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    demo.add_argument("--fp8", action="store_true", help="store weights in fp8 (float8_e4m3fn)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "demo":
        from offload_tensor.demo import run

        run(device=args.device, steps=args.steps, storage_dtype=torch.float8_e4m3fn if args.fp8 else None)


if __name__ == "__main__":
    main()
