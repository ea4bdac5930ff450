"""Op coverage from PyTorch's own OpInfo database: the ops that meet weights, run with every
floating tensor argument offloaded (through the fetch op), must equal the same op on plain
tensors, bit for bit. In-place variants land on a plain payload (equal to the plain in-place
result) and are refused on an fp8 payload with the weight bit-unchanged; none may return while
leaving the weight different from what the plain op leaves."""

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from offload_tensor import OffloadedTensor, RefusedOpError
from offload_tensor.ops import new_key
from offload_tensor.payloads import PLAIN, Float8

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")

# The ops that take weights in models: linear, conv, norms, the matmul family, views and
# reshapes, elementwise, cat/stack, attention, reductions and indexing.
NAMES = {
    "nn.functional.linear", "nn.functional.bilinear", "nn.functional.embedding", "nn.functional.prelu",
    "nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv3d",
    "nn.functional.conv_transpose1d", "nn.functional.conv_transpose2d", "nn.functional.conv_transpose3d",
    "nn.functional.layer_norm", "nn.functional.group_norm", "nn.functional.rms_norm",
    "nn.functional.batch_norm", "nn.functional.instance_norm",
    "matmul", "mm", "bmm", "addmm", "baddbmm", "addmv", "mv", "dot", "einsum", "tensordot", "inner", "outer", "kron",
    "t", "transpose", "permute", "movedim", "view", "view_as", "reshape", "reshape_as", "expand", "expand_as",
    "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "select", "__getitem__", "index_select", "diagonal",
    "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "contiguous", "clone", "to", "float",
    "repeat", "tile", "flip", "roll", "tril", "triu",
    "add", "sub", "mul", "div", "pow", "neg", "abs", "clamp", "lerp", "addcmul", "where",
    "cat", "stack", "hstack", "vstack", "sum", "mean", "softmax",
    "nn.functional.silu", "nn.functional.gelu", "nn.functional.scaled_dot_product_attention",
}
SAMPLES_PER_OP = 6

OPS = [op for op in common_methods_invocations.op_db if op.name in NAMES]
IN_PLACE = [op for op in OPS if op.inplace_variant is not None]


def offloaded(t, kind=PLAIN):
    if type(t) is torch.Tensor and t.is_floating_point():
        return OffloadedTensor(kind.encode(t.detach().clone()), kind, t.dtype, t.device, new_key())
    return t


def plain_value(t):
    return t.materialize() if isinstance(t, OffloadedTensor) else t


def assert_same(expected, result):
    flat_expected, spec = tree_flatten(expected)
    flat_result, result_spec = tree_flatten(result)
    assert spec == result_spec
    for e, r in zip(flat_expected, flat_result):
        if isinstance(e, torch.Tensor):
            r = plain_value(r)
            assert type(r) is torch.Tensor and (r.shape, r.dtype) == (e.shape, e.dtype)
            assert torch.equal(r, e) or torch.allclose(r, e, rtol=0, atol=0, equal_nan=True)
        else:
            assert r == e


def samples(op, dtype):
    for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=False)):
        if i == SAMPLES_PER_OP:
            return
        yield (sample.input, *sample.args), sample.kwargs


def test_the_list_covers_the_families_the_issue_names():
    found = {op.name for op in OPS}
    assert found == NAMES, NAMES - found  # an op renamed in OpInfo must not silently drop out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS, ids=[f"{op.name}.{op.variant_test_name}".rstrip(".") for op in OPS])
def test_op_on_offloaded_arguments_equals_plain(op, dtype):
    ran = 0
    for args, kwargs in samples(op, dtype):
        try:
            expected = op(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError):
            continue  # OpInfo also lists inputs the op rejects
        result = op(*tree_map(offloaded, args), **tree_map(offloaded, kwargs))
        assert_same(expected, result)
        ran += 1
    if ran == 0:
        pytest.skip(f"OpInfo has no {dtype} sample for {op.name} that runs on the CPU")


@pytest.mark.parametrize("op", IN_PLACE, ids=[f"{op.name}.{op.variant_test_name}".rstrip(".") for op in IN_PLACE])
def test_in_place_variant_lands_on_plain_and_is_refused_on_fp8(op):
    ran = 0
    for args, kwargs in samples(op, torch.float32):
        target = args[0]
        if type(target) is not torch.Tensor or not target.is_floating_point() or target.ndim < 2:
            continue
        expected_target = target.clone()
        try:
            op.inplace_variant(expected_target, *args[1:], **kwargs)
        except (RuntimeError, ValueError, IndexError):
            continue
        weight = offloaded(target)
        if expected_target.shape != target.shape or expected_target.stride() != target.stride():
            # squeeze_, t_, ...: offloaded weights keep their shape, on every payload
            with pytest.raises(RefusedOpError, match="storage or the shape"):
                op.inplace_variant(weight, *tree_map(offloaded, args[1:]), **tree_map(offloaded, kwargs))
            assert torch.equal(weight.materialize(), target)
        else:
            op.inplace_variant(weight, *tree_map(offloaded, args[1:]), **tree_map(offloaded, kwargs))
            assert torch.equal(weight.materialize(), expected_target) or torch.allclose(
                weight.materialize(), expected_target, rtol=0, atol=0, equal_nan=True
            )
        fp8 = offloaded(target, Float8(torch.float8_e4m3fn))
        before = [t.clone() for t in fp8._inner]
        try:
            op.inplace_variant(fp8, *tree_map(offloaded, args[1:]), **tree_map(offloaded, kwargs))
        except RefusedOpError:
            pass
        else:  # accepted only as the no-op it is (w.squeeze_(d) of a dim that is not 1)
            assert (expected_target.shape, expected_target.stride()) == (target.shape, target.stride())
            assert torch.equal(expected_target, target)
        assert all(torch.equal(t, b) for t, b in zip(fp8._inner, before))  # refused before anything was written
        ran += 1
    if ran == 0:
        pytest.skip(f"no in-place sample of {op.name} runs on the CPU")
