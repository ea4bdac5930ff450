"""Training an adapter (peft LoRA) over offloaded weights, eager: the offloading holds while training.

- A fetched weight never requires grad, so no input is saved for a weight gradient: a LoRA step
  saves the same activations (count and bytes) as the plain model's step.
- No fetched weight is saved for backward (backward fetches it again), eager and compiled: at the
  forward/backward turn at most the group in use is alive, and the scheduler learns forward and
  backward as one order (no misses once learnt).
- LoRA gradients are bit-equal to the plain model's on the streaming engine and the disk tier,
  with and without gradient checkpointing.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field

import pytest
import torch
from models import CASES, engine_for, output

from offload_tensor import OffloadedTensor, wrap_model_for_offload
from offload_tensor.engine.fake import FakeBackend
from offload_tensor.engine.streaming import StreamingEngine

peft = pytest.importorskip("peft")
FLUX = CASES[0]


def adapter():
    from peft import LoraConfig

    # init_lora_weights=False: both LoRA matrices random, so both get gradients
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def lora_flux(tier: str | None, tmp_path=None, **wrap):
    """The tiny Flux with a LoRA on its attention projections; `tier`: None (plain), an engine
    name of tests/models.py, or "disk"."""
    model = FLUX.make()
    if tier == "disk":
        wrap_model_for_offload(model, offload="disk", disk_path=tmp_path, **wrap)
    elif tier is not None:
        wrap_model_for_offload(model, engine=engine_for(tier), prefetch=1, **wrap)
    torch.manual_seed(7)
    model.add_adapter(adapter())
    return model


def loss_of(model, checkpointing: str | None = None) -> torch.Tensor:
    inputs = FLUX.inputs(0)
    if checkpointing == "reentrant":  # reentrant checkpointing needs an input that requires grad
        inputs["hidden_states"].requires_grad_()
    if checkpointing == "torch":  # the whole forward, non-reentrant
        run = lambda: output(model(**inputs))  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(run, use_reentrant=False)
    else:
        out = output(model(**inputs))
    return out.pow(2).mean()


def lora_grads(model, checkpointing: str | None = None) -> dict[str, torch.Tensor]:
    if checkpointing == "diffusers":
        model.enable_gradient_checkpointing()
    elif checkpointing == "reentrant":
        model.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    model.zero_grad(set_to_none=True)
    loss_of(model, checkpointing).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    return grads


def storages(t: torch.Tensor) -> list:
    """The storages holding a tensor's values: its own, or its inner tensors' for a traceable
    subclass (a quantized weight)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t.untyped_storage()]
    names = t._inner if isinstance(t, OffloadedTensor) else t.__tensor_flatten__()[0]
    inner = names if isinstance(t, OffloadedTensor) else [getattr(t, n) for n in names]
    return [s for i in inner if i is not None for s in storages(i)]


def saved_activations(model) -> tuple[int, int]:
    """Count and bytes of what one step saves for backward, weights aside (a plain or quantized
    weight, or an offloaded weight's payload: memory the model holds anyway)."""
    weights = {s._cdata for p in model.parameters() for s in storages(p)}
    count = nbytes = 0

    def pack(t):
        nonlocal count, nbytes
        for s in storages(t):
            if s._cdata not in weights:
                count, nbytes = count + 1, nbytes + s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model)
    loss.backward()
    return count, nbytes


@pytest.mark.parametrize("tier", ["sync", "streaming", "disk"])
def test_a_step_saves_the_activations_of_the_plain_model(tier, tmp_path):
    """The fetched weights are neither saved (backward fetches them again) nor make their
    linears save the input for a weight gradient (they never require grad)."""
    plain = saved_activations(lora_flux(None))
    assert saved_activations(lora_flux(tier, tmp_path)) == plain


def test_a_fetched_weight_never_requires_grad():
    model = wrap_model_for_offload(FLUX.make(), engine=engine_for("sync"))
    weight = model.transformer_blocks[0].attn.to_q.weight
    activation = torch.randn(2, weight.shape[1], requires_grad=True)
    assert not weight.materialize(activation).requires_grad
    out = torch.nn.functional.linear(activation, weight)
    assert out.requires_grad and out.grad_fn is not None


@dataclass
class HandOverLog(FakeBackend):
    """The fake backend, recording each group copy it hands over (its storage, to count those alive)."""

    handed: list = field(default_factory=list)

    def read_group(self, group: int, slot: int) -> torch.Tensor:
        out = super().read_group(group, slot)
        self.handed.append(out.untyped_storage())
        return out

    def alive(self) -> int:
        gc.collect()
        # our own reference is one use; a group copy anyone else holds has more
        return sum(torch._C._storage_Use_Count(s._cdata) > 1 for s in self.handed)


@pytest.mark.parametrize(
    "how, prefetch", [(None, 1), (None, 2), ("blocks", 1), ("whole", 1)], ids=["eager-1", "eager-2", "blocks", "whole"]
)
def test_no_fetched_weight_lives_from_forward_to_backward(how, prefetch):
    """Eager (saved-tensor hooks) and compiled (a joint-graph pass: see [Note: backward fetches
    again, compiled]), compile_repeated_blocks and torch.compile of the whole model."""
    backend = HandOverLog()
    engine = StreamingEngine(backend)
    model = wrap_model_for_offload(FLUX.make(), engine=engine, prefetch=prefetch)
    torch.manual_seed(7)
    model.add_adapter(adapter())
    run = model
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if how == "blocks":
        model.compile_repeated_blocks(fullgraph=True)
    elif how == "whole":
        run = torch.compile(model, fullgraph=True)
    for step in range(3):
        backend.handed.clear()
        misses = engine.scheduler.stats.misses
        loss = output(run(**FLUX.inputs(0))).pow(2).mean()
        forward_reads = len(backend.handed)
        # 12 groups read; without re-fetching, the 4 blocks' groups stay alive here (their
        # linears saved their weights) besides the group in use (eager code's)
        assert backend.alive() <= prefetch, (step, backend.alive())
        loss.backward()
        assert len(backend.handed) > forward_reads  # backward fetched the blocks' weights again
        if step > 0:  # forward and backward learnt as one order: every group prefetched
            assert engine.scheduler.stats.misses == misses and not engine.scheduler.recording
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


@pytest.mark.parametrize("checkpointing", [None, "torch", "diffusers", "reentrant"])
@pytest.mark.parametrize("tier", ["streaming", "disk"])
def test_lora_gradients_equal_the_plain_model(tier, checkpointing, tmp_path):
    expected = lora_grads(lora_flux(None), checkpointing)
    model = lora_flux(tier, tmp_path)
    for _ in range(2):  # the second step runs on the learnt order
        got = lora_grads(model, checkpointing)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected), checkpointing


_COMPILED_PLAIN: dict[str, tuple] = {}


def compiled_lora_grads(model, how: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """LoRA gradients of two steps compiled (`how`: "blocks", compile_repeated_blocks, or "whole",
    torch.compile of the model), both fullgraph; and graph breaks and graphs."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    run = model
    if how == "blocks":
        model.compile_repeated_blocks(fullgraph=True)
    else:
        run = torch.compile(model, fullgraph=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        output(run(**FLUX.inputs(0))).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("tier", ["streaming", "disk"])
@pytest.mark.parametrize("how", ["blocks", "whole"])
def test_compiled_training_matches_the_plain_compiled_model(how, tier, tmp_path):
    """compile_repeated_blocks(fullgraph=True) trains a wrapped Flux (a single-stream block
    returns two slices of one tensor, which AOTAutograd refuses to return from a graph with
    subclass inputs: see [Note: aliased outputs of a compiled block]); so does torch.compile."""
    if how not in _COMPILED_PLAIN:
        _COMPILED_PLAIN[how] = compiled_lora_grads(lora_flux(None), how)
    expected, plain_breaks, plain_graphs = _COMPILED_PLAIN[how]
    grads, breaks, graphs = compiled_lora_grads(lora_flux(tier, tmp_path), how)
    assert (breaks, plain_breaks) == (0, 0) and graphs <= plain_graphs, (breaks, graphs, plain_graphs)
    assert grads.keys() == expected.keys()
    for n, g in grads.items():
        assert (g - expected[n]).abs().max() <= 1e-4 * expected[n].abs().max(), n


# -- frozen fp8 and quantized bases (QLoRA-style) ------------------------------------------------
FROZEN_BASES = ["fp8", "torchao-int8wo", "quanto-qint8"]


def frozen_base(kind: str):
    """The tiny Flux with its weights as `kind` stores them, not wrapped: fp8 storage decodes to
    plain weights (the plain model holds the decoded values), torchao and quanto keep their
    quantized subclass."""
    model = FLUX.make()
    if kind == "torchao-int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    elif kind == "quanto-qint8":
        quanto = pytest.importorskip("optimum.quanto")
        quanto.quantize(model, weights=quanto.qint8)
        quanto.freeze(model)
    return model


def lora_frozen_base(kind: str, tier: str | None, tmp_path=None):
    """(the un-offloaded model holding the same values, the wrapped model), each with the same
    LoRA on its attention projections."""
    wrapped = frozen_base(kind)
    storage = {"storage_dtype": torch.float8_e4m3fn} if kind == "fp8" else {}
    if tier == "disk":
        wrap_model_for_offload(wrapped, offload="disk", disk_path=tmp_path, **storage)
    else:
        wrap_model_for_offload(wrapped, engine=engine_for(tier), prefetch=1, **storage)
    plain = frozen_base(kind)
    if kind == "fp8":  # the plain model holds the decoded fp8 values
        with torch.no_grad():
            plain.load_state_dict({n: p.materialize().clone() for n, p in wrapped.named_parameters()})
        decoded, original = (m.transformer_blocks[0].attn.to_q.weight for m in (plain, FLUX.make()))
        assert not torch.equal(decoded, original)  # fp8 changed the values: the test is not void
    for model in (plain, wrapped):
        torch.manual_seed(7)
        model.add_adapter(adapter())
    return plain, wrapped


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
@pytest.mark.parametrize("tier", ["streaming", "disk"])
@pytest.mark.parametrize("kind", FROZEN_BASES)
def test_lora_over_a_frozen_quantized_base_equals_the_unwrapped_model(kind, tier, tmp_path):
    """LoRA gradients bit-equal (the same kernels on the same values), and a step saves what the
    unwrapped model's step saves: no fetched weight (quanto's linear saves its weight as the
    quantized subclass: backward fetches that again too)."""
    plain, wrapped = lora_frozen_base(kind, tier, tmp_path)
    expected = lora_grads(plain)
    for _ in range(2):  # the second step runs on the learnt order
        got = lora_grads(wrapped)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert saved_activations(wrapped) == saved_activations(plain)


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
@pytest.mark.parametrize("kind", FROZEN_BASES)
def test_compiled_lora_over_a_frozen_quantized_base(kind):
    """compile_repeated_blocks(fullgraph=True) trains over an fp8, torchao or quanto base (quanto's
    compiled linear is an opaque op with an autograd formula of its own): 0 graph breaks, LoRA
    gradients within 1e-4 (max abs diff over max abs) of the unwrapped model's. fp8 is checked
    against the plain compiled model; the unwrapped torchao model itself cannot train under
    compile_repeated_blocks (AOTAutograd's aliased-output refusal, which the wrapped model's block
    forward avoids: [Note: aliased outputs of a compiled block]), so the quantized ones are checked
    against their eager gradients (compiled code orders the sums differently)."""
    plain, wrapped = lora_frozen_base(kind, "streaming")
    if kind == "fp8":
        expected, plain_breaks, plain_graphs = compiled_lora_grads(plain, "blocks")
        assert plain_breaks == 0
    else:
        expected, plain_graphs = lora_grads(plain), None
    grads, breaks, graphs = compiled_lora_grads(wrapped, "blocks")
    assert breaks == 0 and (plain_graphs is None or graphs <= plain_graphs), (breaks, graphs, plain_graphs)
    assert grads.keys() == expected.keys()
    for n, g in grads.items():
        assert (g - expected[n]).abs().max() <= 1e-4 * expected[n].abs().max(), n


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
@pytest.mark.parametrize(
    "kind, how",
    [(k, "eager") for k in FROZEN_BASES]
    + [
        ("fp8", "blocks"),
        ("quanto-qint8", "blocks"),
        pytest.param(
            "torchao-int8wo", "blocks",
            marks=pytest.mark.xfail(
                strict=True,
                reason="measured: 5 groups alive at the turn (the blocks' groups) with compile_repeated_blocks over a "
                "torchao int8 weight-only base: the compiled backward keeps values of fetched torchao weights, which "
                "the joint-graph pass ([Note: backward fetches again, compiled]) does not give their own fetch; "
                "cause inside the pass not found yet (eager: 1)",
            ),
        ),
    ],
)  # fmt: skip
def test_no_fetched_quantized_weight_lives_from_forward_to_backward(kind, how):
    backend = HandOverLog()
    wrapped = frozen_base(kind)
    storage = {"storage_dtype": torch.float8_e4m3fn} if kind == "fp8" else {}
    wrap_model_for_offload(wrapped, engine=StreamingEngine(backend), prefetch=1, **storage)
    torch.manual_seed(7)
    wrapped.add_adapter(adapter())
    torch._dynamo.reset()
    if how == "blocks":
        wrapped.compile_repeated_blocks(fullgraph=True)
    for step in range(2):
        backend.handed.clear()
        loss = output(wrapped(**FLUX.inputs(0))).pow(2).mean()
        assert backend.alive() <= 1, (step, backend.alive())
        loss.backward()
