"""OffloadedTensor and the fetch op: metadata, tracing context, the op itself, fetch order."""

import pytest
import torch
from torch import nn

from offload_tensor import OffloadedTensor, RecordingEngine, wrap_model_for_offload
from offload_tensor.ops import FetchStats, payload_key
from offload_tensor.payloads import Float8, Plain


def _wrapped(weight, kind=Plain(), fetches=True):
    return OffloadedTensor(kind.encode(weight), kind, weight.dtype, torch.device("cpu"), fetches)


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
    assert names_a == names_b == ["payload"]
    assert ctx_a == ctx_b and hash(ctx_a) == hash(ctx_b)  # dynamo guards on this: must not tell blocks apart
    rebuilt = OffloadedTensor.__tensor_unflatten__({"payload": a.payload}, ctx_a, a.shape, a.stride())
    assert torch.equal(rebuilt.materialize(), a.materialize())
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()


def test_fetch_op_schema_and_fake_agree():
    payload = [torch.randn(5, 3), torch.randn(5, 1)]
    torch.library.opcheck(torch.ops.offload_tensor.fetch.default, (payload, torch.randn(2), torch.device("cpu")))


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
        payload_key(p._inner): i // 4 for i, p in enumerate(model.parameters())
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
