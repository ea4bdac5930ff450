"""Quantized payloads (torchao, optimum-quanto): offloaded weights keep every inner tensor on the
offload device, run through the payload's own kernels, equal the quantized model without
offloading, and compile without breaks or extra graphs."""

import copy
import warnings

import pytest
import torch
from models import CASES, engine_for, output
from torch import nn

import compile_rules
from offload_tensor import OffloadedTensor, offload_report, unwrap_model, wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend
from offload_tensor.engine.streaming import StreamingEngine
from offload_tensor.testing import RecordingEngine

torchao = pytest.importorskip("torchao")
quanto = pytest.importorskip("optimum.quanto")
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)

FLUX, WAN = CASES[0], CASES[1]
TORCHAO = {
    "int8wo": Int8WeightOnlyConfig,
    "float8wo": Float8WeightOnlyConfig,
    "int8dq": Int8DynamicActivationInt8WeightConfig,
    "int4wo": Int4WeightOnlyConfig,
}
QUANTO = {"qint8": quanto.qint8, "qfloat8": quanto.qfloat8, "qint4": quanto.qint4}
SCHEMES = [("torchao", s) for s in TORCHAO] + [("quanto", s) for s in QUANTO]


def quantized(case, backend, scheme):
    model = case.make()
    if backend == "torchao":
        try:
            quantize_(model, TORCHAO[scheme]())
            with torch.no_grad():
                model(**case.inputs(0))
        except (ImportError, RuntimeError, NotImplementedError) as e:  # no kernel in this build
            pytest.skip(f"torchao {scheme} has no kernel here: {str(e).splitlines()[0][:120]}")
    else:
        quanto.quantize(model, weights=QUANTO[scheme])
        quanto.freeze(model)
    if all(type(p) is nn.Parameter for p in model.parameters()):
        pytest.skip(f"{backend} {scheme} quantized no weight of this tiny model (shapes below its group size)")
    return model


def payload_devices(model):
    return {t.device.type for p in model.parameters() for t in p._inner}


# Every scheme on the tiny Wan; on the tiny Flux (whose compile costs twice as much) one torchao and
# one quanto scheme in the default run, the rest in the extended one (`-m extended`).
COMPILE_GRID = [pytest.param(WAN, b, s, id=f"{s}-wan") for b, s in SCHEMES] + [
    pytest.param(FLUX, b, s, id=f"{s}-flux", marks=() if s in ("int8wo", "qint4") else pytest.mark.extended)
    for b, s in SCHEMES
]


@pytest.mark.parametrize("case,backend,scheme", COMPILE_GRID)
def test_offloaded_equals_quantized_and_compiles_clean(case, backend, scheme):
    unquantized = case.make()
    model = quantized(case, backend, scheme)
    with torch.no_grad():
        reference = output(unquantized(**case.inputs(0)))
        expected = output(model(**case.inputs(0)))
    assert not torch.equal(expected, reference)  # the quantization is real: the test is not void
    plain = compile_rules.check(model, repeated_blocks=True, **case.inputs(0))

    engine = RecordingEngine()  # every fetch through the op, every inner tensor copied
    wrap_model_for_offload(model, engine=engine)
    assert payload_devices(model) == {"cpu"}
    assert any(p._kind.name == backend for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(output(model(**case.inputs(0))), expected)
    assert len(set(engine.keys)) == len(list(model.parameters()))

    report = compile_rules.check(model, repeated_blocks=True, fullgraph=plain.graph_breaks == 0, **case.inputs(0))
    if plain.graph_breaks == 0:
        assert report.graph_breaks == 0, report
    else:  # where the plain quantized model breaks itself, we add no break of our own
        assert report.graph_breaks == plain.graph_breaks, f"plain: {plain}\nwrapped: {report}"
    assert report.graphs <= plain.graphs, f"plain: {plain}\nwrapped: {report}"


@pytest.mark.parametrize("backend,scheme", [("torchao", "int8wo"), ("quanto", "qint8"), ("quanto", "qint4")])
@pytest.mark.parametrize("granularity", ["leaf", "block"])
@pytest.mark.parametrize("prefetch", [0, 2], ids=["synchronous", "prefetch"])
def test_seed_scenario_grid_equals_quantized_baseline(backend, scheme, granularity, prefetch):
    """The diffusers bug this project grew from: group offloading of torchao/quanto weights left
    inner tensors behind. Here every inner tensor streams, in every configuration."""
    model = quantized(FLUX, backend, scheme)
    with torch.no_grad():
        expected = [output(model(**FLUX.inputs(step))) for step in range(3)]
    engine = StreamingEngine(FakeBackend())
    wrap_model_for_offload(model, engine=engine, granularity=granularity, prefetch=prefetch)
    with torch.no_grad():
        for step in range(3):
            assert torch.equal(output(model(**FLUX.inputs(step))), expected[step])
    assert engine.scheduler.stats.copies > 0


def test_report_counts_quantized_inner_bytes_exactly():
    model = quantized(FLUX, "torchao", "int8wo")
    inner = sum(
        getattr(p, n).numel() * getattr(p, n).element_size()
        for p in model.parameters()
        if type(p) is not nn.Parameter
        for n in p.__tensor_flatten__()[0]
    )
    report = offload_report(wrap_model_for_offload(model))
    assert report.by_kind["torchao"] == inner


def test_state_dict_round_trips_into_a_fresh_quantized_model():
    model = quantized(FLUX, "torchao", "int8wo")
    wrap_model_for_offload(model)
    with torch.no_grad():
        expected = output(model(**FLUX.inputs(1)))
    state = model.state_dict()
    fresh = quantized(FLUX, "torchao", "int8wo")
    for p in fresh.parameters():  # make sure the load really changes something
        for n in p.__tensor_flatten__()[0] if type(p) is not nn.Parameter else ():
            getattr(p, n).zero_()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(output(fresh(**FLUX.inputs(1))), expected)


def test_load_state_dict_into_wrapped_quantized_model_writes_through():
    source = quantized(FLUX, "quanto", "qint8")
    target = wrap_model_for_offload(quantized(FLUX, "quanto", "qint8"))
    with torch.no_grad():
        for p in source.parameters():
            if type(p) is nn.Parameter:
                p.add_(0.5)  # plain weights differ...
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert torch.equal(output(target(**FLUX.inputs(0))), output(source(**FLUX.inputs(0))))


@pytest.mark.parametrize("quant", ["torchao", "quanto"])
def test_diffusers_quantization_configs_load_then_wrap(tmp_path, quant):
    from diffusers import FluxTransformer2DModel, QuantoConfig, TorchAoConfig

    FLUX.make().save_pretrained(tmp_path)
    # diffusers 0.42 takes a torchao config object where older releases took the name "int8wo"
    config = TorchAoConfig(Int8WeightOnlyConfig()) if quant == "torchao" else QuantoConfig(weights_dtype="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=config).eval()
    with torch.no_grad():
        expected = output(model(**FLUX.inputs(0)))
    wrap_model_for_offload(model, engine=RecordingEngine())
    with torch.no_grad():
        assert torch.equal(output(model(**FLUX.inputs(0))), expected)
    report = compile_rules.check(model, repeated_blocks=True, fullgraph=True, **FLUX.inputs(0))
    assert report.graph_breaks == 0


class _UnknownQuantized(torch.Tensor):
    """An unknown traceable wrapper subclass (as a new quantization library would make)."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    def __init__(self, data):
        self.quantized = data

    def __tensor_flatten__(self):
        return ["quantized"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return cls(args[0].quantized)
        raise NotImplementedError


class _GGUFParameter(nn.Parameter):
    """The shape of diffusers' GGUFParameter: an nn.Parameter subclass carrying packed data."""


def test_unsupported_weights_are_a_type_error_listing_what_is_supported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(_UnknownQuantized(torch.randn(4, 4)), requires_grad=False)
    model[0].weight = _GGUFParameter(torch.randn(4, 4))
    params = list(model.parameters())
    with pytest.raises(TypeError, match=r"0\.weight: .*GGUFParameter is not supported; .*torchao.*optimum-quanto"):
        wrap_model_for_offload(model)
    model[0].weight = nn.Parameter(torch.randn(4, 4))
    params = list(model.parameters())
    with pytest.raises(TypeError, match=r"1\.weight: .*_UnknownQuantized is not supported; .*torchao.*optimum-quanto"):
        wrap_model_for_offload(model)
    assert list(model.parameters()) == params


def test_quanto_module_quantizing_activations_is_refused():
    model = FLUX.make()
    quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
    quanto.freeze(model)
    params = list(model.parameters())
    with pytest.raises(TypeError, match="quantizes its activations"):
        wrap_model_for_offload(model)
    assert list(model.parameters()) == params


def test_unwrap_gives_the_quantized_weights_back():
    model = quantized(FLUX, "quanto", "qint4")
    before = copy.deepcopy(model.state_dict())
    unwrap_model(wrap_model_for_offload(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert type(after[k]) is type(before[k])
        assert torch.equal(after[k].dequantize() if hasattr(after[k], "dequantize") else after[k],
                           before[k].dequantize() if hasattr(before[k], "dequantize") else before[k])
    assert "forward" not in model.transformer_blocks[0].attn.to_q.__dict__  # quanto routing undone


@pytest.mark.parametrize("home", ["zero-copy", "sync", "disk"])
def test_save_pretrained_round_trips_a_wrapped_torchao_model(home, tmp_path):
    """Also with weights an engine fetches (the disk tier, any engine): state_dict handed out a
    copy of the payload by asking the torchao wrapper for its storage, which it has none of."""
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    FLUX.make().save_pretrained(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FluxTransformer2DModel.from_pretrained(
            tmp_path / "plain", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        ).eval()
    plain_state = model.state_dict()
    if home == "disk":
        wrap_model_for_offload(model, offload=tmp_path / "disk")
    else:
        wrap_model_for_offload(model, engine=engine_for(home))
    state = model.state_dict()
    assert state.keys() == plain_state.keys()
    for k, v in state.items():
        assert type(v) is type(plain_state[k]) and torch.equal(v.dequantize(), plain_state[k].dequantize()), k
    with torch.no_grad():
        expected = output(model(**FLUX.inputs(2)))
    model.save_pretrained(tmp_path / "wrapped", safe_serialization=False)  # torchao checkpoints are not safetensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = FluxTransformer2DModel.from_pretrained(tmp_path / "wrapped", use_safetensors=False).eval()
    assert any(type(p) is not nn.Parameter for p in fresh.parameters())  # loaded quantized
    with torch.no_grad():
        assert torch.equal(output(fresh(**FLUX.inputs(2))), expected)
    unwrap_model(model)
    assert all(type(v) is type(plain_state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(output(model(**FLUX.inputs(2))), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,scheme", [("torchao", "int8wo"), ("quanto", "qint8")])
def test_cuda_streamed_quantized_equals_resident(backend, scheme):
    resident = quantized(FLUX, backend, scheme).cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in FLUX.inputs(0).items()}
    with torch.no_grad():
        expected = output(resident(**inputs))
    model = wrap_model_for_offload(quantized(FLUX, backend, scheme), device="cuda", prefetch=1)
    assert payload_devices(model) == {"cpu"}
    with torch.no_grad():
        assert torch.equal(output(model(**inputs)), expected)
    model.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(output(model(**inputs)), expected, atol=1e-3, rtol=1e-3)


# -- behaving like the plain quantized model (shapes, state dicts, dequantize) -------------------
def from_pretrained(path, config=None, **kwargs):
    from diffusers import FluxTransformer2DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FluxTransformer2DModel.from_pretrained(path, quantization_config=config, **kwargs).eval()


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "plain"
    FLUX.make().save_pretrained(path)
    return path


def run(model, seed=0):
    with torch.no_grad():
        return output(model(**FLUX.inputs(seed)))


@pytest.mark.parametrize("scheme", ["qint4", "qint2", "qint8"])
def test_packed_quanto_weights_report_their_logical_shape(scheme):
    """quanto packs int4/int2 data into fewer bytes: the wrapper reports the weight's shape, not
    the packed one, so numel, parameter counts and reloading the model's own state are right."""
    quanto_scheme = {"qint4": quanto.qint4, "qint2": quanto.qint2, "qint8": quanto.qint8}[scheme]
    plain, model = FLUX.make(), FLUX.make()
    for m in (plain, model):
        quanto.quantize(m, weights=quanto_scheme)
        quanto.freeze(m)
    wrap_model_for_offload(model, engine=RecordingEngine())
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    expected = run(plain)
    model.load_state_dict(model.state_dict())
    assert torch.equal(run(model), expected)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_wrapped_quanto_model_saves_and_loads_as_the_plain_one(flux_checkpoint, tmp_path, weights, safe):
    from diffusers import QuantoConfig

    plain = from_pretrained(flux_checkpoint, QuantoConfig(weights_dtype=weights))
    expected, plain_state = run(plain), plain.state_dict()
    model = wrap_model_for_offload(from_pretrained(flux_checkpoint, QuantoConfig(weights_dtype=weights)))
    state = model.state_dict()
    assert sorted(state) == sorted(plain_state)  # weight._data, weight._scale, ... as quanto saves them
    assert all(torch.equal(v, plain_state[k]) for k, v in state.items())
    model.save_pretrained(tmp_path, safe_serialization=safe)
    reloaded = from_pretrained(tmp_path, use_safetensors=safe)  # a plain quanto model, no offload_tensor
    assert torch.equal(run(reloaded), expected)
    target = wrap_model_for_offload(from_pretrained(flux_checkpoint, QuantoConfig(weights_dtype=weights)))
    with torch.no_grad():
        for p in target.parameters():
            for t in p._inner:
                t.zero_()
    target.load_state_dict(plain_state)  # quanto's flattened keys, into offloaded weights
    assert all(isinstance(p, OffloadedTensor) for p in target.parameters())
    assert torch.equal(run(target), expected)
    assert torch.equal(run(wrap_model_for_offload(reloaded)), expected)  # pre-quantized, loaded, wrapped
    assert torch.equal(run(unwrap_model(reloaded)), expected)


@pytest.mark.parametrize("engine", ["zero-copy", "sync"])
def test_dequantize_really_dequantizes_the_payloads(flux_checkpoint, engine):
    from diffusers import TorchAoConfig

    config = lambda: TorchAoConfig(Int8WeightOnlyConfig())  # noqa: E731
    plain = from_pretrained(flux_checkpoint, config(), torch_dtype=torch.float32)
    plain.dequantize()
    expected = run(plain)
    model = from_pretrained(flux_checkpoint, config(), torch_dtype=torch.float32)
    quantized = run(model)
    assert not torch.equal(quantized, expected)  # dequantizing changes the output: the test can fail
    wrap_model_for_offload(model, engine=engine_for(engine))
    model.dequantize()
    assert not model.is_quantized and not hasattr(model, "hf_quantizer")
    assert {p._kind.name for p in model.parameters()} == {"plain"}
    assert torch.equal(run(model), expected)
    assert torch.equal(run(unwrap_model(model)), expected)


@pytest.mark.parametrize("home", ["streaming", "disk", "disk-budget"])
def test_dequantize_of_a_streamed_model_gives_its_groups_new_homes(flux_checkpoint, home, tmp_path):
    """diffusers' own dequantize test on a streamed model (it was refused): the dequantized payloads
    get new homes of the same tier (host arenas, files of the model's own), the budget is kept."""
    from diffusers import TorchAoConfig

    config = lambda: TorchAoConfig(Int8WeightOnlyConfig())  # noqa: E731
    plain = from_pretrained(flux_checkpoint, config(), torch_dtype=torch.float32)
    plain.dequantize()
    expected = run(plain)
    model = from_pretrained(flux_checkpoint, config(), torch_dtype=torch.float32)
    if home == "streaming":
        wrap_model_for_offload(model, engine=StreamingEngine(FakeBackend()))
    else:
        budget = {"budget": "400KiB", "device": "cpu"} if home == "disk-budget" else {}
        wrap_model_for_offload(model, offload=tmp_path / "disk", **budget)
    files = {p: p.read_bytes() for p in (tmp_path / "disk").glob("*.safetensors")}
    quantized = run(model)
    assert not torch.equal(quantized, expected)
    model.dequantize()
    assert not model.is_quantized and {p._kind.name for p in model.parameters()} == {"plain"}
    assert torch.equal(run(model), expected)
    state = model._offload_state
    assert state.plan.weight_bytes == sum(p.numel() * p.element_size() for p in plain.parameters())
    if home == "disk-budget":  # the quantized model fitted whole; the dequantized one streams a part, within it
        assert 0 < state.plan.resident_bytes and 0 < state.plan.streamed_bytes
        assert state.plan.device_bytes <= 400 * 1024
    import gc

    gc.collect()
    # the changed groups' old files (the model's own: written from memory) went with their groups; no file was
    # written into, none is left over
    assert all(not p.exists() or p.read_bytes() == b for p, b in files.items())
    if home != "streaming":
        assert any(not p.exists() for p in files)
        assert len(list((tmp_path / "disk").glob("*.safetensors"))) == len(state.plan.groups)
    assert torch.equal(run(unwrap_model(model)), expected)


@pytest.mark.parametrize("engine", ["zero-copy", "sync"])
def test_dequantize_of_a_quanto_model_raises_as_diffusers_does_and_changes_nothing(flux_checkpoint, engine):
    """diffusers cannot dequantize quanto models: the wrapped model raises diffusers' own error
    before its payloads change (they were dequantized first, then the error left quanto modules
    holding plain weights that could be neither saved nor unwrapped)."""
    from diffusers import QuantoConfig

    plain = from_pretrained(flux_checkpoint, QuantoConfig(weights_dtype="int8"))
    expected, plain_state = run(plain), plain.state_dict()
    with pytest.raises(NotImplementedError, match="has no implementation of `dequantize`") as plain_error:
        plain.dequantize()
    model = wrap_model_for_offload(
        from_pretrained(flux_checkpoint, QuantoConfig(weights_dtype="int8")), engine=engine_for(engine)
    )
    with pytest.raises(NotImplementedError) as error:
        model.dequantize()
    assert str(error.value) == str(plain_error.value)
    assert torch.equal(run(model), expected)
    state = model.state_dict()
    assert state.keys() == plain_state.keys() and all(torch.equal(v, plain_state[k]) for k, v in state.items())
    assert torch.equal(run(unwrap_model(model)), expected)
