"""Big models on small machines: a model built on the meta device wrapped straight from a
safetensors checkpoint (one file, shards with their index, diffusers' folder layout), into RAM or
the disk tier; the disk tier's files checked on reuse; a failure midway leaving the model usable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from models import CASES, minilm_path, output
from safetensors.torch import load_file, save_file

import compile_rules
from offload_tensor import is_wrapped, offload_report, unwrap_model, wrap_model_for_offload
from offload_tensor.checkpoint import CheckpointError

FLUX, WAN, BERT = CASES[0], CASES[1], CASES[-1]


def meta_like(case):
    """The case's model built on the meta device, as a user builds one to load into."""
    if case is BERT:
        from transformers import BertConfig, BertModel

        config = BertConfig.from_pretrained(minilm_path(), attn_implementation="sdpa")
        with init_empty_weights():
            return BertModel(config).eval()
    plain = case.make()
    with init_empty_weights():
        return type(plain).from_config(plain.config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """For Flux and Wan: one file, and a diffusers folder of shards with their index."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for case in (FLUX, WAN):
        model = case.make()
        model.save_pretrained(root / case.name / "single")
        model.save_pretrained(root / case.name / "pipeline" / "transformer", max_shard_size="40KB")
        out[case.name] = {
            "single": root / case.name / "single" / "diffusion_pytorch_model.safetensors",
            "sharded": root / case.name / "pipeline" / "transformer",
        }
    out[BERT.name] = {"single": minilm_path() / "model.safetensors"}
    return out


def run(model, case, seed=0):
    with torch.no_grad():
        return output(model(**case.inputs(seed)))


LOADS = [(FLUX, "single"), (FLUX, "sharded"), (WAN, "single"), (WAN, "sharded"), (BERT, "single")]


@pytest.mark.parametrize("case,layout", LOADS, ids=[f"{c.name}-{layout}" for c, layout in LOADS])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_meta_model_from_checkpoint_equals_the_plain_model(case, layout, tier, checkpoints, tmp_path):
    checkpoint = checkpoints[case.name][layout]
    if layout == "sharded":
        assert len(list(Path(checkpoint).glob("*.safetensors"))) > 2  # really sharded
    kwargs = {"offload": tmp_path / "disk"} if tier == "disk" else {}
    model = wrap_model_for_offload(meta_like(case), checkpoint=checkpoint, **kwargs)
    assert run(model, case).equal(run(case.make(), case))
    report = offload_report(model)
    assert report.by_tier == {tier: sum(p.payload_bytes for p in model.parameters())}
    if tier == "disk":  # the weights stream from disk, read ahead by the scheduler
        assert report.offloaded_bytes > 0 and model._offload_state.engine.scheduler.stats.copies > 0
        assert run(model, case, 1).equal(run(case.make(), case, 1))


COMPILED = [(FLUX, "whole"), (FLUX, "repeated_blocks"), (WAN, "whole"), (WAN, "repeated_blocks"), (BERT, "whole")]


@pytest.mark.parametrize("case,mode", COMPILED, ids=[f"{c.name}-{m}" for c, m in COMPILED])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_loaded_model_compiles_like_the_plain_one(case, mode, tier, checkpoints, tmp_path):
    repeated = mode == "repeated_blocks"
    plain = compile_rules.check(case.make(), repeated_blocks=repeated, **case.inputs(0))
    kwargs = {"offload": tmp_path / "disk"} if tier == "disk" else {}
    layout = "single" if case is BERT else "sharded"
    model = wrap_model_for_offload(meta_like(case), checkpoint=checkpoints[case.name][layout], **kwargs)
    report = compile_rules.check(model, repeated_blocks=repeated, fullgraph=True, **case.inputs(0))
    assert report.graph_breaks == 0 and report.graphs <= plain.graphs, f"plain: {plain}\nwrapped: {report}"
    torch.testing.assert_close(output(report.output), output(plain.output), atol=1e-5, rtol=0)
    if tier == "disk":
        assert report.fetches_per_forward > 0


def test_fp8_storage_applies_while_loading(checkpoints):
    loaded = wrap_model_for_offload(
        meta_like(FLUX), checkpoint=checkpoints["flux"]["sharded"], storage_dtype=torch.float8_e4m3fn
    )
    wrapped = wrap_model_for_offload(FLUX.make(), storage_dtype=torch.float8_e4m3fn)
    for (name, a), b in zip(loaded.named_parameters(), wrapped.parameters()):
        assert a._kind == b._kind and all(torch.equal(x, y) for x, y in zip(a._inner, b._inner)), name
    assert run(loaded, FLUX).equal(run(wrapped, FLUX))


def _edited(source: Path, target: Path, edit) -> Path:
    tensors = load_file(source)
    edit(tensors)
    save_file(tensors, target)
    return target


BAD_CHECKPOINTS = {
    "missing": (lambda t: t.pop("proj_out.weight"), "missing key proj_out.weight"),
    "unexpected": (lambda t: t.__setitem__("extra.weight", torch.zeros(2)), "unexpected key extra.weight"),
    "shape": (
        lambda t: t.__setitem__("proj_out.weight", torch.zeros(3, 3)),
        r"proj_out.weight: the checkpoint has \(3, 3\)",
    ),
    "dtype": (lambda t: t.__setitem__("proj_out.bias", t["proj_out.bias"].double()), r"proj_out.bias: .*torch.float64"),
}


@pytest.mark.parametrize("problem", list(BAD_CHECKPOINTS))
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_key(problem, checkpoints, tmp_path):
    edit, message = BAD_CHECKPOINTS[problem]
    checkpoint = _edited(checkpoints["flux"]["single"], tmp_path / "bad.safetensors", edit)
    model = meta_like(FLUX)
    with pytest.raises(CheckpointError, match=message):
        wrap_model_for_offload(model, checkpoint=checkpoint)
    assert not is_wrapped(model) and all(p.is_meta and type(p) is torch.nn.Parameter for p in model.parameters())


def test_a_truncated_checkpoint_is_refused_before_anything_is_read(checkpoints, tmp_path):
    data = Path(checkpoints["flux"]["single"]).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    model = meta_like(FLUX)
    with pytest.raises(CheckpointError, match="truncated"):
        wrap_model_for_offload(model, checkpoint=truncated)
    assert not is_wrapped(model)


def test_disk_caches_are_reused_or_written_again(checkpoints, tmp_path, caplog):
    """A cache of the checkpoint is reused as it is; one that does not fit (truncated, written from
    another checkpoint, by an earlier release without a checksum) is derived data: written again,
    said in one log line."""
    folder = tmp_path / "disk"
    wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoints["flux"]["sharded"], offload=folder)
    files = {p: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    model = wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoints["flux"]["sharded"], offload=folder)
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")} == files  # reused, not rewritten
    expected = run(FLUX.make(), FLUX)
    assert run(model, FLUX).equal(expected)
    victim = max(files, key=lambda p: p.stat().st_size)
    other = _edited(checkpoints["flux"]["single"], tmp_path / "other.safetensors", lambda t: t["proj_out.bias"].add_(1))
    stale_folder = tmp_path / "stale"
    wrap_model_for_offload(meta_like(FLUX), checkpoint=other, offload=stale_folder)
    for damage, where, reason in [
        (lambda: victim.write_bytes(victim.read_bytes()[:-64]), folder, "truncated"),
        (lambda: None, stale_folder, "stale"),
        (lambda: _without_checksum(victim), folder, "no checksum"),
    ]:
        damage()
        caplog.clear()
        checkpoint = checkpoints["flux"]["sharded"] if where is folder else checkpoints["flux"]["single"]
        with caplog.at_level("WARNING", logger="offload_tensor"):
            model = wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoint, offload=where)
        rebuilt = [r.getMessage() for r in caplog.records if "again from the checkpoint" in r.getMessage()]
        assert len(rebuilt) == 1 and reason in rebuilt[0], [r.getMessage() for r in caplog.records]
        assert run(model, FLUX).equal(expected), reason


def _without_checksum(path):
    """The file as a release without checksums wrote it."""
    from offload_tensor.checkpoint import CHECKSUM, read_header, write_atomically

    tensors = load_file(path)
    _, metadata = read_header(path)
    del metadata[CHECKSUM]
    write_atomically(path, {k: v for k, v in tensors.items() if not k.startswith("__pad__")}, metadata)


_WRAP_FROM_SHARED_FOLDER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_checkpoint import meta_like, run, FLUX
from offload_tensor import wrap_model_for_offload
model = wrap_model_for_offload(meta_like(FLUX), checkpoint=sys.argv[1], offload=sys.argv[2])
torch.save(run(model, FLUX), sys.argv[2] + f"/out-{sys.argv[4]}.pt")
"""


def test_two_processes_wrap_from_the_same_folder(checkpoints, tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    tests = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRAP_FROM_SHARED_FOLDER,
                str(checkpoints["flux"]["sharded"]),
                str(folder),
                tests,
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    expected = run(FLUX.make(), FLUX)
    assert all(torch.load(folder / f"out-{i}.pt").equal(expected) for i in range(2))
    assert not list(folder.glob(".*.tmp"))  # no temporary file left behind


def test_writes_to_disk_tier_weights_land_in_their_files(tmp_path):
    model = wrap_model_for_offload(FLUX.make(), offload=tmp_path / "disk")
    plain = FLUX.make()
    run(model, FLUX)  # slots hold the old weights now
    state = {k: v * 0.5 for k, v in plain.state_dict().items()}
    model.load_state_dict(state)
    plain.load_state_dict(state)
    assert run(model, FLUX, 2).equal(run(plain, FLUX, 2))
    reread = {}
    for path in (tmp_path / "disk").glob("*.safetensors"):
        reread.update(load_file(path))
    assert all(torch.equal(reread[f"{k}.payload"], v) for k, v in state.items())


def test_failure_midway_leaves_the_model_usable(monkeypatch):
    """A failure while building (out of memory, a full disk) after some groups' original weights
    were released into their arenas: the model is not wrapped, and runs with the same values."""
    import offload_tensor.build as build
    from offload_tensor.engine.fake import FakeBackend
    from offload_tensor.engine.streaming import StreamingEngine

    model = FLUX.make()
    expected = run(model, FLUX)
    params = list(model.parameters())
    real_arena, calls = build._arena, []

    def failing_arena(*args):
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError("planted: out of memory in the fourth group")
        return real_arena(*args)

    monkeypatch.setattr(build, "_arena", failing_arena)
    with pytest.raises(MemoryError, match="planted"):
        wrap_model_for_offload(model, engine=StreamingEngine(FakeBackend()))
    assert not is_wrapped(model) and list(model.parameters()) == params
    assert all(type(p) is torch.nn.Parameter for p in params)
    assert run(model, FLUX).equal(expected)
    monkeypatch.undo()
    wrap_model_for_offload(model, engine=StreamingEngine(FakeBackend()))  # and can be wrapped after
    assert run(model, FLUX).equal(expected)


def test_unwrap_of_a_loaded_meta_model_gives_cpu_weights(checkpoints):
    model = unwrap_model(wrap_model_for_offload(meta_like(FLUX), checkpoint=checkpoints["flux"]["single"]))
    assert all(p.device.type == "cpu" and type(p) is torch.nn.Parameter for p in model.parameters())
    assert run(model, FLUX).equal(run(FLUX.make(), FLUX))
    assert os.path.exists(checkpoints["flux"]["single"])


def test_from_pretrained_builds_on_meta_and_loads_in_the_checkpoints_dtypes(tmp_path):
    """The helper for diffusers users: config -> meta model -> wrapped from the checkpoint, each
    weight in the dtype the checkpoint holds (bf16 here, with the norms kept fp32)."""
    from diffusers import FluxTransformer2DModel

    from offload_tensor import from_pretrained

    plain = FLUX.make().to(torch.bfloat16)
    with torch.no_grad():
        plain.norm_out.linear.weight.data = plain.norm_out.linear.weight.float()  # a weight kept in fp32
    plain.save_pretrained(tmp_path / "pipe" / "transformer")
    model = from_pretrained(
        FluxTransformer2DModel, tmp_path / "pipe", subfolder="transformer", offload=tmp_path / "disk"
    )
    assert model.norm_out.linear.weight.dtype == torch.float32 and model.proj_out.weight.dtype == torch.bfloat16
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a.materialize(), b), name
    with pytest.raises(ValueError, match="local folder"):
        from_pretrained(FluxTransformer2DModel, "black-forest-labs/FLUX.1-dev", subfolder="transformer")


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_from_pretrained_converts_to_torch_dtype_while_reading(tier, tmp_path):
    """An fp32 checkpoint loaded as bf16 exactly as diffusers loads it (Wan keeps its norms, time
    embedder and modulation in fp32), converted tensor by tensor while reading: never the whole
    model in RAM in fp32. Without torch_dtype a model declaring other dtypes than its checkpoint
    is still an error."""
    from diffusers import WanTransformer3DModel

    from offload_tensor import from_pretrained

    WAN.make().save_pretrained(tmp_path / "wan")  # fp32, as most published checkpoints
    reference = WanTransformer3DModel.from_pretrained(tmp_path / "wan", torch_dtype=torch.bfloat16).eval()
    kwargs = {"offload": tmp_path / "disk"} if tier == "disk" else {}
    model = from_pretrained(WanTransformer3DModel, tmp_path / "wan", torch_dtype=torch.bfloat16, device="cpu", **kwargs)
    expected = {n: p for n, p in reference.named_parameters()}
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in expected.items()}
    assert {p.dtype for p in expected.values()} == {torch.bfloat16, torch.float32}
    for name, p in model.named_parameters():
        assert torch.equal(p.materialize(), expected[name]), name
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in WAN.inputs(0).items()}
    with torch.no_grad():
        assert output(model(**inputs)).equal(output(reference(**inputs)))
    with init_empty_weights():
        bf16 = type(reference).from_config(reference.config).to(torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"torch.float32, the model .* torch.bfloat16"):
        wrap_model_for_offload(bf16, checkpoint=tmp_path / "wan")
    with pytest.raises(ValueError, match="torch_dtype= converts the weights of checkpoint="):
        wrap_model_for_offload(WAN.make(), torch_dtype=torch.bfloat16)


class _Scaled(torch.nn.Module):
    """A BatchNorm (its 0-d `num_batches_tracked` buffer) and a scalar parameter."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.gain = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.norm(self.lin(x)) * self.gain


def _trained_scaled() -> _Scaled:
    torch.manual_seed(0)
    model = _Scaled()
    with torch.no_grad():
        model(torch.randn(8, 4))  # running stats and num_batches_tracked away from their init values
        model.gain.fill_(1.5)
    return model.eval()


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_zero_dim_tensors_load_from_a_checkpoint(tier, tmp_path):
    plain = _trained_scaled()
    save_file(plain.state_dict(), tmp_path / "scaled.safetensors")
    with init_empty_weights():
        meta = _Scaled().eval()
    kwargs = {"offload": tmp_path / "disk"} if tier == "disk" else {}
    model = wrap_model_for_offload(meta, checkpoint=tmp_path / "scaled.safetensors", device="cpu", **kwargs)
    assert torch.equal(model.norm.num_batches_tracked, plain.norm.num_batches_tracked)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_a_scalar_parameter_goes_to_the_disk_tier(tmp_path):
    plain = _trained_scaled()
    model = wrap_model_for_offload(_trained_scaled(), device="cpu", offload=tmp_path / "disk")
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_from_pretrained_keeps_non_persistent_buffers(tmp_path):
    """Wan's rotary tables are non-persistent buffers: no checkpoint holds them, so the model must
    be built with real buffers (init_empty_weights), not on the meta device."""
    from diffusers import WanTransformer3DModel

    from offload_tensor import from_pretrained

    WAN.make().save_pretrained(tmp_path / "pipe" / "transformer")
    model = from_pretrained(WanTransformer3DModel, tmp_path / "pipe", subfolder="transformer", device="cpu")
    assert run(model, WAN).equal(run(WAN.make(), WAN))


class _WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return self.lin(x) * self.scale


BAD_BUFFERS = {
    "missing": (lambda t: t.pop("scale"), "missing key scale"),
    "shape": (lambda t: t.__setitem__("scale", torch.full((1,), 3.5)), r"scale: the checkpoint has \(1,\) .*\(4,\)"),
    "dtype": (lambda t: t.__setitem__("scale", t["scale"].double()), r"scale: .*torch.float64.*torch.float32"),
}


@pytest.mark.parametrize("problem", list(BAD_BUFFERS))
@pytest.mark.parametrize("build", ["init_empty_weights", "meta"])
def test_a_persistent_buffer_that_does_not_fit_is_refused(problem, build, tmp_path):
    """As torch's strict load_state_dict: a persistent buffer is a key like any weight, also when
    the model keeps real buffers (init_empty_weights)."""
    edit, message = BAD_BUFFERS[problem]
    tensors = _WithBuffer().state_dict()
    edit(tensors)
    save_file(tensors, tmp_path / "bad.safetensors")
    with init_empty_weights() if build == "init_empty_weights" else torch.device("meta"):
        model = _WithBuffer()
    with pytest.raises(CheckpointError, match=message):
        wrap_model_for_offload(model, checkpoint=tmp_path / "bad.safetensors", device="cpu")
    assert not is_wrapped(model)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_a_tied_weight_stored_twice_must_hold_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    plain = _Tied()
    ids = torch.tensor([[1, 2, 3]])
    same = {"embed.weight": plain.embed.weight.detach().clone(), "head.weight": plain.embed.weight.detach().clone()}
    save_file(same, tmp_path / "same.safetensors")
    with torch.device("meta"):
        model = _Tied()
    wrap_model_for_offload(model, checkpoint=tmp_path / "same.safetensors", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    other = {**same, "head.weight": same["head.weight"] + 1}  # an untied checkpoint: which one would win?
    save_file(other, tmp_path / "other.safetensors")
    with torch.device("meta"):
        model = _Tied()
    with pytest.raises(CheckpointError, match="embed.weight.*head.weight.*tied"):
        wrap_model_for_offload(model, checkpoint=tmp_path / "other.safetensors", device="cpu")
    assert not is_wrapped(model)


def _safetensors(path: Path, header: dict, data_bytes: int) -> Path:
    import json
    import struct

    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes))
    return path


BAD_HEADERS = {
    "offsets": ({"weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]},
                 "bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}, r"weight.*32 bytes.*64"),
    "no dtype": ({"weight": {"shape": [4, 4], "data_offsets": [0, 64]},
                  "bias": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]}}, r"weight.*dtype"),
    "not an entry": ({"weight": [1, 2]}, r"weight"),
}  # fmt: skip


@pytest.mark.parametrize("problem", list(BAD_HEADERS))
def test_a_malformed_header_is_refused_naming_the_file(problem, tmp_path):
    header, message = BAD_HEADERS[problem]
    path = _safetensors(tmp_path / "c.safetensors", header, 80)
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match=rf"c.safetensors.*{message}"):
        wrap_model_for_offload(model, checkpoint=path, device="cpu")
    assert not is_wrapped(model)


@pytest.mark.parametrize("text", ["{not json", "{}", '{"weight_map": ["a.safetensors"]}'])
def test_a_malformed_index_is_refused_naming_it(text, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        wrap_model_for_offload(model, checkpoint=tmp_path, device="cpu")


@pytest.mark.parametrize("build", ["init_empty_weights", "meta"])
def test_a_transformers_model_is_tied_before_it_loads(build, tmp_path):
    """transformers 5 does not tie a model built under init_empty_weights; save_pretrained stores
    the tied embedding once (no lm_head.weight). Loading ties it first, as transformers does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(config).eval()
    plain.save_pretrained(tmp_path)
    with init_empty_weights() if build == "init_empty_weights" else torch.device("meta"):
        model = GPT2LMHeadModel(config).eval()
    wrap_model_for_offload(model, checkpoint=tmp_path, device="cpu")
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
