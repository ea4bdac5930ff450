"""OffloadedTensor and the fetch op: metadata, tracing context, the op itself, fetch order."""

import pytest
import torch
from torch import nn

from compile_rules import FetchStats
from offload_tensor import OffloadedTensor, wrap_model_for_offload
from offload_tensor.ops import new_key
from offload_tensor.payloads import PLAIN, Float8, Plain
from offload_tensor.testing import RecordingEngine


def _wrapped(weight, kind=PLAIN, fetches=True):
    return OffloadedTensor(kind.encode(weight), kind, weight.dtype, torch.device("cpu"), new_key() if fetches else None)


def test_reports_compute_metadata_and_is_a_parameter():
    w = torch.randn(4, 3, dtype=torch.bfloat16)
    p = nn.Parameter(_wrapped(w, Float8(torch.float8_e4m3fn)), requires_grad=False)
    assert isinstance(p, OffloadedTensor) and isinstance(p, nn.Parameter)
    assert (p.shape, p.dtype, p.device) == (w.shape, torch.bfloat16, torch.device("cpu"))
    assert p.qdata.dtype == torch.float8_e4m3fn  # the payload is fp8, the exposed dtype is not
    before = FetchStats.calls
    assert "fp8 on cpu" in repr(p)
    assert FetchStats.calls == before  # repr never fetches


def test_flatten_context_is_per_type_not_per_weight():
    a, b = _wrapped(torch.randn(8, 8)), _wrapped(torch.randn(8, 8))
    names_a, ctx_a = a.__tensor_flatten__()
    names_b, ctx_b = b.__tensor_flatten__()
    assert names_a == names_b == ["payload", "_key"]  # identity travels as data (an inner tensor)
    assert ctx_a == ctx_b and hash(ctx_a) == hash(ctx_b)  # dynamo guards on this: must not tell blocks apart
    assert int(a._key) != int(b._key)
    rebuilt = OffloadedTensor.__tensor_unflatten__({"payload": a.payload, "_key": a._key}, ctx_a, a.shape, a.stride())
    assert torch.equal(rebuilt.materialize(), a.materialize())
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()


def test_fetch_op_schema_and_fake_agree():
    payload = [torch.randn(5, 3), torch.randn(5, 1)]
    torch.library.opcheck(
        torch.ops.offload_tensor.fetch.default, (payload, new_key(), torch.randn(2), torch.device("cpu"))
    )


def test_fetch_hands_over_fresh_memory():
    w = _wrapped(torch.randn(6, 6))
    fetched = w.materialize()
    assert torch.equal(fetched, w.payload)
    assert fetched.data_ptr() != w.payload.data_ptr()  # never an alias of the payload (see ops.py note)


def test_zero_copy_when_no_fetch_is_needed():
    w = _wrapped(torch.randn(6, 6), fetches=False)
    before = FetchStats.calls
    assert w.materialize().data_ptr() == w.payload.data_ptr()
    assert FetchStats.calls == before


# -- fetch order under inductor -------------------------------------------------------------
_timeline: list[tuple[str, int]] = []


@torch.library.custom_op("offload_tensor_test::mark", mutates_args=())
def _mark(x: torch.Tensor, layer: int) -> torch.Tensor:
    _timeline.append(("compute", layer))
    return x.clone()


@_mark.register_fake
def _(x, layer):
    return torch.empty_like(x)


class _Mark(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.ops.offload_tensor_test.mark(x, self.layer)


class _TimelineEngine(RecordingEngine):
    def __init__(self, layer_of_key):
        super().__init__()
        self.layer_of_key = layer_of_key

    def fetch(self, key, payload, device):
        _timeline.append(("fetch", self.layer_of_key[key]))
        return super().fetch(key, payload, device)


def _hoisting_backend():
    """An adversarial scheduler: moves every fetch as early as its data dependencies allow, then
    runs the graph. Any legal topological order must keep fetches in execution order; a fetch
    without a dependency on the activation would end up at the top of the graph here."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def hoist(gm, example_inputs):
        for node in list(gm.graph.nodes):
            if node.target is torch.ops.offload_tensor.fetch.default:
                position = {n: i for i, n in enumerate(gm.graph.nodes)}
                inputs = node.all_input_nodes
                latest = max(inputs, key=position.__getitem__)
                latest.append(node)
        gm.graph.lint()
        gm.recompile()
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=hoist)


@pytest.mark.parametrize("backend", ["inductor", "hoisting"])
def test_compiled_fetches_run_in_execution_order_not_hoisted(backend):
    torch.manual_seed(0)
    layers = 6
    model = nn.Sequential(*[m for i in range(layers) for m in (nn.Linear(32, 32), nn.LayerNorm(32), _Mark(i))])
    x = torch.randn(4, 32)
    with torch.no_grad():
        reference = model(x)
    engine = _TimelineEngine({})
    wrap_model_for_offload(model, engine=engine)
    engine.layer_of_key = {
        int(p._key): i // 4 for i, p in enumerate(model.parameters())
    }  # 4 weights per layer: linear weight, bias, norm weight, bias
    compiled = torch.compile(model, fullgraph=True, backend=_hoisting_backend() if backend == "hoisting" else backend)
    with torch.no_grad():
        compiled(x)
        _timeline.clear()
        out = compiled(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert sum(1 for kind, _ in _timeline if kind == "fetch") == 4 * layers
    # Every fetch of layer i happens after layer i-1 finished and before layer i finished.
    finished = -1
    for kind, layer in _timeline:
        if kind == "compute":
            assert layer == finished + 1
            finished = layer
        else:
            assert layer == finished + 1, f"layer {layer} fetched while layer {finished + 1} was running: {_timeline}"


@pytest.mark.parametrize("kind", [Plain(), Float8(torch.float8_e4m3fn), Float8(torch.float8_e5m2, per_channel=False)])
def test_detach_alias_and_clone_keep_the_wrapper(kind):
    w = _wrapped(torch.randn(4, 4), kind)
    d = w.detach()
    assert type(d) is OffloadedTensor and d._inner[0] is w._inner[0]
    c = w.clone()
    assert type(c) is OffloadedTensor and c._inner[0].data_ptr() != w._inner[0].data_ptr()
    assert torch.equal(c.materialize(), w.materialize())


# -- identity (see [Note: weight identity] in ops.py) ------------------------------------------
class _SharedStorage(nn.Module):
    """Two zero-size weights (all have data_ptr() == 0) and two weights over one storage (the same
    data_ptr): an address-keyed registry serves one for the other."""

    def __init__(self):
        super().__init__()
        self.empty_in = nn.Linear(0, 4)
        self.empty_out = nn.Linear(4, 0)
        base = torch.randn(4, 4)
        self.a = nn.Parameter(base)
        self.b = nn.Parameter(base.view(2, 8))

    def forward(self, x):
        y = self.empty_in(x[:, :0]) + x @ self.a
        return y.sum() + self.empty_out(y).sum() + (x.view(-1, 8) @ self.b.t()).sum()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_weights_without_an_address_of_their_own_are_each_served_their_own(prefetch):
    from offload_tensor.engine.fake import FakeBackend
    from offload_tensor.engine.streaming import StreamingEngine

    torch.manual_seed(0)
    plain = _SharedStorage()
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = plain(x)
    model = wrap_model_for_offload(plain, engine=StreamingEngine(FakeBackend()), prefetch=prefetch, granularity="leaf")
    keys = [int(p._key) for p in model.parameters()]
    assert len(set(keys)) == len(keys)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)


def test_two_live_models_never_share_a_key_and_a_dropped_model_leaves_none():
    import gc

    import offload_tensor.ops as ops

    a = wrap_model_for_offload(nn.Linear(4, 4), engine=RecordingEngine())
    b = wrap_model_for_offload(nn.Linear(4, 4), engine=RecordingEngine())
    keys_a = {int(p._key) for p in a.parameters()}
    assert keys_a.isdisjoint(int(p._key) for p in b.parameters())
    del a
    gc.collect()
    assert not keys_a & set(ops._engines)
    c = wrap_model_for_offload(nn.Linear(4, 4), engine=RecordingEngine())  # may reuse a's freed memory
    assert keys_a.isdisjoint(int(p._key) for p in c.parameters())


def test_alias_shares_the_key_clone_gets_a_new_one():
    w = _wrapped(torch.randn(3, 3))
    assert int(w.detach()._key) == int(w._key) and int(w.data._key) == int(w._key)
    assert int(w.clone()._key) != int(w._key)
