"""Who owns a disk-tier file. A file written from a checkpoint is a cache that later wraps (and
other processes) reuse, so a write never reaches it: the written group moves to a file of its
model's own first. A file written from memory belongs to its wrap alone (a name no other wrap
uses), and is deleted when the model lets go of it. Resident copies of disk groups (a budget on
the CPU) give their writes back to the file before set_budget reads it again."""

import gc

import pytest
import torch

from models import CASES
from offload_tensor import set_budget, unwrap_model, wrap_model_for_offload
from test_checkpoint import meta_like
from test_checkpoint import run as run_case

FLUX = CASES[0]


def run(model):
    return run_case(model, FLUX)


def halved(model):
    return {k: v * 0.5 for k, v in model.state_dict().items()}


@pytest.fixture
def checkpoint(tmp_path):
    FLUX.make().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors"


def test_two_models_from_memory_into_one_folder_keep_their_own_weights(tmp_path):
    torch.manual_seed(1)
    other = FLUX.make()
    for p in other.parameters():
        p.data.normal_()
    plains = [FLUX.make(), other]
    expected = [run(m) for m in plains]
    wrapped = [FLUX.make(), FLUX.make()]
    wrapped[1].load_state_dict(other.state_dict())
    for m in wrapped:
        wrap_model_for_offload(m, device="cpu", offload="disk", disk_path=tmp_path)
    assert [torch.equal(run(m), e) for m, e in zip(wrapped, expected)] == [True, True]
    files = set(tmp_path.glob("*.safetensors"))
    del wrapped, m
    gc.collect()
    assert files and not any(f.exists() for f in files)  # a wrap's own files go with it


def test_a_write_never_reaches_a_checkpoint_cache(checkpoint, tmp_path):
    plain = FLUX.make()
    expected = run(plain)
    a, b = (wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, offload="disk", disk_path=tmp_path) for _ in "ab")
    cache = {f: f.read_bytes() for f in tmp_path.glob("*.safetensors")}
    run(a)  # slots hold the checkpoint's values
    a.load_state_dict(halved(plain))
    plain.load_state_dict(halved(plain))
    assert torch.equal(run(a), run(plain))  # the write landed in a
    assert torch.equal(run(b), expected)  # b, reading the same cache, did not see it
    assert {f: f.read_bytes() for f in cache} == cache  # the cache is as written from the checkpoint
    c = wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, offload="disk", disk_path=tmp_path)
    assert torch.equal(run(c), expected)  # a later wrap reuses the cache: the checkpoint's values
    assert torch.equal(run(a), run(plain))
    assert all(torch.equal(x, y) for x, y in zip(unwrap_model(a).state_dict().values(), plain.state_dict().values()))
    del a
    gc.collect()
    assert set(tmp_path.glob("*.safetensors")) == set(cache)  # a's private copies are gone


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_writes_to_resident_groups_survive_set_budget(source, checkpoint, tmp_path):
    plain = FLUX.make()
    if source == "memory":
        model = wrap_model_for_offload(FLUX.make(), device="cpu", offload="disk", disk_path=tmp_path / "d", budget="1GiB")
    else:
        model = wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, device="cpu", offload="disk",
                                       disk_path=tmp_path / "d", budget="1GiB")  # fmt: skip
    cache = {f: f.read_bytes() for f in (tmp_path / "d").glob("*.safetensors")}
    assert model._offload_state.plan.streamed_bytes == 0  # every group resident: writes land in RAM copies
    model.load_state_dict(halved(plain))
    plain.load_state_dict(halved(plain))
    for budget in ["1GiB", "1MiB", "1GiB"]:  # the same, every group streamed, resident again
        set_budget(model, budget)
        assert torch.equal(run(model), run(plain)), budget
    if source == "checkpoint":
        assert {f: f.read_bytes() for f in cache} == cache
