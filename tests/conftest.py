import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import offload_tensor.ops as ops

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the machine's cores (`-n 2` on 2 cores): one intra-op thread each, and
    # for the processes tests start. Two threads per worker wait at every op's barrier for a
    # thread the other worker's descheduled (a tiny 6-block Flux forward: 7 ms vs 540 ms).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated():
    """Each test starts with fresh dynamo caches and no engine left registered by another."""
    torch._dynamo.reset()
    yield
    ops._engines.clear()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.double(), approx.double()
    return (10 * torch.log10(reference.pow(2).sum() / (approx - reference).pow(2).sum())).item()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size, and `readonly(folder)` to remount it
    read-only: a real full disk and a real read-only file system (root only; skipped where mount
    is not allowed). Unmounted after the test."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode:
            pytest.skip("mounting a tmpfs is not allowed here (needs root)")
        mounted.append(folder)
        return folder

    def readonly(folder: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)

    mount.readonly = readonly
    yield mount
    import gc

    gc.collect()  # models mapping files there
    for folder in mounted:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(folder)], check=True, capture_output=True)
