"""fp32 parity with transformers (eager attention) for every FixRes preset, scaled down, plus full-size
B/16@224 and So400m/14@384; and proof that the comparison can fail."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from siglip2_jax.config import preset_names
from siglip2_jax.model import attention
from siglip2_jax.model.build import model_from_params
from siglip2_jax.params import Layout, to_layout
from reference import convert_reference, make_reference, preset_hf_config, save_reference, scaled_down

EMBED_TOL, LOGIT_TOL, TOKEN_TOL = 2e-5, 1e-3, 1e-4
FIXRES = [n for n in preset_names() if "naflex" not in n]


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def inputs_for(hf: dict, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = hf["vision_config"]["image_size"]
    pixels = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(0, hf["text_config"]["vocab_size"], (batch + 1, hf["text_config"]["max_position_embeddings"]))
    ids[0, 5:] = 0  # a realistic padded caption too: 4 tokens, EOS, pads
    ids[0, 4] = 1
    return pixels, ids.astype(np.int32)


@torch.no_grad()
def reference_outputs(model, pixels, ids):
    out = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), input_ids=torch.from_numpy(ids).long())
    return dict(image=out.image_embeds.numpy(), text=out.text_embeds.numpy(), logits=out.logits_per_image.numpy(),
                tokens=out.vision_model_output.last_hidden_state.numpy())


def our_outputs(model, pixels, ids):
    return outputs_of(model, model.vision(jnp.asarray(pixels)), model.encode_texts(jnp.asarray(ids), normalize=False))


def outputs_of(model, images, texts):
    """our_outputs from what the towers returned: the vision tower's output, the text tower's pooled embeddings."""
    image, text = normalize(images.pooled), normalize(texts)
    return dict(image=image, text=text, logits=np.asarray(model.logits(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32))),
                tokens=np.asarray(images.tokens))


def max_diffs(ours, ref):
    return {k: float(np.abs(np.asarray(ours[k], np.float64) - np.asarray(ref[k], np.float64)).max()) for k in ref}


def assert_parity(d):
    assert d["image"] <= EMBED_TOL and d["text"] <= EMBED_TOL, d
    assert d["logits"] <= LOGIT_TOL, d
    assert d["tokens"] <= TOKEN_TOL, d


def convert_and_load(hf_dir, out_dir):
    return model_from_params(*convert_reference(hf_dir, out_dir))


@pytest.mark.parametrize("name", FIXRES)
def test_scaled_down_preset_matches_transformers(name, tmp_path):
    hf = scaled_down(preset_hf_config(name))
    reference = make_reference(hf, seed=len(name))
    # every other preset is saved sharded, to exercise model.safetensors.index.json
    shard = "200KB" if FIXRES.index(name) % 2 else None
    save_reference(reference, tmp_path / "hf", max_shard_size=shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = convert_and_load(tmp_path / "hf", tmp_path / "ours")
    pixels, ids = inputs_for(hf, batch=2)
    d = max_diffs(our_outputs(model, pixels, ids), reference_outputs(reference, pixels, ids))
    print(f"{name}: {d}")
    assert_parity(d)


# ---- the comparison must be able to fail -----------------------------------------------------------
@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mutation")
    hf = scaled_down(preset_hf_config("siglip2-so400m-patch14-384"))
    reference = make_reference(hf, seed=1)
    config, params = convert_reference(save_reference(reference, tmp / "hf"), tmp / "ours")
    pixels, ids = inputs_for(hf, batch=2)
    return config, params, pixels, ids, reference_outputs(reference, pixels, ids)


def _perturbed(params, path, index, delta):
    params, key = dict(params), "/".join(path)  # flat params (siglip2_jax.params)
    params[key] = params[key].at[index].add(delta)
    return params


@pytest.mark.parametrize("path,index", [
    (("vision", "encoder", "blocks", "mlp", "fc1_kernel"), (1, 3, 5)),
    (("vision", "head", "attn", "qkv_kernel"), (0, 1, 0, 0)),
    (("vision", "embed", "position"), (100, 7)),
    (("text", "encoder", "blocks", "attn", "qkv_kernel"), (0, 2, 1, 1, 3)),
    (("text", "head_kernel"), (4, 4)),
])
def test_parity_fails_when_one_weight_moves(small_pair, path, index):
    config, params, pixels, ids, ref = small_pair
    assert_parity(max_diffs(our_outputs(model_from_params(config, params), pixels, ids), ref))
    moved = model_from_params(config, _perturbed(params, path, index, 0.05))
    d = max_diffs(our_outputs(moved, pixels, ids), ref)
    with pytest.raises(AssertionError):
        assert_parity(d)


@pytest.mark.parametrize("change", ["exact_gelu", "layer_norm_eps"])
def test_parity_fails_when_one_op_changes(small_pair, change):
    config, params, pixels, ids, ref = small_pair
    if change == "exact_gelu":
        vision = dataclasses.replace(config.vision, approximate_gelu=False)
        text = dataclasses.replace(config.text, approximate_gelu=False)
    else:
        vision = dataclasses.replace(config.vision, layer_norm_eps=1e-2)
        text = dataclasses.replace(config.text, layer_norm_eps=1e-2)
    changed = dataclasses.replace(config, vision=vision, text=text)
    d = max_diffs(our_outputs(model_from_params(changed, params), pixels, ids), ref)
    with pytest.raises(AssertionError):
        assert_parity(d)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_layer"])
@pytest.mark.parametrize("implementation", ["xla", "einsum"])
def test_both_attention_paths_match_transformers(small_pair, implementation, stacked):
    """The GPU path (jax.nn.dot_product_attention, cuDNN there) and the CPU/TPU einsum path, both on CPU,
    with the encoder's layers stacked (scan: training, conversion checks) or one array per layer
    (inference, what `siglip2_jax.load` builds)."""
    config, params, pixels, ids, ref = small_pair
    if not stacked:
        params = to_layout(dict(params), Layout.PER_LAYER)
    model = model_from_params(config, params, attention_impl=implementation)
    assert model.vision.encoder.stacked == stacked and model.text.encoder.stacked == stacked
    block = model.vision.encoder.blocks if stacked else model.vision.encoder.layers[0]
    assert block.attn.implementation == implementation
    assert_parity(max_diffs(our_outputs(model, pixels, ids), ref))


@pytest.mark.parametrize("implementation", ["xla", "einsum"])
def test_float32_models_ask_for_float32_dots(small_pair, implementation):
    """JAX computes float32 dots in TF32 on NVIDIA GPUs since Ampere and in one bfloat16 pass on TPU
    unless a dot asks for more (JAX's "Matmul precision" page); transformers computes float32 in float32.
    CPU numbers are the same either way, so this reads the program of the whole model (both towers and the
    logits): every dot of a float32 model asks for HIGHEST, and a bfloat16 model's only such dots are its
    float32 patch embedding and the float32 logits."""
    config, params, pixels, ids, _ = small_pair

    def dots(dtype):
        model = model_from_params(config, params, dtype=dtype, attention_impl=implementation)
        program = jax.jit(lambda x, t: model(x, t)).lower(jnp.asarray(pixels), jnp.asarray(ids)).as_text()
        found = [line for line in program.splitlines() if "dot_general" in line]
        return len(found), sum("HIGHEST" in line for line in found)

    count, exact = dots(jnp.float32)
    assert count >= 13 and exact == count   # per tower at least qkv, attention (2), out, fc1, fc2; the logits
    assert dots(jnp.bfloat16)[1] == 2


@pytest.mark.parametrize("bytes_per_step", [1, 40_000], ids=["one_pair", "several_pairs"])
def test_grouped_attention_matches_transformers(small_pair, monkeypatch, bytes_per_step):
    """The CPU attention that loops over groups of (image, head) pairs when their logits are large."""
    monkeypatch.setattr(attention, "LOGITS_BYTES_ONE_STEP", 0)
    monkeypatch.setattr(attention, "LOGITS_BYTES_PER_STEP", bytes_per_step)
    config, params, pixels, ids, ref = small_pair
    model = model_from_params(config, to_layout(dict(params), Layout.PER_LAYER), attention_impl="einsum")
    jaxpr = str(jax.make_jaxpr(lambda x: model.encode_texts(x))(jnp.asarray(ids)))
    assert "while" in jaxpr or "scan" in jaxpr   # per-layer weights: only the grouping loops
    assert_parity(max_diffs(our_outputs(model, pixels, ids), ref))


def test_pairs_per_step():
    assert attention._pairs_per_step(96, 64 * 64 * 4) == 96                 # small logits: one step
    assert attention._pairs_per_step(128, 729 * 729 * 4) == 2               # So400m: 2 x 2.1 MB per step
    assert attention._pairs_per_step(16, 729 * 729 * 4) == 2
    assert attention._pairs_per_step(7, 729 * 729 * 4) == 1                 # prime: one pair per step
    assert attention._pairs_per_step(12, 4096 * 4096 * 4) == 1              # over the budget alone: still one


def test_layer_layouts_round_trip(small_pair):
    config, params, *_ = small_pair
    flat = dict(params)
    per_layer = to_layout(dict(flat), Layout.PER_LAYER)
    depth = config.vision.depth
    assert "vision/encoder/layers/0/mlp/fc1_kernel" in per_layer and not any("/blocks/" in p for p in per_layer)
    assert per_layer[f"vision/encoder/layers/{depth - 1}/mlp/fc1_kernel"].shape == flat["vision/encoder/blocks/mlp/fc1_kernel"].shape[1:]
    back = to_layout(dict(per_layer), Layout.STACKED)
    assert set(back) == set(flat)
    for path in flat:
        np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(flat[path]))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_layer"])
def test_hidden_layers_are_the_blocks_asked_for(small_pair, stacked):
    """hidden_layers returns the outputs of the blocks asked for, in that order (negative: from the last),
    the same as the full stack's rows; none asked: None; a block that does not exist: ValueError."""
    config, params, pixels, *_ = small_pair
    model = model_from_params(config, params if stacked else to_layout(dict(params), Layout.PER_LAYER))
    x, depth = jnp.asarray(pixels), config.vision.depth
    every = model.vision(x, hidden_layers=range(depth))
    some = model.vision(x, hidden_layers=[depth - 1, 0, -2])
    assert model.vision(x).hidden is None and every.hidden.shape == (depth, *every.tokens.shape)
    assert np.array_equal(some.hidden, every.hidden[np.array([depth - 1, 0, depth - 2])])
    assert np.array_equal(some.pooled, model.vision(x).pooled)
    with pytest.raises(ValueError, match="blocks"):
        model.vision(x, hidden_layers=[depth])
