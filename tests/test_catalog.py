"""The catalog builds models on the meta device from a known name or a config file; a config that is
not one diffusers model's (a pipeline's model_index.json, a scheduler's config) is a clear error."""

import json

import pytest

from offload_tensor.catalog import meta_model

FLUX_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.35.0", "feature_extractor": [None, None],
    "image_encoder": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip
NOT_A_MODEL = {
    "pipeline index": (FLUX_INDEX, "model_index.json of a pipeline .*transformer/config.json"),
    "fewer entries": ({k: FLUX_INDEX[k] for k in ("_class_name", "transformer", "vae")},
                      "model_index.json of a pipeline .*transformer/config.json"),
    "pairs, no class": ({"unet": ["diffusers", "UNet2DConditionModel"]}, "pipeline .*unet/config.json"),
    "pipeline class": ({"_class_name": "FluxPipeline"}, "FluxPipeline is a pipeline.*transformer/config.json"),
    "scheduler": ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000},
                  "FlowMatchEulerDiscreteScheduler is a scheduler: it has no weights"),
    "not an object": ([["diffusers", "FluxTransformer2DModel"]], "holds a JSON list, not a config"),
}


@pytest.mark.parametrize("config, message", list(NOT_A_MODEL.values()), ids=list(NOT_A_MODEL))
def test_a_config_that_is_not_a_models_is_refused_clearly(config, message, tmp_path):
    path = tmp_path / "model_index.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        meta_model(path)
