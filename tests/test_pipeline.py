"""Whole diffusers pipelines (tiny Flux and Wan, built offline) through wrap_pipeline_for_offload:
images equal to the unwrapped pipeline, eager and with the transformer compiled; one budget over
all components; offload_report(pipe); other offloaders refused; unwrap_pipeline."""

import pytest
import torch
from pipelines import flux_call, tiny_flux_pipeline, tiny_wan_pipeline, wan_call

from offload_tensor import (
    RefusedOpError,
    is_wrapped,
    offload_report,
    plan,
    unwrap_pipeline,
    wrap_model_for_offload,
    wrap_pipeline_for_offload,
)

FAMILIES = {"flux": (tiny_flux_pipeline, flux_call), "wan": (tiny_wan_pipeline, wan_call)}


def image(pipe, call, seed=0):
    with torch.no_grad():
        return pipe(**call(seed))[0]


@pytest.fixture(scope="module")
def expected():
    return {name: image(make(), call) for name, (make, call) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tier", ["ram", "disk-budget", "fetched"])
def test_wrapped_pipeline_makes_the_same_image(family, tier, expected, tmp_path):
    make, call = FAMILIES[family]
    pipe = make()
    if tier == "ram":
        wrap_pipeline_for_offload(pipe)
    elif tier == "disk-budget":  # the denoiser resident in RAM as far as the budget goes, the rest on disk
        wrap_pipeline_for_offload(pipe, offload=tmp_path / "disk", budget="600KiB")
    else:  # every weight through the fetch op
        from offload_tensor.testing import RecordingEngine

        for component in ("transformer", "vae", "text_encoder"):
            wrap_model_for_offload(getattr(pipe, component), engine=RecordingEngine())
    assert torch.equal(image(pipe, call), expected[family])
    report = offload_report(pipe)
    assert "transformer" in report.components and report.total.by_tier
    assert sum(r.resident_bytes + r.offloaded_bytes for r in report.components.values()) == (
        report.total.resident_bytes + report.total.offloaded_bytes
    )
    if tier == "disk-budget":
        plan = pipe.transformer._offload_state.plan
        assert plan.resident_bytes > 0 and {g.home for g in plan.groups} == {"disk"}
        assert report.components["vae"].resident_bytes < report.components["vae"].offloaded_bytes  # streamed


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tier", ["ram", "disk-budget"])
def test_pipeline_with_the_transformer_compiled_makes_the_same_image(family, tier, tmp_path):
    """Against the unwrapped pipeline with its transformer compiled the same way: bit-equal."""
    make, call = FAMILIES[family]
    plain = make()
    plain.transformer.compile_repeated_blocks(fullgraph=True)
    pipe = make()
    wrap_pipeline_for_offload(pipe, **({} if tier == "ram" else dict(offload=tmp_path / "disk", budget="600KiB")))
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    for seed in (0, 1):
        assert torch.equal(image(pipe, call, seed), image(plain, call, seed))


def test_other_offloaders_are_refused_and_unwrap_restores(expected):
    make, call = FAMILIES["flux"]
    pipe = make()
    wrap_pipeline_for_offload(pipe)
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload"):
        with pytest.raises(RefusedOpError, match=f"{method}.*unwrap_pipeline"):
            getattr(pipe, method)()
    with pytest.raises(RefusedOpError, match="enable_group_offload.*unwrap_model"):
        pipe.transformer.enable_group_offload(torch.device("cpu"))
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_pipeline_for_offload(pipe)
    unwrap_pipeline(pipe)
    assert not any(is_wrapped(c) for c in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    assert torch.equal(image(pipe, call), expected["flux"])
    assert "enable_model_cpu_offload" not in pipe.__dict__


def test_bad_pipeline_arguments_change_nothing(tmp_path):
    make, _ = FAMILIES["flux"]
    pipe = make()
    with pytest.raises(ValueError, match=r"no component \['transformr'\].*components are"):
        wrap_pipeline_for_offload(pipe, components=["transformr"])
    with pytest.raises(ValueError, match="below the minimum for FluxPipeline"):
        wrap_pipeline_for_offload(pipe, offload=tmp_path / "disk", budget="1KiB")
    with pytest.raises(TypeError, match="expects a diffusers pipeline"):
        wrap_pipeline_for_offload(pipe.transformer)
    assert not any(is_wrapped(c) for c in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    with pytest.raises(ValueError, match="no component .* is wrapped"):
        offload_report(pipe)


def test_storage_dtype_by_name_reaches_every_component():
    """A dtype's name (as configs carry it) in plan(pipe) and wrap_pipeline_for_offload."""
    make, _ = FAMILIES["flux"]
    pipe = make()
    assert plan(pipe, storage_dtype="float8_e4m3fn").table() == plan(pipe, storage_dtype=torch.float8_e4m3fn).table()
    wrap_pipeline_for_offload(pipe, storage_dtype="float8_e4m3fn")
    for component in (pipe.transformer, pipe.text_encoder):
        matrices = [p for p in component.parameters() if p.ndim == 2]
        assert matrices and all(p.qdata.dtype == torch.float8_e4m3fn for p in matrices)
    unwrap_pipeline(pipe)


def test_a_failure_midway_unwraps_what_was_wrapped(monkeypatch, expected):
    import offload_tensor.pipeline as wrap  # where the pipeline calls wrap_model_for_offload from

    make, call = FAMILIES["flux"]
    pipe = make()
    real, calls = wrap.wrap_model_for_offload, []

    def failing(model, **kwargs):
        calls.append(model)
        if len(calls) == 3:
            raise MemoryError("planted")
        return real(model, **kwargs)

    monkeypatch.setattr(wrap, "wrap_model_for_offload", failing)
    with pytest.raises(MemoryError):
        wrap_pipeline_for_offload(pipe)
    assert not any(is_wrapped(c) for c in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    assert torch.equal(image(pipe, call), expected["flux"])
