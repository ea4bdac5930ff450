"""State: load_state_dict writes into the payload; copy.deepcopy, pickle and torch.save of a wrapped
model work (synchronous engines) or raise a clear error (streaming engines), leaving the original
as it was; a saved state_dict loads where offload_tensor is not installed."""

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from models import CASES, ENGINE_NAMES, engine_for, output

from offload_tensor import OffloadedTensor, is_wrapped, unwrap_model, wrap_model_for_offload

FLUX = CASES[0]


def wrapped(engine, storage_dtype=None):
    return wrap_model_for_offload(FLUX.make(), engine=engine_for(engine), storage_dtype=storage_dtype, prefetch=1)


def run(model, step=0):
    with torch.no_grad():
        return output(model(**FLUX.inputs(step)))


@pytest.mark.parametrize("engine", list(ENGINE_NAMES))
@pytest.mark.parametrize("storage_dtype", [None, torch.float8_e4m3fn], ids=["plain", "fp8"])
def test_load_state_dict_writes_into_the_payload(engine, storage_dtype):
    model, other = wrapped(engine, storage_dtype), FLUX.make()
    run(model)  # an engine that prefetches holds the old weights in its slots now
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5).add_(0.01)
    model.load_state_dict(other.state_dict())
    expected = wrap_model_for_offload(other, storage_dtype=storage_dtype)  # the same encoding, zero-copy
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        assert isinstance(p, OffloadedTensor) and torch.equal(p.payload_value(), q.payload_value()), name
    assert torch.equal(run(model, 1), run(expected, 1))


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": lambda m: torch.load(_saved(m), weights_only=False),
}


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("engine", ["zero-copy", "sync"])
def test_copies_of_a_synchronously_served_model_are_independent_wrapped_models(how, engine):
    model = wrapped(engine)
    expected = run(model)
    twin = COPIES[how](model)
    assert is_wrapped(twin) and all(isinstance(p, OffloadedTensor) for p in twin.parameters())
    assert torch.equal(run(twin), expected)
    with torch.no_grad():  # independent: writing the copy leaves the original alone
        twin.load_state_dict({k: v * 2 for k, v in twin.state_dict().items()})
    assert torch.equal(run(model), expected) and not torch.equal(run(twin), expected)
    unwrap_model(twin)
    assert all(type(p) is torch.nn.Parameter for p in twin.parameters())
    # the original is still wrapped, and its state_dict still hands out plain tensors
    assert all(type(v) is torch.Tensor for v in model.state_dict().values())
    assert torch.equal(run(model), expected)


@pytest.mark.parametrize("how", list(COPIES))
def test_copying_a_streamed_model_is_a_clear_error_and_changes_nothing(how):
    model = wrapped("streaming")
    expected = run(model)
    with pytest.raises(TypeError, match=r"cannot be deep-copied, pickled or saved whole.*state_dict\(\)"):
        COPIES[how](model)
    assert torch.equal(run(model), expected)
    assert model._offload_state.engine.scheduler.stats.misses == 0


_LOAD_WITHOUT_OFFLOAD_TENSOR = """
import sys
sys.modules["offload_tensor"] = None  # any import of it fails: as if it were not installed
sys.modules["compile_rules"] = None
import torch
state = torch.load(sys.argv[1], weights_only=True)
expected = torch.load(sys.argv[2], weights_only=True)
assert state.keys() == expected.keys(), "keys differ"
bad = [k for k in expected if type(state[k]) is not torch.Tensor or not torch.equal(state[k], expected[k])]
assert not bad, bad
print("loaded", len(state))
"""


@pytest.mark.parametrize("engine", list(ENGINE_NAMES))
@pytest.mark.parametrize("storage_dtype", [None, torch.float8_e4m3fn], ids=["plain", "fp8"])
def test_saved_state_dict_loads_without_offload_tensor(engine, storage_dtype, tmp_path):
    model = wrapped(engine, storage_dtype)
    if storage_dtype is None:
        expected = FLUX.make().state_dict()  # the unwrapped model's own weights
    else:  # the values the model computes with, computed the way an unwrapped copy holds them
        expected = unwrap_model(copy.deepcopy(wrapped("zero-copy", storage_dtype))).state_dict()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save(expected, tmp_path / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_OFFLOAD_TENSOR, tmp_path / "state.pt", tmp_path / "expected.pt"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # each tensor saved on its own: a payload in a host arena is not saved with the whole arena
    weight_bytes = sum(v.numel() * v.element_size() for v in expected.values())
    assert (tmp_path / "state.pt").stat().st_size <= 1.05 * weight_bytes + 64 * 1024
