"""Every released config, full size, without allocating: our key table against the transformers model
built on the meta device, and our parameter count against its."""

from __future__ import annotations

import numpy as np
import pytest

from siglip2_jax.checkpoint.hf import hf_shapes
from siglip2_jax.config import Siglip2Config, preset_names
from siglip2_jax.model.build import flat_param_shapes
from reference import make_reference, preset_hf_config

# (vision width, depth, patches, text width, projection) straight from SPEC.md's table
EXPECTED = {
    "siglip2-base-patch32-256": (768, 12, 64, 768, 768),
    "siglip2-base-patch16-224": (768, 12, 196, 768, 768),
    "siglip2-base-patch16-256": (768, 12, 256, 768, 768),
    "siglip2-base-patch16-384": (768, 12, 576, 768, 768),
    "siglip2-base-patch16-512": (768, 12, 1024, 768, 768),
    "siglip2-large-patch16-256": (1024, 24, 256, 1024, 1024),
    "siglip2-large-patch16-384": (1024, 24, 576, 1024, 1024),
    "siglip2-large-patch16-512": (1024, 24, 1024, 1024, 1024),
    "siglip2-so400m-patch14-224": (1152, 27, 256, 1152, 1152),
    "siglip2-so400m-patch14-384": (1152, 27, 729, 1152, 1152),
    "siglip2-so400m-patch16-256": (1152, 27, 256, 1152, 1152),
    "siglip2-so400m-patch16-384": (1152, 27, 576, 1152, 1152),
    "siglip2-so400m-patch16-512": (1152, 27, 1024, 1152, 1152),
    "siglip2-giant-opt-patch16-256": (1536, 40, 256, 1152, 1536),
    "siglip2-giant-opt-patch16-384": (1536, 40, 576, 1152, 1536),
    "siglip2-base-patch16-naflex": (768, 12, 256, 768, 768),
    "siglip2-so400m-patch16-naflex": (1152, 27, 256, 1152, 1152),
}


def test_all_17_presets_exist():
    assert sorted(preset_names()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_matches_spec_and_transformers_shapes(name):
    config = Siglip2Config.preset(name)
    width, depth, patches, text_width, projection = EXPECTED[name]
    assert (config.vision.width, config.vision.depth, config.vision.num_positions) == (width, depth, patches)
    assert (config.text.width, config.text.projection_size, config.text.vocab_size) == (text_width, projection, 256000)
    assert config.naflex == ("naflex" in name)

    reference = make_reference(preset_hf_config(name), meta=True)
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert hf_shapes(config) == theirs

    ours = flat_param_shapes(config)
    assert sum(int(np.prod(s.shape)) for s in ours.values()) == sum(int(np.prod(s)) for s in theirs.values())
