"""Every row of compile_rules is hit by a test that checks the promise of its handler, and the
defaults are safe.

Each sample runs once with offloaded weights (through the fetch op) and once with plain tensors;
the row must be the one consulted, and the outcome must be what its handler promises.
"""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import offload_tensor.tensor as tensor_module
from compile_rules import ATEN_RULES, TORCH_FUNCTION_RULES, FetchStats
from compile_rules import table as rules
from offload_tensor import OffloadedTensor, RefusedOpError
from offload_tensor.ops import new_key
from offload_tensor.payloads import PLAIN, Float8

aten = torch.ops.aten


def off(t: torch.Tensor, kind=PLAIN) -> OffloadedTensor:
    """An offloaded weight of value `t`, fetched through the op on every read."""
    return OffloadedTensor(kind.encode(t.clone()), kind, t.dtype, t.device, new_key())


def like(w, value):
    """`value`, offloaded when `w` is (the value a `.data =` sample assigns)."""
    return off(value) if isinstance(w, OffloadedTensor) else value


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# Each sample: (weights, fn(*weights) -> result). Weights are offloaded in the first run.
TF_SAMPLES = {
    F.linear: ([r(3, 4), r(3)], lambda w, b: F.linear(r(2, 4), w, b)),
    F.bilinear: ([r(3, 4, 5), r(3)], lambda w, b: F.bilinear(r(2, 4), r(2, 5), w, b)),
    F.embedding: (
        [r(10, 4)],
        lambda w: F.embedding(torch.tensor([[1, 7, 3]]), w, max_norm=1.0),
    ),  # renorms rows in place
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
    torch.Tensor.tolist: ([r(3, 4)], lambda w: torch.tensor(w.tolist())),
    torch.Tensor.numpy: ([r(3, 4)], lambda w: w.numpy()),
    torch.Tensor.__array__: ([r(3, 4)], lambda w: np.asarray(w)),
    # nn.RNN/GRU/LSTM call these with their weights as one list: (w_ih, w_hh, b_ih, b_hh)
    torch._VF.lstm: (
        [r(8, 3), r(8, 2), r(8), r(8)],
        lambda *w: torch._VF.lstm(r(4, 1, 3), (r(1, 1, 2), r(1, 1, 2)), list(w), True, 1, 0.0, False, False, False)[0],
    ),
    torch._VF.gru: (
        [r(6, 3), r(6, 2), r(6), r(6)],
        lambda *w: torch._VF.gru(r(4, 1, 3), r(1, 1, 2), list(w), True, 1, 0.0, False, False, False)[0],
    ),
    torch._VF.rnn_tanh: (
        [r(2, 3), r(2, 2), r(2), r(2)],
        lambda *w: torch._VF.rnn_tanh(r(4, 1, 3), r(1, 1, 2), list(w), True, 1, 0.0, False, False, False)[0],
    ),
    torch._VF.rnn_relu: (
        [r(2, 3), r(2, 2), r(2), r(2)],
        lambda *w: torch._VF.rnn_relu(r(4, 1, 3), r(1, 1, 2), list(w), True, 1, 0.0, False, False, False)[0],
    ),
    torch.Tensor.data.__set__: ([r(3, 3)], lambda w: (setattr(w, "data", like(w, torch.full((3, 3), 2.0))), w)[1]),
    torch.Tensor.__setitem__: ([r(3, 3)], lambda w: (w.__setitem__(slice(1, 3), torch.full((2, 3), 5.0)), w)[1]),
    torch.Tensor.requires_grad_: ([r(3)], lambda w: w.requires_grad_(True)),
    torch.Tensor.requires_grad.__set__: ([r(3)], lambda w: setattr(w, "requires_grad", True)),
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
    aten.add_: ([r(3)], lambda w: w.add_(torch.ones(3))),
    aten.sub_: ([r(3)], lambda w: w.sub_(torch.ones(3))),
    aten.mul_: ([r(3)], lambda w: w.mul_(2.0)),
    aten.div_: ([r(3)], lambda w: w.div_(2.0)),
    aten.fill_: ([r(3)], lambda w: w.fill_(1.0)),
    aten.zero_: ([r(3)], lambda w: w.zero_()),
    aten.normal_: ([r(3)], lambda w: (torch.manual_seed(5), w.normal_())[1]),
    aten.uniform_: ([r(3)], lambda w: (torch.manual_seed(5), w.uniform_())[1]),
    aten.set_: ([r(3)], lambda w: w.set_(torch.zeros(3))),
    aten.resize_: ([r(3)], lambda w: w.resize_(5)),
    aten.resize_as_: ([r(3)], lambda w: w.resize_as_(torch.zeros(5))),
    aten.as_strided_: ([r(3)], lambda w: w.as_strided_((1,), (1,))),
    aten.squeeze_: ([r(1, 3)], lambda w: w.squeeze_()),
    aten.unsqueeze_: ([r(3)], lambda w: w.unsqueeze_(0)),
    aten.t_: ([r(3, 2)], lambda w: w.t_()),
    aten.transpose_: ([r(3, 2)], lambda w: w.transpose_(0, 1)),
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
    monkeypatch.setattr(tensor_module, "resolved_rule", lambda op: None)  # every dispatch asks aten_rule
    return seen


def test_every_row_has_a_sample():
    assert set(TF_SAMPLES) == set(TORCH_FUNCTION_RULES)
    assert set(ATEN_SAMPLES) == set(ATEN_RULES)


ROWS = [(op, TORCH_FUNCTION_RULES[op], TF_SAMPLES[op]) for op in TF_SAMPLES] + [
    (op, ATEN_RULES[op], ATEN_SAMPLES[op]) for op in ATEN_SAMPLES
]
LANDS = (rules.copy_into, rules.write_in_place, rules.set_data, rules.set_item)


@pytest.mark.parametrize("op,handler,sample", ROWS, ids=[getattr(op, "__name__", str(op)) for op, _, _ in ROWS])
def test_row_is_hit_and_keeps_its_promise(op, handler, sample, seen):
    weights, fn = sample
    wrapped = [off(w) for w in weights]
    before = FetchStats.calls
    if handler in (rules.refuse, rules.frozen):
        with pytest.raises(RefusedOpError, match="storage or the shape|frozen"):
            fn(*wrapped)
        assert op in seen
        assert all(torch.equal(w.materialize(), orig) for w, orig in zip(wrapped, weights))  # nothing written
        return
    result = fn(*wrapped)
    assert op in seen, f"{op} was not consulted: the sample does not reach its row"
    fetched = FetchStats.calls - before
    plain = [w.clone() for w in weights]
    expected = fn(*plain)
    if handler in (rules.materialize, rules._materialize_all):
        assert fetched >= 1
        assert torch.equal(result, expected) if isinstance(expected, torch.Tensor) else result == expected
    elif handler is rules.view:  # eager: a lazy view, nothing fetched until it is read
        assert fetched == 0 and isinstance(result, OffloadedTensor) and result._view[0] is wrapped[0]
        assert (result.shape, result.stride()) == (expected.shape, expected.stride())
        assert torch.equal(result.materialize(), expected)
    elif handler is rules.metadata:
        assert fetched == 0 and type(result) is torch.Tensor
        assert (result.shape, result.dtype, result.device) == (expected.shape, expected.dtype, expected.device)
    elif handler is rules.alias:
        assert fetched == 0 and type(result) is OffloadedTensor and result._inner[0] is wrapped[0]._inner[0]
        assert int(result._key) == int(wrapped[0]._key)  # the same weight
    elif handler is rules.clone:
        assert fetched == 0 and type(result) is OffloadedTensor
        assert result._inner[0].data_ptr() != wrapped[0]._inner[0].data_ptr()
        assert int(result._key) != int(wrapped[0]._key)  # a new weight
        assert torch.equal(result.materialize(), weights[0])
    elif handler is rules.embedding:  # the rows it read renormalized in the weight, then read
        assert fetched >= 1 and torch.equal(result, expected) and torch.equal(wrapped[0].materialize(), plain[0])
    elif handler is rules.to_numpy:  # the values, read-only: a write through the array would go nowhere
        assert fetched >= 1 and np.array_equal(result, expected) and not result.flags.writeable
    elif handler in LANDS:
        assert result is wrapped[0] and torch.equal(wrapped[0].materialize(), expected)
    else:
        raise AssertionError(f"no check for {handler.__name__}")


WRITES = {
    "select.fill_": lambda w: w[0].fill_(0.0),
    "view.add_": lambda w: w.view(-1).add_(1.0),
    "t.copy_": lambda w: w.t().copy_(torch.zeros(4, 3)),
    "data.select.mul_": lambda w: w.data[1].mul_(2.0),
    "select.setitem": lambda w: w[0].__setitem__(1, 3.0),
    "select.slice.fill_": lambda w: w[0][1:3].fill_(0.0),
    "unbind.zero_": lambda w: w.unbind(0)[2].zero_(),
    "add.out": lambda w: torch.add(torch.ones(3, 4), 2.0, out=w),
    "eye.out": lambda w: torch.eye(3, 4, out=w),
    "view_as.copy_": lambda w: w.view_as(torch.empty(12)).copy_(torch.arange(12.0)),
}


@pytest.mark.parametrize("write", list(WRITES.values()), ids=list(WRITES))
@pytest.mark.parametrize("fetched", [True, False], ids=["fetched", "zero-copy"])
def test_writes_through_views_and_out_land_on_plain_payloads(write, fetched):
    """A write through a view (`w[0].fill_(0)`) or an out= argument lands in the payload, equal
    to the same write on a plain tensor; the view itself shows it, as a real view would."""
    weight = r(3, 4)
    w = off(weight) if fetched else OffloadedTensor((weight.clone(),), PLAIN, weight.dtype, weight.device, None)
    plain = weight.clone()
    write(w)
    write(plain)
    assert torch.equal(w.materialize(), plain)


@pytest.mark.parametrize("write", list(WRITES.values()), ids=list(WRITES))
def test_writes_into_fp8_weights_are_refused_before_anything_changes(write):
    w = off(r(3, 4), Float8(torch.float8_e4m3fn))
    before = [t.clone() for t in w._inner]
    with pytest.raises(RefusedOpError):
        write(w)
    assert all(torch.equal(t, b) for t, b in zip(w._inner, before))


def test_a_view_reads_its_weight_when_read_not_when_taken():
    w = off(r(3, 4))
    row = w[1]  # no fetch yet
    w.copy_(torch.full((3, 4), 7.0))
    assert torch.equal(row.materialize(), torch.full((4,), 7.0))  # never older than its weight


def test_read_row_does_not_cover_its_out_overload():
    """aten.add reads (materialize); aten.add.out into a weight is a write."""
    assert rules.aten_rule(aten.add.Tensor) is rules._materialize_all
    assert rules.aten_rule(aten.add.out) is rules.write_in_place


def test_op_without_a_row_materializes_and_logs_once(caplog):
    rules._RESOLVED.clear()
    w = off(r(3, 3))
    with caplog.at_level(logging.DEBUG, logger="compile_rules"):
        assert torch.equal(torch.sin(w), torch.sin(w.materialize()))
        assert torch.equal(torch.sin(w), torch.sin(w.materialize()))
    assert sum("aten.sin.default has no row" in m for m in caplog.messages) == 1


def test_a_row_added_after_lookups_began_is_used():
    """Lookups are remembered per overload; a row registered later with the public `implements`
    must still win (it was silently ignored behind the cached default)."""
    w = off(r(3, 3))
    torch.sin(w)  # resolves aten.sin.default to the default row
    calls = []

    @rules.implements(aten.sin)
    def counted(func, args, kwargs):
        calls.append(func)
        return rules._materialize_all(func, args, kwargs)

    try:
        assert torch.equal(torch.sin(w), torch.sin(w.materialize())) and calls == [aten.sin.default]
    finally:
        del rules.ATEN_RULES[aten.sin]
        rules._RESOLVED.clear()


def test_in_place_op_without_a_row_lands_on_a_plain_payload():
    weight = r(3)
    w = off(weight)
    w.sin_()
    assert torch.equal(w.materialize(), weight.sin())


def test_write_that_raises_midway_changes_nothing():
    w = off(r(3, 4))
    before = w.materialize().clone()
    with pytest.raises(RuntimeError):
        torch.add(torch.ones(5, 5), 1.0, out=w)  # would resize the weight
    with pytest.raises(RuntimeError):
        w.copy_(torch.ones(2, 2))  # does not broadcast
    assert torch.equal(w.materialize(), before)


def test_op_writing_into_a_plain_tensor_reads_the_weight():
    w, dst = off(r(3)), torch.zeros(3)
    dst.copy_(w)  # copy_ row, but the offloaded tensor is the source: materialize, not a write
    assert torch.equal(dst, w.materialize())
    out = torch.empty(3)
    torch.add(w, 1.0, out=out)
    assert torch.equal(out, w.materialize() + 1)
