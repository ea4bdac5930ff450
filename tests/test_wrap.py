"""wrap_model_for_offload / unwrap_model: state round trips, and bad input (docs/design.md, "Bad
input"): a clear error, raised before anything changes."""

import logging
import warnings

import pytest
import torch
from models import CASES, output
from safetensors.torch import load_file, save_file
from torch import nn

from offload_tensor import (
    OffloadedTensor,
    RefusedOpError,
    is_wrapped,
    offload_report,
    unwrap_model,
    wrap_model_for_offload,
)

FLUX = CASES[0]


def _snapshot(model):
    """Identity and value of every parameter and buffer, to prove an error changed nothing."""
    return (
        [(n, p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)],
        [(n, b) for n, b in model.named_buffers()],
        dict(model.__dict__),
    )


def _assert_unchanged(model, snapshot):
    params, buffers, attrs = snapshot
    now = list(model.named_parameters(remove_duplicate=False))
    assert [n for n, _ in now] == [n for n, _, _ in params]
    for (_, p), (_, p0, v0) in zip(now, params):
        assert p is p0 and type(p) is nn.Parameter and (p.is_meta or torch.equal(p, v0))
    assert [(n, b) for n, b in model.named_buffers()] == buffers
    assert dict(model.__dict__) == attrs and not is_wrapped(model)


# -- round trips ----------------------------------------------------------------------------
def test_unwrap_gives_back_the_original_state_dict_bit_exact():
    model = FLUX.make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    wrap_model_for_offload(model)
    assert all(isinstance(p, OffloadedTensor) and not p.requires_grad for p in model.parameters())
    unwrap_model(model)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)


def test_wrapped_state_dict_loads_into_a_plain_model_and_saves_with_safetensors(tmp_path):
    model = wrap_model_for_offload(FLUX.make(), storage_dtype=torch.float8_e4m3fn)
    with torch.no_grad():
        expected = output(model(**FLUX.inputs(1)))
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values())
    save_file(state, tmp_path / "w.safetensors")
    plain = FLUX.make()
    plain.load_state_dict(load_file(tmp_path / "w.safetensors"))
    with torch.no_grad():
        assert torch.equal(output(plain(**FLUX.inputs(1))), expected)


@pytest.mark.parametrize("storage_dtype", [None, torch.float8_e4m3fn])
def test_load_state_dict_writes_through_to_the_payload(storage_dtype):
    source = FLUX.make()
    torch.manual_seed(1)
    for p in source.parameters():
        p.data.normal_()
    target = wrap_model_for_offload(FLUX.make(), storage_dtype=storage_dtype)
    target.load_state_dict(source.state_dict())
    expected = wrap_model_for_offload(source, storage_dtype=storage_dtype)
    with torch.no_grad():
        assert torch.equal(output(target(**FLUX.inputs(0))), output(expected(**FLUX.inputs(0))))


def test_tied_weights_stay_tied():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    wrap_model_for_offload(model)
    assert model[1].weight is model[0].weight
    assert len(list(model.parameters())) == 1
    unwrap_model(model)
    assert model[1].weight is model[0].weight


def test_report_counts_every_payload_byte_once():
    model = FLUX.make()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    report = offload_report(wrap_model_for_offload(model))
    assert report.by_kind["plain"] == weight_bytes
    assert report.resident_bytes == weight_bytes + buffer_bytes and report.offloaded_bytes == 0
    assert report.summary.startswith("all ") and report.summary.endswith("KiB resident on cpu; nothing streams")


def test_no_cuda_says_so_once(caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import offload_tensor.policy as policy

    policy._announced_cpu = False
    with caplog.at_level(logging.INFO, logger="offload_tensor"):
        wrap_model_for_offload(nn.Linear(2, 2))
        wrap_model_for_offload(nn.Linear(2, 2))
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "CUDA is not available" in caplog.records[0].message


# -- bad input: refused before anything changes --------------------------------------------
BAD_ARGUMENTS = [
    (dict(storage_dtype=torch.int8), ValueError, "storage_dtype"),
    (dict(storage_dtype="bfloat16"), ValueError, "storage_dtype='bfloat16' is not supported; use 'float8_e4m3fn'"),
    (dict(storage_dtype="fp8"), ValueError, "storage_dtype='fp8' is not supported; use 'float8_e4m3fn'"),
    (dict(fp8_scale="row"), ValueError, "fp8_scale"),
    (dict(prefetch=-1), ValueError, "prefetch"),
    (dict(prefetch=1.5), ValueError, "prefetch"),
    (dict(pin_memory="yes"), ValueError, "pin_memory"),
    (dict(granularity="layer"), ValueError, "granularity"),
    (dict(offload="disk"), ValueError, "disk_path"),
    (dict(disk_path="/tmp/weights"), ValueError, "offload=.disk."),
    (dict(offload="mps"), ValueError, "offload"),
    (dict(device="tpu"), ValueError, "device"),
]


@pytest.mark.parametrize(
    "kwargs,error,match", BAD_ARGUMENTS, ids=[next(iter(k)) + str(i) for i, (k, _, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_arguments_are_refused_before_any_change(kwargs, error, match):
    model = FLUX.make()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        wrap_model_for_offload(model, **kwargs)
    _assert_unchanged(model, snapshot)


def test_prefetch_beyond_the_groups_is_refused_where_weights_move(tmp_path):
    """The engine allocates prefetch + 1 slots: where weights move (here from disk) a prefetch more
    than the model's groups can use is refused; computing on the CPU from RAM nothing moves."""
    model = FLUX.make()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="prefetch=1000 is more than FluxTransformer2DModel's [0-9]+ groups can use"):
        wrap_model_for_offload(model, offload="disk", disk_path=tmp_path, prefetch=1000)
    _assert_unchanged(model, snapshot)
    wrap_model_for_offload(model, prefetch=1000)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = FLUX.make()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="CUDA, which is not available"):
        wrap_model_for_offload(model, device="cuda")
    _assert_unchanged(model, snapshot)


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0] = nn.Linear(4, 4)  # half real, half meta: still nothing may change
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"1\.weight is on the meta device"):
        wrap_model_for_offload(model)
    _assert_unchanged(model, snapshot)


def test_unsupported_weight_subclass_is_a_type_error_naming_it():
    class Params4bit(nn.Parameter):  # the shape of bitsandbytes' parameter class
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = Params4bit(torch.randn(4, 4))
    snapshot_params = list(model.parameters())
    with pytest.raises(TypeError, match=r"1\.weight: .*Params4bit is not supported; offload_tensor supports"):
        wrap_model_for_offload(model)
    assert list(model.parameters()) == snapshot_params and not is_wrapped(model)


def test_model_under_accelerate_hooks_is_refused():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = FLUX.make()
    add_hook_to_module(model.transformer_blocks[0], ModelHook())
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="transformer_blocks.0 carries an accelerate hook"):
        wrap_model_for_offload(model)
    _assert_unchanged(model, snapshot)


def test_model_under_diffusers_group_offloading_is_refused():
    model = FLUX.make()
    model.enable_group_offload(
        torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="group_offloading"):
        wrap_model_for_offload(model)
    _assert_unchanged(model, snapshot)


def test_group_offloading_after_wrapping_is_refused():
    model = wrap_model_for_offload(FLUX.make())
    # Group offloading moves weights to its offload device with `param.data = ...`: the meta
    # device stands in for the CPU of a CUDA machine (a cpu -> cpu move is a no-op here).
    with pytest.raises(RefusedOpError, match="enable_group_offload.*already offloaded.*unwrap_model"):
        model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("meta"), offload_type="leaf_level")
    # moving weights with `param.data =` behind the wrapper's back, as group offloading does, is refused too
    with pytest.raises(RefusedOpError, match="do not combine it with offload_tensor"):
        model.proj_out.weight.data = torch.zeros_like(model.proj_out.weight.materialize())


def test_wrapping_a_block_of_a_wrapped_model_is_refused():
    model = wrap_model_for_offload(FLUX.make())
    with pytest.raises(ValueError, match="already an OffloadedTensor"):
        wrap_model_for_offload(model.transformer_blocks[0])


def test_dtype_change_after_wrapping_is_refused_and_device_move_is_a_noop():
    model = wrap_model_for_offload(FLUX.make())
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="changing its dtype"):
        model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="changing its dtype"):
        model.transformer_blocks[0].half()
    with pytest.warns(UserWarning, match=r"\.to\(meta\) ignored"):
        model.to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.to("cpu")  # the compute device: nothing to say
    assert list(model.parameters()) == params and all(isinstance(p, OffloadedTensor) for p in params)
    assert model.dtype == torch.float32
    with torch.no_grad():
        model(**FLUX.inputs(0))


def test_in_place_changes_land_on_plain_payloads_and_are_refused_on_fp8():
    plain = wrap_model_for_offload(FLUX.make()).proj_out.weight
    twin = FLUX.make().proj_out.weight.detach().clone()
    for change in (lambda w: w.mul_(2), lambda w: w.sin_(), lambda w: w[1:3].fill_(0.5)):
        change(plain)
        change(twin)
    assert torch.equal(plain.materialize(), twin)
    fp8 = wrap_model_for_offload(FLUX.make(), storage_dtype=torch.float8_e4m3fn).proj_out.weight
    before = fp8.materialize().clone()
    for change in (lambda: nn.init.normal_(fp8), lambda: fp8.mul_(2), lambda: fp8.sin_()):
        with pytest.raises(RefusedOpError, match="re-quantize"):
            change()
    with pytest.raises(RefusedOpError, match="setting .data"):
        fp8.data = torch.zeros_like(before)
    assert torch.equal(fp8.materialize(), before)


def test_use_after_unwrap_is_a_clear_error():
    model = unwrap_model(wrap_model_for_offload(FLUX.make()))
    with pytest.raises(ValueError, match="not wrapped by offload_tensor"):
        offload_report(model)
    with pytest.raises(ValueError, match="not wrapped by offload_tensor"):
        unwrap_model(model)
    with torch.no_grad():
        model(**FLUX.inputs(0))  # the model itself is plain again and runs


def test_engine_serves_the_model_while_wrapped_and_is_forgotten_after():
    import offload_tensor.ops as ops
    from offload_tensor.testing import RecordingEngine

    engine = RecordingEngine()
    model = wrap_model_for_offload(FLUX.make(), engine=engine)
    weights = list(model.parameters())
    assert sum(e is engine for e in ops._engines.values()) == len(weights)
    with torch.no_grad():
        model(**FLUX.inputs(0))
    assert sorted(engine.keys) == sorted(int(p._key) for p in weights)
    unwrap_model(model)
    assert not any(e is engine for e in ops._engines.values())


def test_policies_are_the_api_as_the_keywords_are(tmp_path):
    """The policy objects do what their keywords do, in wrap, plan and the pipeline functions; a
    setting given both ways is an error before anything changes."""
    from offload_tensor import Placement, Storage, Streaming, plan, unwrap_model

    case = CASES[0]
    by_keywords = wrap_model_for_offload(case.make(), device="cpu", offload="disk", disk_path=tmp_path / "a",
                                         storage_dtype="float8_e4m3fn", prefetch=2, granularity="leaf")  # fmt: skip
    by_policies = wrap_model_for_offload(
        case.make(),
        storage=Storage(dtype="float8_e4m3fn"),
        streaming=Streaming(prefetch=2, granularity="leaf"),
        placement=Placement(device="cpu", offload="disk", disk_path=tmp_path / "b"),
    )
    a, b = by_keywords._offload_state.plan, by_policies._offload_state.plan
    assert (a.storage, a.streaming, a.groups) == (b.storage, b.streaming, b.groups)
    with torch.no_grad():
        assert torch.equal(by_keywords(**case.inputs(0))[0], by_policies(**case.inputs(0))[0])
    assert plan(case.make(), storage=Storage(dtype="float8_e4m3fn")).weight_bytes == plan(
        case.make(), storage_dtype="float8_e4m3fn"
    ).weight_bytes
    model = case.make()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="pass streaming= or prefetch=, not both"):
        wrap_model_for_offload(model, streaming=Streaming(prefetch=2), prefetch=1)
    with pytest.raises(TypeError, match="must be an offload_tensor.Storage"):
        wrap_model_for_offload(model, storage="fp8")
    assert list(model.parameters()) == params and all(type(p) is torch.nn.Parameter for p in params)
    unwrap_model(by_keywords)
