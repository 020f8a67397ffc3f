import json

import pytest

from siglip2_jax.config import ConfigError, Siglip2Config, preset_names
from reference import hf_config_object, preset_hf_config


@pytest.mark.parametrize("name", preset_names())
def test_presets_round_trip_through_hf_layout(name):
    config = Siglip2Config.preset(name)
    assert Siglip2Config.from_hf(config.to_hf(), name=config.name) == config
    # and transformers reads our presets as the same architecture
    theirs = hf_config_object(preset_hf_config(name))
    assert theirs.vision_config.hidden_size == config.vision.width
    assert theirs.text_config.projection_size == config.text.projection_size


def test_preset_by_hub_id():
    assert Siglip2Config.preset("google/siglip2-giant-opt-patch16-384").text.projection_size == 1536
    with pytest.raises(ConfigError, match="unknown preset"):
        Siglip2Config.preset("google/siglip2-tiny")


def test_standalone_configs():
    full = preset_hf_config("siglip2-base-patch16-224")
    vision = Siglip2Config.from_hf({"model_type": "siglip_vision_model", **full["vision_config"]})
    text = Siglip2Config.from_hf({"model_type": "siglip_text_model", **full["text_config"]})
    assert vision.text is None and vision.vision.image_size == 224
    assert text.vision is None and text.text.vocab_size == 256000
    naflex = Siglip2Config.from_hf({"model_type": "siglip2_vision_model", **preset_hf_config("siglip2-base-patch16-naflex")["vision_config"]})
    assert naflex.naflex and naflex.vision.grid_size == 16


def test_projection_size_defaults_to_width():
    hf = preset_hf_config("siglip2-base-patch16-224")
    del hf["text_config"]["projection_size"]
    assert Siglip2Config.from_hf(hf).text.projection_size == 768


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.update(model_type="clip"), "not a SigLIP"),
    (lambda h: h["vision_config"].update(num_attention_heads=7), "not divisible"),
    (lambda h: h["text_config"].update(hidden_act="relu"), "hidden_act='relu'"),
    (lambda h: h["text_config"].update(projection_size=512), "projection_size"),
    (lambda h: h["vision_config"].update(vision_use_head=False), "vision_use_head"),
    (lambda h: h["vision_config"].update(image_size=[224, 256]), "not square"),
    (lambda h: h.pop("text_config"), "needs both"),
    (lambda h: h["text_config"].pop("vocab_size"), "vocab_size"),
])
def test_bad_configs_say_why(edit, match):
    hf = preset_hf_config("siglip2-base-patch16-224")
    edit(hf)
    with pytest.raises(ConfigError, match=match):
        Siglip2Config.from_hf(hf)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Siglip2Config.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no such config file"):
        Siglip2Config.from_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        Siglip2Config.from_json(tmp_path / "list.json")
