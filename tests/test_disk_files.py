"""Who owns a disk-tier file. A file written from a checkpoint is a cache that later wraps (and
other processes) reuse, so a write never reaches it: the written group moves to a file of its
model's own first. A file written from memory belongs to its wrap alone (a name no other wrap
uses), and is deleted when the model lets go of it. Resident copies of disk groups (a budget on
the CPU) give their writes back to the file before set_budget reads it again."""

import gc

import pytest
import torch
from models import CASES
from test_checkpoint import meta_like
from test_checkpoint import run as run_case

from offload_tensor import set_budget, unwrap_model, wrap_model_for_offload
from offload_tensor.checkpoint import CheckpointError

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
    a, b = (
        wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, offload="disk", disk_path=tmp_path) for _ in "ab"
    )
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
        model = wrap_model_for_offload(
            FLUX.make(), device="cpu", offload="disk", disk_path=tmp_path / "d", budget="1GiB"
        )
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


def _flip_a_byte_of_values(path):
    """A byte in the middle of a file's values (not its header) changed, as bit rot or a stray write
    would: the high byte of an fp32 value."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    at = header + (len(data) - header) // 2 // 4 * 4 + 3
    data[at] ^= 0x7F
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("read", ["forward", "compiled", "state_dict", "resident", "write"])
def test_a_corrupted_cache_is_refused_before_its_values_are_used(read, checkpoint, tmp_path):
    """Whichever way a cache's bytes are first read in a process (streamed for a forward, through
    the memory map for a state dict or a write, into RAM for a resident group), they are checked
    against the checksum written with the file: an error naming it, never a wrong output."""
    wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, offload="disk", disk_path=tmp_path)
    victim = max(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    _flip_a_byte_of_values(victim)
    if read == "resident":  # a group resident in RAM is read while wrapping
        with pytest.raises(CheckpointError, match=f"{victim.name} is corrupted"):
            wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, device="cpu", offload="disk",
                                   disk_path=tmp_path, budget="1GiB")  # fmt: skip
        return
    model = wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, offload="disk", disk_path=tmp_path)
    with pytest.raises(CheckpointError, match=f"{victim.name} is corrupted"):
        if read == "forward":
            run(model)
        elif read == "compiled":
            run(torch.compile(model, fullgraph=True))
        elif read == "state_dict":
            model.state_dict()
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(2)  # every group is written, so the damaged one too
    if read == "forward":  # the engine is not left half-served: the next forward says it again
        with pytest.raises(CheckpointError, match="corrupted"):
            run(model)


def _linears(n: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)]).eval()


def test_a_full_disk_is_refused_before_anything_is_written(tmpfs):
    """Wrapping 32 MiB into a 20 MiB file system: an error naming the folder, the bytes needed and
    free, before the first file; the model stays as it was."""
    folder = tmpfs("20m") / "w"
    model = _linears(8, 1024)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match=rf"32\.[0-9] MiB, to {folder}, which has 20\.0 MiB free"):
        wrap_model_for_offload(model, device="cpu", offload="disk", disk_path=folder)
    assert not list(folder.iterdir())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = _linears(4, 1024)  # 16 MiB fit
    wrap_model_for_offload(model, device="cpu", offload="disk", disk_path=folder)
    assert torch.equal(model(torch.ones(2, 1024)), _linears(4, 1024)(torch.ones(2, 1024)))


def test_a_valid_cache_in_a_read_only_folder_is_used_and_writes_are_refused(tmpfs, tmp_path):
    """A cache on a read-only volume is read where it is; a write into one of its weights, which
    would need a private copy beside it, is refused before anything changed; a cache that must be
    written again there is an error naming the folder."""
    from safetensors.torch import save_file

    from offload_tensor import RefusedOpError

    plain = _linears(3, 64)
    checkpoint = tmp_path / "model.safetensors"
    save_file(plain.state_dict(), checkpoint)
    volume = tmpfs("10m")

    def wrapped(ckpt=checkpoint):
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = _linears(3, 64)
        return wrap_model_for_offload(model, device="cpu", checkpoint=ckpt, offload="disk", disk_path=volume / "cache")

    wrapped()
    gc.collect()
    tmpfs.readonly(volume)
    model = wrapped()
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        with pytest.raises(RefusedOpError, match="writable disk_path"):
            model[0].weight.mul_(2)
        assert torch.equal(model(x), plain(x))  # nothing changed
    assert torch.equal(model.state_dict()["0.weight"], plain[0].weight)
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in plain.state_dict().items()}, other)
    with pytest.raises(OSError, match=f"disk_path {volume / 'cache'} is not writable"):
        wrapped(other)


_HOLD = """
import sys, time, torch
from offload_tensor import wrap_model_for_offload
m = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
wrap_model_for_offload(m, device="cpu", offload="disk", disk_path=sys.argv[1])
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_files_of_processes_that_died_are_removed_by_the_next_wrap(tmp_path, caplog):
    """kill -9 leaves a model's files behind; the next wrap into the folder removes them (and says
    so), and leaves those of a process that still runs."""
    import signal
    import subprocess
    import sys

    def start():
        p = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), "600"], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        return p

    dead, alive = start(), start()
    try:
        dead.kill()
        dead.wait()
        left = sorted(tmp_path.iterdir())
        assert len(left) == 8  # 4 groups each
        with caplog.at_level("WARNING", logger="offload_tensor"):
            wrap_model_for_offload(_linears(2, 8), device="cpu", offload="disk", disk_path=tmp_path)
        removed = [p for p in left if not p.exists()]
        assert len(removed) == 4 and all(f"-{dead.pid}-" in p.name for p in removed)
        assert any("removed 4 files" in r.getMessage() for r in caplog.records)
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait()


def test_too_little_room_is_refused_before_anything_is_written_wherever_mount_is_not_allowed(tmp_path, monkeypatch):
    """The room check itself, without a small file system (the test above needs root to mount one):
    the free space the folder reports is below what the files need."""
    import shutil

    from offload_tensor.engine import disk

    monkeypatch.setattr(disk.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20))
    model = _linears(4, 256)  # 1.0 MiB of weights, and the files' headers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match=rf"to {tmp_path / 'w'}, which has 1.0 MiB free"):
        wrap_model_for_offload(model, device="cpu", offload="disk", disk_path=tmp_path / "w")
    assert not list((tmp_path / "w").iterdir())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_folder_without_write_permission_is_an_error_naming_it(tmp_path):
    """As a user without root: a folder without write permission (root ignores the permission bits;
    the read-only file system test above covers root)."""
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into folders without write permission")
    folder = tmp_path / "w"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match=f"disk_path {folder} is not writable"):
            wrap_model_for_offload(_linears(2, 8), device="cpu", offload="disk", disk_path=folder)
    finally:
        folder.chmod(0o755)
