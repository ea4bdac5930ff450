"""Writes: every write into an offloaded weight lands in the payload, or is refused with the weight
bit-unchanged, for every payload kind and every engine. A hypothesis property test drives random
sequences of writes (in-place ops, out= arguments, writes through views and views of views, all
of nn.init, load_state_dict with and without assign, `.data =`, `w[i] = v`) against a plain twin;
a forward after each sequence checks that no engine serves a stale copy."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import engine_for
from torch import nn

from offload_tensor import OffloadedTensor, RefusedOpError, wrap_model_for_offload
from offload_tensor.payloads import Float8

SCALE = int(os.environ.get("OFFLOAD_TENSOR_FUZZ", "1"))
FP8 = Float8(torch.float8_e4m3fn)


class Net(nn.Module):
    """A weight of each shape writes meet: 2-d (Linear), 1-d (norm), 4-d (Conv); an embedding
    tied to the head."""

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, image):
        h = self.block(self.embed(ids))
        return self.head(h).sum() + self.conv(image).sum(), h


def twin_value(value: torch.Tensor, payload: str) -> torch.Tensor:
    """What a weight holds after `value` is written into it: the value itself, or (fp8) its
    re-encoding, as wrap would store it."""
    if payload == "fp8" and value.ndim >= 2:
        return FP8.decode(FP8.encode(value), value.dtype)
    return value


# Each write: name -> (fn(weight, seed), which weights it applies to, lands on encoded payloads).
# fn does on a wrapped weight exactly what it does on a plain twin.
def _seeded(f):
    def run(w, seed):
        torch.manual_seed(seed)
        return f(w)

    return run


WRITES = {
    "add_": (_seeded(lambda w: w.add_(torch.randn(w.shape))), "any", False),
    "mul_": (_seeded(lambda w: w.mul_(0.5)), "any", False),
    "clamp_": (_seeded(lambda w: w.clamp_(-0.1, 0.1)), "any", False),
    "copy_": (_seeded(lambda w: w.copy_(torch.randn(w.shape))), "any", True),
    "copy_broadcast": (_seeded(lambda w: w.copy_(torch.randn(w.shape[-1]))), "any", True),
    "fill_": (_seeded(lambda w: w.fill_(0.25)), "any", False),
    "out=": (_seeded(lambda w: torch.mul(torch.randn(w.shape), 2.0, out=w)), "any", False),
    "view.select.fill_": (_seeded(lambda w: w[0].fill_(1.5)), "any", False),
    "view.view.add_": (_seeded(lambda w: w.view(-1)[1:3].add_(1.0)), "any", False),
    "view.t.copy_": (_seeded(lambda w: w.t()[0].copy_(torch.randn(w.shape[0]))), "2d", False),
    "setitem": (_seeded(lambda w: w.__setitem__(0, torch.randn(w.shape[1:]))), "any", False),
    "data.add_": (_seeded(lambda w: w.data.add_(1.0)), "any", False),
    **{
        f"init.{name}": (_seeded(lambda w, f=getattr(nn.init, name): f(w)), where, False)  # noqa: B008 (bound per name)
        for name, where in [
            ("uniform_", "any"), ("normal_", "any"), ("trunc_normal_", "any"), ("zeros_", "any"),
            ("ones_", "any"), ("eye_", "2d"), ("dirac_", "4d"), ("xavier_uniform_", "2d+"),
            ("xavier_normal_", "2d+"), ("kaiming_uniform_", "2d+"), ("kaiming_normal_", "2d+"),
            ("orthogonal_", "2d+"),
        ]
    },
    "init.sparse_": (_seeded(lambda w: nn.init.sparse_(w, 0.5)), "2d", False),
    "init.constant_": (_seeded(lambda w: nn.init.constant_(w, 0.3)), "any", False),
}  # fmt: skip
STATE_WRITES = ["load_state_dict", "load_state_dict(assign=True)", "assign parameter"]


def _applies(where: str, w: torch.Tensor) -> bool:
    return {"any": True, "2d": w.ndim == 2, "4d": w.ndim == 4, "2d+": w.ndim >= 2}[where]


def payload_snapshot(model) -> list[torch.Tensor]:
    return [t.clone() for p in model.parameters() for t in p._inner]


def assert_unchanged(model, snapshot) -> None:
    now = [t for p in model.parameters() for t in p._inner]
    assert len(now) == len(snapshot) and all(torch.equal(a, b) for a, b in zip(now, snapshot))


@st.composite
def write_sequences(draw):
    payload = draw(st.sampled_from(["plain", "fp8"]))
    engine = draw(st.sampled_from(["zero-copy", "sync", "streaming"]))
    prefetch = draw(st.integers(0, 3))
    granularity = draw(st.sampled_from(["block", "leaf"]))
    names = [n for n, _ in Net().named_parameters()]
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(list(WRITES) + STATE_WRITES), st.sampled_from(names), st.integers(0, 2**16)),
            min_size=1,
            max_size=6,
        )
    )
    return payload, engine, prefetch, granularity, steps


def build(payload, engine, prefetch, granularity):
    torch.manual_seed(0)
    plain = Net().eval()
    twin = Net().eval()
    twin.load_state_dict(plain.state_dict())
    model = wrap_model_for_offload(
        plain, engine=engine_for(engine), storage_dtype=torch.float8_e4m3fn if payload == "fp8" else None,
        prefetch=prefetch, granularity=granularity,
    )  # fmt: skip
    with torch.no_grad():  # the twin holds what the payloads decode to
        for (_, p), (_, t) in zip(model.named_parameters(), twin.named_parameters()):
            t.copy_(p.materialize())
    return model, twin


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (2, 3), generator=g), torch.randn(1, 2, 4, 4, generator=g)


def apply_state_write(kind, model, twin, name, seed):
    torch.manual_seed(seed)
    new = {k: torch.randn(v.shape) for k, v in twin.state_dict().items()}
    if kind == "assign parameter":
        module_name, _, attr = name.rpartition(".")
        value = new[name]
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value.clone(), requires_grad=False))
        new = {name: value}
    else:
        model.load_state_dict({k: v.clone() for k, v in new.items()}, assign="assign" in kind)
    with torch.no_grad():
        for key, value in new.items():
            twin_param = twin.get_parameter(key)
            twin_param.copy_(twin_value(value, "fp8" if twin_param.ndim >= 2 and model_is_fp8(model) else "plain"))


def model_is_fp8(model) -> bool:
    return any(p._kind.name == "fp8" for p in model.parameters())


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(write_sequences())
def test_random_writes_land_or_are_refused_with_the_weight_unchanged(case):
    payload, engine, prefetch, granularity, steps = case
    model, twin = build(payload, engine, prefetch, granularity)
    with torch.no_grad():
        model(*inputs(0))  # an engine that prefetches holds the weights in its slots now
    for write, name, seed in steps:
        weight, plain = model.get_parameter(name), twin.get_parameter(name)
        if write in STATE_WRITES:
            apply_state_write(write, model, twin, name, seed)
        else:
            fn, where, lands_encoded = WRITES[write]
            if not _applies(where, weight):
                continue
            encoded = weight._kind.name != "plain"
            snapshot = payload_snapshot(model)
            if encoded and not lands_encoded:
                with pytest.raises(RefusedOpError):
                    fn(weight, seed)
                assert_unchanged(model, snapshot)
                continue
            fn(weight, seed)
            with torch.no_grad():
                fn(plain, seed)
                if encoded:
                    plain.copy_(twin_value(plain.clone(), payload))
        assert isinstance(model.get_parameter(name), OffloadedTensor)
        for (n, p), t in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.materialize(), t), (write, n)
    with torch.no_grad():  # no engine serves a copy older than the payloads
        out, hidden = model(*inputs(1))
        expected, expected_hidden = twin(*inputs(1))
    assert torch.equal(out, expected) and torch.equal(hidden, expected_hidden)


@pytest.mark.parametrize("payload", ["plain", "fp8"])
def test_write_inside_a_compiled_forward_is_refused_before_anything_changes(payload):
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin.weight.add_(1.0)
            return self.lin(x)

    torch.manual_seed(0)
    model = wrap_model_for_offload(Writes(), engine=engine_for("sync"),
                                   storage_dtype=torch.float8_e4m3fn if payload == "fp8" else None)  # fmt: skip
    snapshot = payload_snapshot(model)
    with pytest.raises(Exception) as raised, torch.no_grad():
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(2, 4))
    chain, e = [], raised.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, RefusedOpError) for e in chain), chain
    assert_unchanged(model, snapshot)


VIEW_WRITES = {
    "fill-row": lambda w, x: (w[0].fill_(0), x * 2)[1],  # the write is the graph's last use of the weight
    "through-t": lambda w, x: (w.t()[1].mul_(3), x + w.sum())[1],
    "out-into-row": lambda w, x: (torch.add(x[:4], 1, out=w[0]), x * 2)[1],
    "view-of-view": lambda w, x: (w.view(-1)[2:5].zero_(), x @ w)[1],
}


@pytest.mark.parametrize("write", list(VIEW_WRITES))
@pytest.mark.parametrize("home", ["zero-copy", "sync", "disk", "fp8"])
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "breaks-allowed"])
def test_a_write_through_a_view_inside_a_compiled_function_is_refused_on_every_tier(write, home, fullgraph, tmp_path):
    """Under tracing a view of a weight is a plain tensor of the fetched weight: a write into it
    landed in that copy, lost, on every tier but the zero-copy one (where AOTAutograd saw the
    input mutation). Refused at compile time everywhere, before anything changed."""
    torch.manual_seed(0)
    kwargs = {"disk": dict(offload="disk", disk_path=tmp_path), "fp8": dict(storage_dtype=torch.float8_e4m3fn),
              "sync": dict(engine=engine_for("sync")), "zero-copy": {}}[home]  # fmt: skip
    model = wrap_model_for_offload(nn.Linear(4, 4), device="cpu", **kwargs)
    snapshot = payload_snapshot(model)
    with pytest.raises(Exception) as raised, torch.no_grad():
        torch.compile(VIEW_WRITES[write], fullgraph=fullgraph)(model.weight, torch.ones(4))
    chain, e = [], raised.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, RefusedOpError) for e in chain) or "write through a view" in str(raised.value), chain
    assert_unchanged(model, snapshot)
