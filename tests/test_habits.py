"""What users do with models, on the families where each habit broke: non-contiguous weights
(GPT-2's Conv1D), models built or wrapped under inference_mode (diffusers' tests), torch.export of
fp8 payloads (a transformers LLM), reading values (tolist, numpy, .cpu()), torch.jit.trace (a
clear error, never a trace that bakes the weights in)."""

import numpy as np
import pytest
import torch
from models import CASES, output
from torch import nn

from offload_tensor import RefusedOpError, unwrap_model, wrap_model_for_offload
from offload_tensor.testing import RecordingEngine

FLUX = CASES[0]
PAYLOADS = {
    "zero-copy": {},
    "fetched": {"engine": "sync"},
    "fp8": {"storage_dtype": torch.float8_e4m3fn},
}


def wrap(model, payload):
    kwargs = dict(PAYLOADS[payload])
    if kwargs.get("engine") == "sync":
        kwargs["engine"] = RecordingEngine()
    return wrap_model_for_offload(model, **kwargs)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_non_contiguous_weights_reshape_flatten_and_contiguous(payload):
    """GPT-2 keeps (in, out) weights; code that transposes them and reshapes (w.t().reshape(-1))
    needs .contiguous() to give a contiguous tensor. A weight that is non-contiguous at wrap
    time too."""
    model = tiny_gpt2()
    model.h[0].mlp.c_fc.weight = nn.Parameter(model.h[0].mlp.c_fc.weight.detach().t().contiguous().t())
    with torch.no_grad():
        expected = model(IDS).last_hidden_state
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrap(model, payload)
    with torch.no_grad():
        if payload != "fp8":
            assert torch.equal(model(IDS).last_hidden_state, expected)
        for name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"):
            w, ref = model.get_parameter(name), plain[name]
            value = w.materialize()
            assert w.t().contiguous().is_contiguous() and w.contiguous().is_contiguous()
            assert torch.equal(w.t().reshape(-1), value.t().reshape(-1))
            assert torch.equal(w.t().flatten(), value.t().flatten()) and torch.equal(w.reshape(-1), value.reshape(-1))
            if payload != "fp8":
                assert torch.equal(value, ref)


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("where", ["built", "wrapped", "unwrapped"])
def test_inference_mode_where_diffusers_tests_use_it(payload, where):
    """Built under inference_mode (as diffusers' tests build models), or wrapped, or unwrapped
    there: the model runs, loads a state dict and unwraps outside it as the same plain model
    would (a model built under inference_mode is not writable outside it, wrapped or not)."""
    if where == "built":
        with torch.inference_mode():
            model = FLUX.make()
        wrap(model, payload)
    else:
        model = FLUX.make()
        with torch.inference_mode():
            wrap(model, payload)
    plain = FLUX.make()
    with torch.no_grad():
        if payload != "fp8":
            assert torch.equal(output(model(**FLUX.inputs(0))), output(plain(**FLUX.inputs(0))))
    if where != "built":  # writable, as before wrapping
        state = {k: v * 0.5 for k, v in plain.state_dict().items()}
        model.load_state_dict(state)
        plain.load_state_dict(state)
        with torch.no_grad():
            if payload != "fp8":
                assert torch.equal(output(model(**FLUX.inputs(1))), output(plain(**FLUX.inputs(1))))
    if where == "unwrapped":
        with torch.inference_mode():
            unwrap_model(model)
    else:
        unwrap_model(model)
    assert all(type(p) is nn.Parameter and p.is_inference() == (where == "built") for p in model.parameters())
    if where != "built":
        model.load_state_dict(plain.state_dict())  # a normal model again
    with torch.no_grad():
        model(**FLUX.inputs(2))


@pytest.mark.parametrize("storage_dtype", [None, torch.float8_e4m3fn], ids=["plain", "fp8"])
def test_torch_export_of_an_llm_with_offloaded_weights(storage_dtype):
    engine = RecordingEngine()
    model = wrap_model_for_offload(tiny_llama(), engine=engine, storage_dtype=storage_dtype)
    with torch.no_grad():
        expected = model(IDS).logits
    program = torch.export.export(model, (IDS,))
    # the weights stay offloaded: parameters of the program, none baked in as a constant
    shapes = {p.shape for p in model.parameters()}
    assert not [c for c in program.constants.values() if isinstance(c, torch.Tensor) and c.shape in shapes]
    engine.keys.clear()
    result = program.module()(IDS)
    assert torch.equal(result.logits if hasattr(result, "logits") else result[0], expected)
    assert set(engine.keys) == {int(p._key) for p in model.parameters()}  # each fetched at run time


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_reading_values_on_the_host(payload):
    model = wrap(nn.Linear(3, 4), payload)
    w = model.weight
    value = w.materialize()
    assert torch.equal(torch.tensor(w.tolist()), value) and torch.equal(torch.tensor(w.detach().tolist()), value)
    assert np.array_equal(w.detach().numpy(), value.numpy()) and np.array_equal(np.asarray(w), value.numpy())
    assert torch.equal(w.cpu(), value) and float(w[1, 2]) == value[1, 2].item()
    assert torch.equal(torch.tensor(w[0].tolist()), value[0])


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_jit_trace_is_a_clear_error_and_unwrap_makes_it_work(payload):
    model = wrap(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4)), payload)
    x = torch.randn(2, 4)
    with pytest.raises(RefusedOpError, match="torch.jit.trace cannot trace offloaded weights"):
        torch.jit.trace(model, x)
    traced = torch.jit.trace(unwrap_model(model), x)
    assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("family", ["mha", "encoder-layer"])
def test_attention_fast_path_difference_is_as_stated_in_the_readme(family):
    """nn.MultiheadAttention / TransformerEncoderLayer skip their fused eval fast path when an
    argument has __torch_function__ (our weights do): a documented rounding difference."""
    build = {
        "mha": lambda: nn.MultiheadAttention(16, 2, batch_first=True),
        "encoder-layer": lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
    }[family]
    torch.manual_seed(0)
    plain = build().eval()
    torch.manual_seed(0)
    model = wrap(build().eval(), "fetched")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run = (lambda m: m(x, x, x)[0]) if family == "mha" else (lambda m: m(x))
        diff = (run(model) - run(plain)).abs().max().item()
    print(f"\nmeasured {family} fast-path difference: {diff:.1e}")
    assert diff <= 5e-7


@pytest.mark.parametrize("shape,dims", [((5, 2, 16), (0, 1)), ((3, 5, 2, 16), (1, 2))])
def test_linear_on_non_contiguous_input_is_bit_exact(shape, dims):
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    model = wrap(nn.Linear(16, 8), "fetched")
    model.load_state_dict(plain.state_dict())
    x = torch.randn(*shape).transpose(*dims)
    assert torch.equal(model(x), plain(x))  # grad mode: the plain weight requires grad, ours does not
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


# -- writes a review found lost (each: lands equal to the plain model, or raises) ---------------
HOMES = ["zero-copy", "sync", "streaming", "disk"]


def wrap_home(model, home, tmp_path, **kwargs):
    from models import engine_for

    if home == "disk":
        return wrap_model_for_offload(model, offload="disk", disk_path=tmp_path, granularity="leaf", **kwargs)
    return wrap_model_for_offload(model, engine=engine_for(home), granularity="leaf", **kwargs)


def small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(16, 8, max_norm=1.0), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("home", HOMES)
def test_as_strided_with_an_offset_writes_and_reads_the_weight_itself(home, tmp_path):
    """A payload inside a host arena or a disk file starts at a storage offset: an explicit
    as_strided offset is relative to the weight, not to the arena (it landed in the neighbour)."""
    plain, model = small(), wrap_home(small(), home, tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        model(ids)
        for m in (plain, model):
            m[1].bias.as_strided((2,), (1,), 1).copy_(torch.tensor([7.0, 8.0]))
        assert torch.equal(
            model[1].bias.as_strided((3,), (2,), 1).materialize(), plain[1].bias.as_strided((3,), (2,), 1)
        )
        assert torch.equal(model(ids), plain(ids))
    assert all(
        torch.equal(a, b) for a, b in zip(unwrap_model(model).state_dict().values(), plain.state_dict().values())
    )


@pytest.mark.parametrize("home", HOMES)
def test_embedding_max_norm_renormalizes_the_weight_like_the_plain_model(home, tmp_path):
    plain, model = small(), wrap_home(small(), home, tmp_path)
    ids = torch.tensor([[1, 2, 3, 9]])
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids), plain(ids))
    assert torch.equal(unwrap_model(model)[0].weight, plain[0].weight)  # rows 1, 2, 3, 9 renormalized in place
    fp8 = wrap_model_for_offload(small(), storage_dtype=torch.float8_e4m3fn)
    before = fp8[0].weight.payload_value().clone()
    with pytest.raises(RefusedOpError, match="embedding_renorm_"), torch.no_grad():
        fp8(ids)
    assert torch.equal(fp8[0].weight.payload_value(), before)


@pytest.mark.parametrize("home", HOMES)
def test_foreach_and_multi_output_out_writes_return_what_torch_returns(home, tmp_path):
    plain, model = small(), wrap_home(small(), home, tmp_path)
    with torch.no_grad():
        for m in (plain, model):
            torch._foreach_mul_([m[1].weight], 2.0)
            torch._foreach_lerp_([m[3].weight], [torch.ones(4, 8)], 0.5)  # an EMA update
            values, indices = torch.sort(
                torch.randn(4, generator=torch.Generator().manual_seed(0)),
                out=(m[3].bias, torch.empty(4, dtype=torch.long)),
            )
            assert values is m[3].bias and indices.dtype == torch.long
        assert torch.equal(model(torch.tensor([[1, 2]])), plain(torch.tensor([[1, 2]])))


@pytest.mark.parametrize("home", HOMES)
def test_numpy_views_of_weights_are_read_only(home, tmp_path):
    """A write through a numpy array of a fetched or decoded copy would go nowhere: numpy refuses it."""
    plain, model = small(), wrap_home(small(), home, tmp_path)
    for array in (model[1].weight.detach().numpy(), np.asarray(model[1].weight)):
        np.testing.assert_array_equal(array, plain[1].weight.detach().numpy())
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 42.0
    assert torch.equal(model[1].weight.materialize(), plain[1].weight)


@pytest.mark.parametrize("bias", [False, True], ids=["one-weight-groups", "two-weight-groups"])
def test_state_dict_of_fetched_weights_is_a_copy_never_half_seen(bias):
    """A write into a state_dict tensor of a streamed weight went into the host arena behind the
    engine's back when the group held one weight (the forward kept the stale slot, unwrap showed
    the write). Such tensors are copies now: the model is unchanged, in every view of it."""
    from models import engine_for

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8, bias=bias), nn.Linear(8, 8, bias=bias)).eval()

    x = torch.randn(2, 8)
    model = wrap_model_for_offload(build(), engine=engine_for("streaming"), granularity="leaf")
    with torch.no_grad():
        expected = build()(x)
        model(x)
        model.state_dict()["0.weight"].mul_(2)
        assert torch.equal(model(x), expected)
    assert torch.equal(unwrap_model(model)(x), expected)


@pytest.mark.parametrize("home", [*HOMES, "fp8"])
def test_state_dict_keep_vars_hands_out_the_parameters_whose_writes_land(home, tmp_path):
    """accelerate- and peft-style tooling collects weights with state_dict(keep_vars=True) and
    writes through them: they are the parameters themselves (a copy lost the write)."""
    plain = small()
    model = (
        wrap_model_for_offload(small(), storage_dtype=torch.float8_e4m3fn)
        if home == "fp8"
        else wrap_home(small(), home, tmp_path)
    )
    state = model.state_dict(keep_vars=True)
    assert all(state[n] is p for n, p in model.named_parameters())
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        if home == "fp8":  # a partial write would re-quantize: refused; a whole value lands
            with pytest.raises(RefusedOpError):
                state["1.weight"].mul_(2)
            state["1.weight"].copy_(model[1].weight.materialize() * 2)  # fp8 values doubled: exact
            assert torch.equal(
                model[1].weight.materialize(),
                wrap_model_for_offload(small(), storage_dtype=torch.float8_e4m3fn)[1].weight.materialize() * 2,
            )
            return
        model(ids)  # slots hold the old values
        for m in (plain, model):
            m.state_dict(keep_vars=True)["1.weight"].mul_(2)
            m.state_dict(keep_vars=True)["3.bias"][0] = 5.0
        assert torch.equal(model(ids), plain(ids))


def test_cuda_on_a_torch_without_cuda_is_ignored_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    model = wrap_model_for_offload(small())
    for move in (lambda m: m.cuda(), lambda m: m.to("cuda")):
        with pytest.warns(UserWarning, match="ignored: its weights are managed by offload_tensor"):
            assert move(model) is model
    assert torch.equal(model(torch.tensor([[1, 2]])), small()(torch.tensor([[1, 2]])))


def test_channels_last_after_wrapping_warns_and_keeps_outputs():
    """The payloads keep the layout they were wrapped with (a conv kernel converted before the
    wrap stays channels_last); a conversion afterwards says so instead of doing nothing quietly."""
    def conv():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).eval()

    plain, model = conv(), wrap_model_for_offload(conv())
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="memory_format=...\\) is not applied") as caught:
        model.to(memory_format=torch.channels_last)
    assert len([w for w in caught if "memory_format" in str(w.message)]) == 1  # once, not per module
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    before = conv().to(memory_format=torch.channels_last)
    wrapped = wrap_model_for_offload(conv().to(memory_format=torch.channels_last))
    assert wrapped[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(wrapped(x), before(x))


@pytest.mark.parametrize("home", ["zero-copy", "sync", "streaming", "disk", "fp8"])
def test_fuse_qkv_projections_after_wrapping_offloads_the_fused_weights(home, tmp_path):
    """diffusers builds fused projections (torch.cat of the weights) as plain parameters: they
    were left outside the offload and the budget, silently. They are offloaded like the others
    (in fp8 where the model's storage says so), unfusing lets go of them, and outputs are the
    plain model's, fused and unfused."""
    from offload_tensor import OffloadedTensor, offload_report

    def run(model):
        with torch.no_grad():
            return output(model(**FLUX.inputs(0)))

    plain = FLUX.make()
    if home == "fp8":
        model = wrap_model_for_offload(FLUX.make(), storage_dtype=torch.float8_e4m3fn, engine=RecordingEngine())
        reference = lambda: wrap_model_for_offload(  # noqa: E731 - the same model fused before wrapping
            _fused(FLUX.make()), storage_dtype=torch.float8_e4m3fn, engine=RecordingEngine())
    else:
        model = wrap_home(FLUX.make(), home, tmp_path / "a")
        reference = lambda: _fused(FLUX.make())  # noqa: E731
    before = offload_report(model).by_kind
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    assert all(isinstance(p, OffloadedTensor) for p in model.parameters())
    assert "unwrapped" not in offload_report(model).by_kind
    assert sum(offload_report(model).by_kind.values()) > sum(before.values())  # the fused weights are counted
    assert torch.equal(run(model), run(reference()))
    model.unfuse_qkv_projections()
    assert not hasattr(model.transformer_blocks[0].attn, "to_qkv")
    assert offload_report(model).by_kind == before and sum(g.nbytes for g in model._offload_state.plan.groups) == sum(
        g.nbytes for g in wrap_home(FLUX.make(), "sync", tmp_path)._offload_state.plan.groups
    ) or home == "fp8"
    fp8 = home == "fp8"
    expected = run(wrap_model_for_offload(FLUX.make(), storage_dtype=torch.float8_e4m3fn) if fp8 else plain)
    assert torch.equal(run(model), expected)
    model.fuse_qkv_projections()
    unwrap_model(model)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    if home != "fp8":
        assert torch.equal(run(model), run(reference()))


def _fused(model):
    model.fuse_qkv_projections()
    return model
