import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import offload_tensor.ops as ops  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated():
    """Each test starts with fresh dynamo caches and no engine left registered by another."""
    torch._dynamo.reset()
    yield
    ops._engines.clear()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.double(), approx.double()
    return (10 * torch.log10(reference.pow(2).sum() / (approx - reference).pow(2).sum())).item()
