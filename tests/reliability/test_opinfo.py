"""Op coverage from PyTorch's own OpInfo database: the ops that meet weights, run with every
floating tensor argument offloaded (through the fetch op), must equal the same op on plain
tensors, bit for bit. In-place variants either write through (the rows that say so) or raise
RefusedOpError; none may return a value while leaving the weight different from what the plain
op leaves."""

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from offload_tensor import OffloadedTensor, RefusedOpError
from offload_tensor.payloads import PLAIN

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
# In-place variants that write into an offloaded weight's payload (compile_rules rows
# WRITE_THROUGH); every other in-place variant is refused: the explicit list of unsupported ops.
WRITES_THROUGH = {"add", "sub"}
SAMPLES_PER_OP = 6

OPS = [op for op in common_methods_invocations.op_db if op.name in NAMES]
IN_PLACE = [op for op in OPS if op.inplace_variant is not None]


def offloaded(t):
    if type(t) is torch.Tensor and t.is_floating_point():
        return OffloadedTensor((t.detach().clone(),), PLAIN, t.dtype, t.device, True)
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
def test_in_place_variant_writes_through_or_is_refused(op):
    ran = 0
    for args, kwargs in samples(op, torch.float32):
        target = args[0]
        if type(target) is not torch.Tensor or not target.is_floating_point():
            continue
        expected_target = target.clone()
        try:
            op.inplace_variant(expected_target, *args[1:], **kwargs)
        except (RuntimeError, ValueError, IndexError):
            continue
        weight = offloaded(target)
        before = weight.materialize()
        if op.name in WRITES_THROUGH:
            op.inplace_variant(weight, *tree_map(offloaded, args[1:]), **tree_map(offloaded, kwargs))
            assert torch.equal(weight.materialize(), expected_target)
        else:
            with pytest.raises(RefusedOpError):
                op.inplace_variant(weight, *tree_map(offloaded, args[1:]), **tree_map(offloaded, kwargs))
            assert torch.equal(weight.materialize(), before)  # refused before anything was written
        ran += 1
    if ran == 0:
        pytest.skip(f"no in-place sample of {op.name} runs on the CPU")
