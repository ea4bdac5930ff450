"""How each op treats an offloaded weight: one row per op, at two levels.

Torch-function rows catch calls before they decompose (`F.linear` arrives at the dispatcher as
`aten.t` + `aten.addmm`; a quantized payload implements `F.linear` but not `aten.t`), so the
payload's own kernel runs on the fetched payload. Aten rows catch everything that reaches
`__torch_dispatch__`.

An op with no row materializes its offloaded arguments (the safe default: a copy, never a wrong
answer) and is logged once at debug level, unless it writes into an offloaded argument: then it is
refused, since a write into a temporary copy would be silently lost.

This module only declares; `offload_tensor.tensor` carries the rules out.
"""

from __future__ import annotations

import enum
import functools
import logging

import torch
import torch.nn.functional as F

aten = torch.ops.aten
log = logging.getLogger("compile_rules")


class Rule(enum.Enum):
    MATERIALIZE = "materialize"
    """Fetch every offloaded argument to the compute device and run the op on the results."""
    METADATA = "metadata"
    """Answer from the wrapper's shape, stride, dtype and device; nothing is fetched."""
    ALIAS = "alias"
    """A new offloaded wrapper over the same payload (detach, alias: `nn.Parameter`, `.data`)."""
    CLONE = "clone"
    """A new offloaded wrapper over a copy of the payload, on the offload device (deepcopy)."""
    WRITE_THROUGH = "write_through"
    """Write into the payload: copy_ re-encodes the value (`load_state_dict`); add_/sub_ and
    `w[index] = value` change a plain payload in place (LoRA fuse/unfuse, textual inversion), and
    are refused on encoded payloads, where the result would be re-quantized, not exact;
    `.data = w` takes another offloaded weight of the same kind (peft's safe merge) and refuses
    plain tensors (offloading hooks). Views of a fetched weight taken in eager code are
    offloaded wrappers of kind "fetched view"; every write into them is refused (it would land
    in the fetched copy, never in the weight)."""
    REFUSE = "refuse"
    """An in-place change of an offloaded weight: raise an error that says what to do instead."""


TORCH_FUNCTION_RULES: dict[object, Rule] = {
    F.linear: Rule.MATERIALIZE,
    F.bilinear: Rule.MATERIALIZE,
    F.embedding: Rule.MATERIALIZE,
    F.conv1d: Rule.MATERIALIZE,
    F.conv2d: Rule.MATERIALIZE,
    F.conv3d: Rule.MATERIALIZE,
    F.conv_transpose1d: Rule.MATERIALIZE,
    F.conv_transpose2d: Rule.MATERIALIZE,
    F.conv_transpose3d: Rule.MATERIALIZE,
    F.layer_norm: Rule.MATERIALIZE,
    F.group_norm: Rule.MATERIALIZE,
    F.rms_norm: Rule.MATERIALIZE,
    F.batch_norm: Rule.MATERIALIZE,
    F.instance_norm: Rule.MATERIALIZE,
    F.prelu: Rule.MATERIALIZE,
    # `param.data = x`: another offloaded weight (peft's safe merge) is written through; a plain
    # tensor (accelerate hooks, diffusers group offloading) would replace the payload behind the
    # wrapper's back, and is refused.
    torch.Tensor.data.__set__: Rule.WRITE_THROUGH,
    # `w[index] = value` (textual inversion writes token embeddings this way): written into a
    # plain payload; refused on encoded payloads. Caught here because at the dispatcher it is a
    # slice (a fetched copy) and a copy_ into that copy, which would be lost.
    torch.Tensor.__setitem__: Rule.WRITE_THROUGH,
}

ATEN_RULES: dict[torch._ops.OpOverloadPacket, Rule] = {
    # aliases: nn.Parameter(x) needs x.detach() to keep the subclass; .data is a detach
    aten.detach: Rule.ALIAS,
    aten.alias: Rule.ALIAS,
    aten.clone: Rule.CLONE,
    aten.copy_: Rule.WRITE_THROUGH,
    aten.add_: Rule.WRITE_THROUGH,
    aten.sub_: Rule.WRITE_THROUGH,
    # metadata: tensors made "like" a weight need its metadata, not its values
    aten.empty_like: Rule.METADATA,
    aten.zeros_like: Rule.METADATA,
    aten.ones_like: Rule.METADATA,
    aten.full_like: Rule.METADATA,
    aten.rand_like: Rule.METADATA,
    aten.randn_like: Rule.METADATA,
    aten.new_empty: Rule.METADATA,
    aten.new_empty_strided: Rule.METADATA,
    aten.new_zeros: Rule.METADATA,
    aten.new_ones: Rule.METADATA,
    aten.new_full: Rule.METADATA,
    # compute ops that meet weights in models (norm scales, decomposed linears, casts, views):
    # listed so that their rule is a decision, not a default. (Composite ops such as reshape,
    # matmul or allclose never reach the dispatcher: they arrive decomposed into these.)
    aten._to_copy: Rule.MATERIALIZE,
    aten.t: Rule.MATERIALIZE,
    aten.view: Rule.MATERIALIZE,
    aten.unsqueeze: Rule.MATERIALIZE,
    aten.expand: Rule.MATERIALIZE,
    aten.slice: Rule.MATERIALIZE,
    aten.select: Rule.MATERIALIZE,
    aten.addmm: Rule.MATERIALIZE,
    aten.mm: Rule.MATERIALIZE,
    aten.bmm: Rule.MATERIALIZE,
    aten.add: Rule.MATERIALIZE,
    aten.sub: Rule.MATERIALIZE,
    aten.mul: Rule.MATERIALIZE,
    aten.div: Rule.MATERIALIZE,
    aten.cat: Rule.MATERIALIZE,
    aten.stack: Rule.MATERIALIZE,
    aten.equal: Rule.MATERIALIZE,
    # other in-place ops (initializers, arithmetic): refused by name so the message is specific
    aten.fill_: Rule.REFUSE,
    aten.zero_: Rule.REFUSE,
    aten.mul_: Rule.REFUSE,
    aten.normal_: Rule.REFUSE,
    aten.uniform_: Rule.REFUSE,
    aten.set_: Rule.REFUSE,
    aten.resize_: Rule.REFUSE,
}

_missing_logged: set[object] = set()


@functools.cache
def mutates(op: torch._ops.OpOverload) -> tuple[int, ...]:
    """Positions of the arguments `op` writes to (in-place and out= ops)."""
    return tuple(
        i for i, arg in enumerate(op._schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write
    )


def aten_rule(op: torch._ops.OpOverload) -> Rule:
    """The rule for an aten overload: its packet's row, or the safe default."""
    rule = ATEN_RULES.get(op.overloadpacket)
    if rule is not None:
        return rule
    default = Rule.REFUSE if mutates(op) else Rule.MATERIALIZE
    if op not in _missing_logged:
        _missing_logged.add(op)
        log.debug("%s has no row in compile_rules; using the default rule %s", op, default.value)
    return default
