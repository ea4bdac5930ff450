"""Every row of compile_rules is hit by a test that checks its rule, and the default is safe.

Each sample runs once with offloaded arguments (through the fetch op) and once with plain ones;
the row must be the one consulted, and the outcome must be what its rule promises.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import offload_tensor.tensor as tensor_module
from compile_rules import ATEN_RULES, TORCH_FUNCTION_RULES, Rule
from offload_tensor import OffloadedTensor, RefusedOpError
from offload_tensor.ops import FetchStats
from offload_tensor.payloads import FETCHED_VIEW, Plain

aten = torch.ops.aten


def off(t: torch.Tensor) -> OffloadedTensor:
    return OffloadedTensor((t.clone(),), Plain(), t.dtype, t.device, fetches=True)


def like(w, value):
    """`value`, offloaded when `w` is (the value a `.data =` sample assigns)."""
    return off(value) if isinstance(w, OffloadedTensor) else value


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# Each sample: (weights, fn(*weights) -> result). Weights are offloaded in the first run.
TF_SAMPLES = {
    F.linear: ([r(3, 4), r(3)], lambda w, b: F.linear(r(2, 4), w, b)),
    F.bilinear: ([r(3, 4, 5), r(3)], lambda w, b: F.bilinear(r(2, 4), r(2, 5), w, b)),
    F.embedding: ([r(10, 4)], lambda w: F.embedding(torch.tensor([[1, 7, 3]]), w)),
    F.conv1d: ([r(3, 2, 3), r(3)], lambda w, b: F.conv1d(r(1, 2, 8), w, b)),
    F.conv2d: ([r(3, 2, 3, 3), r(3)], lambda w, b: F.conv2d(r(1, 2, 6, 6), w, b, padding=1)),
    F.conv3d: ([r(3, 2, 3, 3, 3)], lambda w: F.conv3d(r(1, 2, 4, 4, 4), w)),
    F.conv_transpose1d: ([r(2, 3, 3)], lambda w: F.conv_transpose1d(r(1, 2, 8), w)),
    F.conv_transpose2d: ([r(2, 3, 3, 3)], lambda w: F.conv_transpose2d(r(1, 2, 5, 5), w)),
    F.conv_transpose3d: ([r(2, 3, 3, 3, 3)], lambda w: F.conv_transpose3d(r(1, 2, 3, 3, 3), w)),
    F.layer_norm: ([r(4), r(4)], lambda w, b: F.layer_norm(r(2, 4), (4,), w, b)),
    F.group_norm: ([r(4), r(4)], lambda w, b: F.group_norm(r(1, 4, 3), 2, w, b)),
    F.rms_norm: ([r(4)], lambda w: F.rms_norm(r(2, 4), (4,), w)),
    F.batch_norm: ([r(4), r(4)], lambda w, b: F.batch_norm(r(3, 4), r(4), r(4).abs(), w, b)),
    F.instance_norm: ([r(4), r(4)], lambda w, b: F.instance_norm(r(1, 4, 5), weight=w, bias=b)),  # kwargs
    F.prelu: ([r(1)], lambda w: F.prelu(r(2, 3), w)),
    torch.Tensor.data.__set__: ([r(3, 3)], lambda w: (setattr(w, "data", like(w, torch.full((3, 3), 2.0))), w)[1]),
    torch.Tensor.__setitem__: ([r(3, 3)], lambda w: (w.__setitem__(slice(1, 3), torch.full((2, 3), 5.0)), w)[1]),
}

ATEN_SAMPLES = {
    aten.detach: ([r(3, 3)], lambda w: w.detach()),
    aten.alias: ([r(3, 3)], lambda w: aten.alias(w)),
    aten.clone: ([r(3, 3)], lambda w: w.clone()),
    aten.copy_: ([r(3, 3)], lambda w: w.copy_(torch.ones(3, 3))),
    aten.empty_like: ([r(3, 3)], lambda w: torch.empty_like(w)),
    aten.zeros_like: ([r(3, 3)], lambda w: torch.zeros_like(w)),
    aten.ones_like: ([r(3, 3)], lambda w: torch.ones_like(w)),
    aten.full_like: ([r(3, 3)], lambda w: torch.full_like(w, 7.0)),
    aten.rand_like: ([r(3, 3)], lambda w: torch.rand_like(w)),
    aten.randn_like: ([r(3, 3)], lambda w: torch.randn_like(w)),
    aten.new_empty: ([r(3, 3)], lambda w: w.new_empty(2, 5)),
    aten.new_empty_strided: ([r(3, 3)], lambda w: w.new_empty_strided((2, 5), (5, 1))),
    aten.new_zeros: ([r(3, 3)], lambda w: w.new_zeros(2, 5)),
    aten.new_ones: ([r(3, 3)], lambda w: w.new_ones(2, 5)),
    aten.new_full: ([r(3, 3)], lambda w: w.new_full((2, 5), 3.0)),
    aten._to_copy: ([r(3, 3)], lambda w: w.to(torch.float64)),
    aten.t: ([r(3, 4)], lambda w: w.t()),
    aten.view: ([r(3, 4)], lambda w: w.view(4, 3)),
    aten.unsqueeze: ([r(4)], lambda w: w.unsqueeze(0)),
    aten.expand: ([r(4)], lambda w: w.expand(2, 4)),
    aten.slice: ([r(4, 4)], lambda w: w[1:3]),
    aten.select: ([r(4, 4)], lambda w: w[1]),
    aten.addmm: ([r(3, 4), r(4)], lambda w, b: torch.addmm(b, r(3, 3), w)),
    aten.mm: ([r(3, 4)], lambda w: r(2, 3) @ w),
    aten.bmm: ([r(2, 3, 4)], lambda w: torch.bmm(r(2, 5, 3), w)),
    aten.add: ([r(4)], lambda w: r(2, 4) + w),
    aten.sub: ([r(4)], lambda w: r(2, 4) - w),
    aten.mul: ([r(4)], lambda w: r(2, 4) * w),
    aten.div: ([r(4)], lambda w: r(2, 4) / w),
    aten.cat: ([r(2, 4), r(3, 4)], lambda a, b: torch.cat([a, b])),
    aten.stack: ([r(4), r(4)], lambda a, b: torch.stack([a, b])),
    aten.equal: ([r(4)], lambda w: torch.equal(w, r(4))),
    aten.fill_: ([r(3)], lambda w: w.fill_(1.0)),
    aten.zero_: ([r(3)], lambda w: w.zero_()),
    aten.add_: ([r(3)], lambda w: w.add_(torch.ones(3))),
    aten.sub_: ([r(3)], lambda w: w.sub_(torch.ones(3))),
    aten.mul_: ([r(3)], lambda w: w.mul_(2.0)),
    aten.normal_: ([r(3)], lambda w: w.normal_()),
    aten.uniform_: ([r(3)], lambda w: w.uniform_()),
    aten.set_: ([r(3)], lambda w: w.set_(torch.zeros(3))),
    aten.resize_: ([r(3)], lambda w: w.resize_(5)),
}


class _Recorder(dict):
    """The torch-function table, recording which rows were consulted."""

    def __init__(self, table, seen):
        super().__init__(table)
        self.seen = seen

    def get(self, key, default=None):
        if key in self:
            self.seen.add(key)
        return super().get(key, default)


@pytest.fixture
def seen(monkeypatch):
    seen: set = set()
    monkeypatch.setattr(tensor_module, "_tf_rule", _Recorder(TORCH_FUNCTION_RULES, seen).get)
    real_aten_rule = tensor_module.aten_rule

    def recording_aten_rule(op):
        if op.overloadpacket in ATEN_RULES:
            seen.add(op.overloadpacket)
        return real_aten_rule(op)

    monkeypatch.setattr(tensor_module, "aten_rule", recording_aten_rule)
    return seen


def test_every_row_has_a_sample():
    assert set(TF_SAMPLES) == set(TORCH_FUNCTION_RULES)
    assert set(ATEN_SAMPLES) == set(ATEN_RULES)


ROWS = [(op, TORCH_FUNCTION_RULES[op], TF_SAMPLES[op]) for op in TF_SAMPLES] + [
    (op, ATEN_RULES[op], ATEN_SAMPLES[op]) for op in ATEN_SAMPLES
]


@pytest.mark.parametrize("op,rule,sample", ROWS, ids=[getattr(op, "__name__", str(op)) for op, _, _ in ROWS])
def test_row_is_hit_and_keeps_its_promise(op, rule, sample, seen):
    weights, fn = sample
    wrapped = [off(w) for w in weights]
    before = FetchStats.calls
    if rule is Rule.REFUSE:
        with pytest.raises(RefusedOpError, match="in place"):
            fn(*wrapped)
        assert op in seen
        assert all(torch.equal(w.materialize(), orig) for w, orig in zip(wrapped, weights))  # nothing written
        return
    result = fn(*wrapped)
    assert op in seen, f"{op} was not consulted: the sample does not reach its row"
    fetched = FetchStats.calls - before
    plain = [w.clone() for w in weights]
    expected = fn(*plain)
    if rule is Rule.MATERIALIZE:
        assert fetched >= 1
        if isinstance(result, OffloadedTensor):  # a view of a fetched weight (see test_writes_into_fetched_views...)
            assert result._kind is FETCHED_VIEW and not result._fetches and op in VIEWS
            result = result.materialize()
        assert torch.equal(result, expected) if isinstance(expected, torch.Tensor) else result == expected
    elif rule is Rule.METADATA:
        assert fetched == 0 and type(result) is torch.Tensor
        assert (result.shape, result.dtype, result.device) == (expected.shape, expected.dtype, expected.device)
    elif rule is Rule.ALIAS:
        assert fetched == 0 and type(result) is OffloadedTensor and result._inner[0] is wrapped[0]._inner[0]
    elif rule is Rule.CLONE:
        assert fetched == 0 and type(result) is OffloadedTensor
        assert result._inner[0].data_ptr() != wrapped[0]._inner[0].data_ptr()
        assert torch.equal(result.materialize(), weights[0])
    elif rule is Rule.WRITE_THROUGH:
        assert result is wrapped[0] and torch.equal(wrapped[0].materialize(), expected)
    else:
        raise AssertionError(f"no check for {rule}")


VIEWS = {aten.t, aten.view, aten.unsqueeze, aten.expand, aten.slice, aten.select}


@pytest.mark.parametrize(
    "write",
    [
        lambda w: w[0].fill_(0.0),
        lambda w: w.view(-1).add_(1.0),
        lambda w: w.t().copy_(torch.zeros(4, 3)),
        lambda w: w.data[1].mul_(2.0),
        lambda w: w[0].__setitem__(1, 3.0),
        lambda w: w[0][1:3].fill_(0.0),
    ],
    ids=["select.fill_", "view.add_", "t.copy_", "data.select.mul_", "select.setitem", "select.slice.fill_"],
)
def test_writes_into_views_of_a_fetched_weight_are_refused_not_lost(write):
    """A view of a fetched weight views the fetched copy: a write into it could never reach the
    weight, so it is refused; a zero-copy weight's views are real views, and writes land."""
    weight = r(3, 4)
    w = off(weight)
    with pytest.raises(RefusedOpError, match="view of an offloaded weight"):
        write(w)
    assert torch.equal(w.materialize(), weight)
    zero_copy = OffloadedTensor((weight.clone(),), Plain(), weight.dtype, weight.device, fetches=False)
    plain = weight.clone()
    write(zero_copy)
    write(plain)
    assert torch.equal(zero_copy.materialize(), plain)


def test_op_without_a_row_materializes_and_logs_once(caplog):
    w = off(r(3, 3))
    with caplog.at_level(logging.DEBUG, logger="compile_rules"):
        assert torch.equal(torch.sin(w), torch.sin(w.materialize()))
        assert torch.equal(torch.sin(w), torch.sin(w.materialize()))
    assert sum("aten.sin.default has no row" in m for m in caplog.messages) == 1


def test_in_place_op_without_a_row_is_refused():
    w = off(r(3))
    with pytest.raises(RefusedOpError, match="aten::sin_"):
        w.sin_()


def test_op_writing_into_a_plain_tensor_reads_the_weight():
    w, dst = off(r(3)), torch.zeros(3)
    dst.copy_(w)  # copy_ row, but the offloaded tensor is the source: materialize, not write-through
    assert torch.equal(dst, w.materialize())
    out = torch.empty(3)
    torch.add(w, 1.0, out=out)
    assert torch.equal(out, w.materialize() + 1)
