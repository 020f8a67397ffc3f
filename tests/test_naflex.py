"""NaFlex: parity with transformers' Siglip2Model on a batch mixing aspect ratios, proof that losing the
antialias breaks it, and no recompilation for new aspect ratios."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from siglip2_jax.images import preprocess_naflex
from siglip2_jax.model import attention, vision
from siglip2_jax.model.build import model_from_params
from reference import convert_reference, make_reference, preset_hf_config, save_reference, scaled_down

EMBED_TOL, LOGIT_TOL, HIDDEN_TOL = 2e-5, 1e-3, 1e-4
# (height, width) in pixels: extreme strips both ways, tiny, HD, and ordinary photos
SIZES = [(100, 3000), (3000, 100), (5, 5), (1080, 1920), (480, 640), (640, 480), (224, 1024), (333, 333), (768, 512)]


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@torch.no_grad()
def reference_outputs(model, inputs, ids):
    out = model(pixel_values=torch.from_numpy(inputs.patches), pixel_attention_mask=torch.from_numpy(inputs.mask),
                spatial_shapes=torch.from_numpy(inputs.spatial_shapes).long(), input_ids=torch.from_numpy(ids).long(),
                output_hidden_states=True)
    vision_out = out.vision_model_output
    return dict(image=out.image_embeds.numpy(), text=out.text_embeds.numpy(), logits=out.logits_per_image.numpy(),
                pooled=vision_out.pooler_output.numpy(), tokens=vision_out.last_hidden_state.numpy(),
                hidden=np.stack([h.numpy() for h in vision_out.hidden_states[1:]]))


def our_outputs(model, inputs, ids):
    v = model.vision(jax.tree.map(jnp.asarray, inputs), hidden_layers=range(model.config.vision.depth))
    image, text = normalize(v.pooled), normalize(model.encode_texts(jnp.asarray(ids), normalize=False))
    logits = model.logits(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32))
    return dict(image=image, text=text, logits=np.asarray(logits), pooled=np.asarray(v.pooled),
                tokens=np.asarray(v.tokens), hidden=np.asarray(v.hidden))


def diffs(ours, ref, mask):
    valid = mask.astype(bool)
    d = {k: float(np.abs(normalize(ours[k]) - normalize(ref[k])).max()) for k in ("image", "text")}
    d["logits"] = float(np.abs(ours["logits"] - ref["logits"]).max())
    d["pooled"] = float(np.abs(ours["pooled"] - ref["pooled"]).max() / np.abs(ref["pooled"]).max())
    # pad positions legitimately differ: compare valid patches only
    d["tokens"] = float(np.abs(ours["tokens"] - ref["tokens"])[valid].max())
    d["hidden"] = float(max(np.abs(o - r)[valid].max() / max(np.abs(r[valid]).max(), 1) for o, r in zip(ours["hidden"], ref["hidden"])))
    return d


def assert_parity(d):
    assert d["image"] <= EMBED_TOL and d["text"] <= EMBED_TOL, d
    assert d["logits"] <= LOGIT_TOL, d
    assert d["tokens"] <= HIDDEN_TOL and d["hidden"] <= HIDDEN_TOL, d


def setup(tmp_path, name, scaled, budget=256, seed=0, **model_kw):
    hf = preset_hf_config(name)
    if scaled:
        hf = scaled_down(hf)
    reference = make_reference(hf, seed=seed)
    model = model_from_params(*convert_reference(save_reference(reference, tmp_path / "hf"), tmp_path / "ours"), **model_kw)
    inputs = preprocess_naflex(images(SIZES), 16, budget)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, hf["text_config"]["vocab_size"], (3, 64)).astype(np.int32)
    return model, reference, inputs, ids


@pytest.mark.parametrize("name,budget,implementation", [
    ("siglip2-base-patch16-naflex", 256, None), ("siglip2-so400m-patch16-naflex", 256, None),
    ("siglip2-base-patch16-naflex", 576, None),
    ("siglip2-base-patch16-naflex", 256, "xla"),   # masks through jax.nn.dot_product_attention (the GPU path)
])
def test_scaled_down_naflex_matches_transformers(name, budget, implementation, tmp_path, monkeypatch):
    model, reference, inputs, ids = setup(tmp_path, name, scaled=True, budget=budget, attention_impl=implementation)
    assert len({tuple(s) for s in inputs.spatial_shapes}) >= 8
    ref = reference_outputs(reference, inputs, ids)
    d = diffs(our_outputs(model, inputs, ids), ref, inputs.mask)
    print(f"{name} budget {budget}: {d}")
    assert_parity(d)

    assert_fails_without_antialias(model, inputs, ids, ref, monkeypatch)


def test_grouped_attention_with_masks_matches_transformers(tmp_path, monkeypatch):
    """Padding masks through the CPU attention that loops over groups of (image, head) pairs."""
    monkeypatch.setattr(attention, "LOGITS_BYTES_ONE_STEP", 0)
    monkeypatch.setattr(attention, "LOGITS_BYTES_PER_STEP", 3 * 256 * 256 * 4)
    model, reference, inputs, ids = setup(tmp_path, "siglip2-base-patch16-naflex", scaled=True, attention_impl="einsum")
    assert_parity(diffs(our_outputs(model, inputs, ids), reference_outputs(reference, inputs, ids), inputs.mask))


def no_antialias(out_size, in_size, rows):
    """Plain bilinear (align_corners=False) without widening the filter when shrinking."""
    scale = in_size / out_size.astype(jnp.float32)
    center = (rows.astype(jnp.float32) + 0.5) * scale - 0.5
    taps = jnp.arange(in_size, dtype=jnp.float32)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(taps - jnp.clip(center, 0, in_size - 1)[..., None]))
    return w / w.sum(-1, keepdims=True)


def assert_fails_without_antialias(model, inputs, ids, ref, monkeypatch):
    """The same comparison goes red once the position resize loses its antialias."""
    monkeypatch.setattr(vision, "bilinear_antialias_weights", no_antialias)
    with pytest.raises(AssertionError):
        assert_parity(diffs(our_outputs(model, inputs, ids), ref, inputs.mask))


@pytest.mark.slow
def test_full_size_base_naflex_matches_transformers(tmp_path):
    model, reference, inputs, ids = setup(tmp_path, "siglip2-base-patch16-naflex", scaled=False, seed=5)
    ref = reference_outputs(reference, inputs, ids)
    del reference
    d = diffs(our_outputs(model, inputs, ids), ref, inputs.mask)
    print(f"base-patch16-naflex full size: {d}")
    assert_parity(d)   # (that the comparison fails without the antialias is shown scaled down, above)


def test_convert_verify_certifies_naflex(tmp_path):
    from siglip2_convert.verify import verify

    setup(tmp_path, "siglip2-so400m-patch16-naflex", scaled=True)
    report = verify(tmp_path / "hf", tmp_path / "ours")
    print("\n".join(report.lines()))
    assert report.passed and report.diffs["image embeds"] <= EMBED_TOL


def test_new_aspect_ratios_compile_nothing(tmp_path):
    from siglip2_jax.config import Siglip2Config
    from siglip2_jax.model import Siglip2
    from flax import nnx

    config = Siglip2Config.from_hf(scaled_down(preset_hf_config("siglip2-base-patch16-naflex")))
    model = Siglip2(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_images(x))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_ , **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    first = preprocess_naflex(images(SIZES[:4]), 16, 256)
    jax.block_until_ready(encode(state, first))
    assert len(compiles) >= 1
    before = len(compiles)
    second = preprocess_naflex(images([(37, 911), (911, 37), (90, 700), (600, 200)], seed=2), 16, 256)
    assert not {tuple(s) for s in second.spatial_shapes} & {tuple(s) for s in first.spatial_shapes}
    jax.block_until_ready(encode(state, second))
    assert len(compiles) == before, compiles[before:]
