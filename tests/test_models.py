"""Wrapped models equal the same models without offloading, eager and compiled, with zero graph
breaks and no more graphs than the plain model (docs/design.md, "Counting graphs", on how to count)."""

import pytest
import torch
from models import CASES, output
from torch import nn

import compile_rules
from offload_tensor import offload_report, wrap_model_for_offload
from offload_tensor.testing import RecordingEngine

ids = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("path", ["zero-copy", "fetch"])
def test_eager_output_is_bit_exact(case, path):
    model = case.make()
    with torch.no_grad():
        reference = output(model(**case.inputs(0)))
    engine = RecordingEngine() if path == "fetch" else None
    wrap_model_for_offload(model, engine=engine)
    with torch.no_grad():
        out = output(model(**case.inputs(0)))
    assert torch.equal(out, reference)
    if engine is not None:  # the op really ran: every weight fetched at least once
        assert len(set(engine.keys)) == len(list(model.parameters()))
    report = offload_report(model)
    assert sum(report.by_tier.values()) == sum(p.payload_bytes for p in model.parameters())
    assert (report.offloaded_bytes > 0) == (engine is not None)  # fetched on use, or used where it lives


COMPILE_CASES = [(c, "whole") for c in CASES] + [(c, "repeated_blocks") for c in CASES if c.repeated_blocks]
# Whole-model compiles of the convolutional UNet and VAE take a minute each on two cores: extended run
# (`-m extended`); the UNet's blocks (convolutions, group norms, attention) compile in the default run.
EXTENDED = {("unet", "whole"), ("vae", "whole")}


@pytest.mark.parametrize(
    "case,mode",
    [
        pytest.param(c, m, id=f"{c.name}-{m}", marks=pytest.mark.extended if (c.name, m) in EXTENDED else ())
        for c, m in COMPILE_CASES
    ],
)
def test_compiled_has_no_breaks_and_no_extra_graphs(case, mode):
    repeated = mode == "repeated_blocks"
    plain = case.make()
    plain_report = compile_rules.check(plain, repeated_blocks=repeated, **case.inputs(0))

    model = case.make()
    engine = RecordingEngine()  # every weight goes through the fetch op, not the zero-copy path
    wrap_model_for_offload(model, engine=engine)
    report = compile_rules.check(model, repeated_blocks=repeated, fullgraph=True, **case.inputs(0))

    assert report.graph_breaks == 0, report
    assert report.graphs <= plain_report.graphs, f"plain: {plain_report}\nwrapped: {report}"
    assert report.recompiles <= plain_report.recompiles, f"plain: {plain_report}\nwrapped: {report}"
    if not repeated:  # the whole forward is one graph: one fetch per weight
        assert report.fetches_per_forward == len(list(model.parameters()))
    torch.testing.assert_close(output(report.output), output(plain_report.output), atol=1e-5, rtol=0)


def test_repeated_blocks_share_one_graph_per_block_kind():
    """Flux's blocks are 2 double-stream + 2 single-stream: recompiling per block would need 4+
    graphs; error_on_recompile holds for the double-stream kind, which the plain model compiles once."""
    case = CASES[0]
    model = wrap_model_for_offload(case.make(), engine=RecordingEngine())
    report = compile_rules.check(model, repeated_blocks=True, fullgraph=True, **case.inputs(0))
    assert report.graphs == 3 and report.recompiles == 1  # the plain model's own single-stream stride recompile
    assert all("stride mismatch" in r and "hidden_states" in r for r in report.recompile_reasons)


# -- torch.nn RNNs, and graph breaks on ops that read weights ---------------------------------
RNNS = {
    "lstm-proj": lambda: nn.LSTM(8, 6, num_layers=2, proj_size=4),
    "gru-batch-first": lambda: nn.GRU(8, 6, num_layers=2, batch_first=True),
    "rnn-bidirectional": lambda: nn.RNN(8, 6, num_layers=2, bidirectional=True),
}


@pytest.mark.parametrize("name", list(RNNS))
@pytest.mark.parametrize("path", ["zero-copy", "fetch"])
def test_rnn_eager_bit_exact_and_compiled_like_plain(name, path):
    """RNNs pass their weights as one list to a fused op (torch.lstm & co.): each weight fetched
    once, eager bit-exact (against the module with frozen weights, whose kernel choice ours
    shares); compiled with fullgraph=False (dynamo refuses RNN modules themselves) with no more
    breaks and graphs than the plain module."""
    torch.manual_seed(0)
    plain = RNNS[name]().eval().requires_grad_(False)
    torch.manual_seed(0)
    model = RNNS[name]().eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = plain(x)[0]
    engine = RecordingEngine() if path == "fetch" else None
    wrap_model_for_offload(model, engine=engine)
    with torch.no_grad():
        assert torch.equal(model(x)[0], expected)
    if engine is not None:
        assert sorted(engine.keys) == sorted(int(p._key) for p in model.parameters())  # one fetch each
    plain_report = compile_rules.check(plain, x)
    report = compile_rules.check(model, x)
    assert (report.graph_breaks, report.graphs, report.recompiles) <= (
        plain_report.graph_breaks, plain_report.graphs, plain_report.recompiles
    ), f"plain: {plain_report}\nwrapped: {report}"
    torch.testing.assert_close(report.output[0], expected, atol=1e-6, rtol=0)


class _BreaksOnAWeight(nn.Module):
    """A graph break on an op that reads a weight, between two compiled regions."""

    def __init__(self, read):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.read = read

    def forward(self, x):
        x = self.a(x)
        return self.b(x) * self.read(self.b.weight)


BREAKING_READS = {
    "nonzero": lambda w: torch.nonzero(w).shape[0],
    "item": lambda w: w[0, 0].item(),
    "tolist": lambda w: len(w.tolist()),
    "data-dependent-if": lambda w: 2.0 if w.sum() > 0 else 3.0,
}


@pytest.mark.parametrize("read", list(BREAKING_READS))
@pytest.mark.parametrize("path", ["zero-copy", "fetch"])
def test_graph_break_on_a_weight_read_adds_no_break_or_graph(read, path):
    """After a break dynamo runs the rest eagerly; it must not compile offload_tensor's own
    dispatch code as new frames (before: 5 breaks and 3 graphs where the plain model has 1 and 2)."""
    torch.manual_seed(0)
    plain = _BreaksOnAWeight(BREAKING_READS[read]).eval()
    torch.manual_seed(0)
    model = wrap_model_for_offload(
        _BreaksOnAWeight(BREAKING_READS[read]).eval(), engine=RecordingEngine() if path == "fetch" else None
    )
    x = torch.randn(2, 8)
    plain_report = compile_rules.check(plain, x)
    report = compile_rules.check(model, x)
    assert (report.graph_breaks, report.graphs, report.recompiles) <= (
        plain_report.graph_breaks, plain_report.graphs, plain_report.recompiles
    ), f"plain: {plain_report}\nwrapped: {report}"
    torch.testing.assert_close(report.output, plain_report.output, atol=1e-6, rtol=0)
