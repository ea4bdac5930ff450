"""Checks of dsuite_plugin itself (run by selftest.sh in sync and disk modes): models are wrapped
where the plugin says, and unwrap problems are logged. Each test states what the plugin must have
done; the events file is checked by selftest.sh afterwards."""

import copy
import os

import pytest
import torch
from diffusers import FluxTransformer2DModel

from offload_tensor import OffloadedTensor, is_wrapped

CFG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
MODE = os.environ["DSUITE_MODE"]


def _all_fetched(model):
    ps = list(model.parameters())
    return ps and all(isinstance(p, OffloadedTensor) and p._key is not None for p in ps)


def test_built_directly_is_wrapped():
    m = FluxTransformer2DModel(**CFG)
    assert is_wrapped(m) == (MODE != "plain")
    if MODE != "plain":
        assert _all_fetched(m)


def test_from_config_is_wrapped():
    m = FluxTransformer2DModel.from_config(FluxTransformer2DModel(**CFG).config)
    assert is_wrapped(m) == (MODE != "plain")


def test_from_pretrained_is_wrapped(tmp_path):
    FluxTransformer2DModel(**CFG).save_pretrained(tmp_path)
    m = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert is_wrapped(m) == (MODE != "plain")
    if MODE != "plain":
        assert _all_fetched(m)


def test_meta_model_left_alone():
    with torch.device("meta"):
        m = FluxTransformer2DModel(**CFG)
    assert not is_wrapped(m)


def test_deepcopy_is_unwrapped_after_the_test():
    m = FluxTransformer2DModel(**CFG)
    if MODE == "disk":  # offload_tensor refuses to deep-copy a streamed model (by design)
        with pytest.raises(TypeError, match="cannot be deep-copied"):
            copy.deepcopy(m)
        return
    test_deepcopy_is_unwrapped_after_the_test.kept = copy.deepcopy(m)  # alive after the test


def test_broken_state_is_reported():
    # selftest.sh expects exactly one unwrap_failed event, from this test
    m = FluxTransformer2DModel(**CFG)
    if MODE != "plain":
        del m.__dict__["_offload_state"]  # OffloadedTensors left, is_wrapped() False
    test_broken_state_is_reported.kept = m
