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
from reference import make_reference, preset_hf_config, save_reference
from test_parity import assert_parity, convert_and_load, inputs_for, max_diffs, normalize, our_outputs, reference_outputs

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


def test_so400m_patch14_384_matches_transformers(so400m):
    tmp, pixels, ids, ref, _ = so400m
    config = read_checkpoint_config(tmp / "ours")
    model = model_from_params(config, restore_params(tmp / "ours", config))
    d = max_diffs(our_outputs(model, pixels, ids), ref)
    print(f"So400m/14@384 full size: {d}")
    assert_parity(d)


def test_so400m_bfloat16_close_to_float32(so400m):
    tmp, pixels, ids, _, _ = so400m
    config = read_checkpoint_config(tmp / "ours")
    params = restore_params(tmp / "ours", config)
    images, texts = {}, {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = model_from_params(config, params, dtype=dtype)
        images[dtype] = normalize(model.encode_images(jnp.asarray(pixels)))
        texts[dtype] = normalize(model.encode_texts(jnp.asarray(ids)))
    image_cos = (images[jnp.float32] * images[jnp.bfloat16]).sum(-1)
    text_cos = (texts[jnp.float32] * texts[jnp.bfloat16]).sum(-1)
    print(f"So400m/14@384 bf16 vs fp32 cosine: images {image_cos}, texts {text_cos}")
    assert image_cos.min() >= 0.999 and text_cos.min() >= 0.999
    assert not np.array_equal(images[jnp.float32], images[jnp.bfloat16])  # bf16 really ran
