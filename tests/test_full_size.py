"""Full-size models with random weights of trained magnitude: parity, bf16, conversion memory.
Slow (minutes, several GiB); CI runs them too."""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from siglip2_jax.checkpoint import read_checkpoint_config, restore_params
from siglip2_jax.model.build import model_from_params
from siglip2_jax.model.siglip import l2_normalize
from reference import make_reference, preset_hf_config, save_reference
from test_parity import (assert_parity, convert_and_load, inputs_for, max_diffs, normalize, our_outputs, outputs_of,
                         reference_outputs)

pytestmark = pytest.mark.slow


def test_base_patch16_224_matches_transformers(tmp_path):
    hf = preset_hf_config("siglip2-base-patch16-224")
    reference = make_reference(hf, seed=3)
    save_reference(reference, tmp_path / "hf")
    model = convert_and_load(tmp_path / "hf", tmp_path / "ours")
    pixels, ids = inputs_for(hf, batch=4)
    d = max_diffs(our_outputs(model, pixels, ids), reference_outputs(reference, pixels, ids))
    print(f"B/16@224 full size: {d}")
    assert_parity(d)


@pytest.fixture(scope="module")
def so400m(tmp_path_factory):
    """So400m/14@384 saved sharded by transformers, converted by the conversion program in its own
    process (so its peak memory is its own), plus the reference outputs."""
    tmp = tmp_path_factory.mktemp("so400m")
    hf = preset_hf_config("siglip2-so400m-patch14-384")
    reference = make_reference(hf, seed=4)
    save_reference(reference, tmp / "hf", max_shard_size="2GB")
    pixels, ids = inputs_for(hf, batch=2)
    ref = reference_outputs(reference, pixels, ids)
    del reference
    gc.collect()
    run = subprocess.run([sys.executable, "-m", "siglip2_convert", str(tmp / "hf"), str(tmp / "ours"), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    yield tmp, pixels, ids, ref, run.stdout
    shutil.rmtree(tmp, ignore_errors=True)  # ~9 GB of weights, of no use once this module is done


def test_so400m_conversion_peak_memory(so400m):
    _, _, _, _, report = so400m
    print(report)
    ratio = float(re.search(r"\(([\d.]+)x the", report).group(1))
    assert ratio <= 1.5, report


@pytest.fixture(scope="module")
def so400m_ours(so400m):
    """Our float32 So400m restored from the converted checkpoint and run once, for the parity and the
    bfloat16 tests: (config, params, our float32 outputs, float32 image and text embeddings as
    `encode_images` and `encode_texts` give them)."""
    tmp, pixels, ids, _, _ = so400m
    config = read_checkpoint_config(tmp / "ours")
    params = restore_params(tmp / "ours", config)
    model = model_from_params(config, params)
    images, texts = model.vision(jnp.asarray(pixels)), model.encode_texts(jnp.asarray(ids), normalize=False)
    encoded = normalize(l2_normalize(images.pooled)), normalize(l2_normalize(texts))
    yield config, params, outputs_of(model, images, texts), encoded
    del params, model
    gc.collect()


def test_so400m_patch14_384_matches_transformers(so400m, so400m_ours):
    _, _, _, ref, _ = so400m
    d = max_diffs(so400m_ours[2], ref)
    print(f"So400m/14@384 full size: {d}")
    assert_parity(d)


def test_so400m_bfloat16_close_to_float32(so400m, so400m_ours):
    _, pixels, ids, _, _ = so400m
    config, params, _, (image32, text32) = so400m_ours
    model = model_from_params(config, params, dtype=jnp.bfloat16)
    images = {jnp.float32: image32, jnp.bfloat16: normalize(model.encode_images(jnp.asarray(pixels)))}
    texts = {jnp.float32: text32, jnp.bfloat16: normalize(model.encode_texts(jnp.asarray(ids)))}
    image_cos = (images[jnp.float32] * images[jnp.bfloat16]).sum(-1)
    text_cos = (texts[jnp.float32] * texts[jnp.bfloat16]).sum(-1)
    print(f"So400m/14@384 bf16 vs fp32 cosine: images {image_cos}, texts {text_cos}")
    assert image_cos.min() >= 0.999 and text_cos.min() >= 0.999
    assert not np.array_equal(images[jnp.float32], images[jnp.bfloat16])  # bf16 really ran
