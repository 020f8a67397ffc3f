"""FixRes at another resolution: `load(..., image_size=N)` against transformers' `interpolate_pos_encoding=True`
(bicubic resize of the position table, align_corners=False, no antialias; grid N // patch_size)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reference import convert_reference, make_reference, preset_hf_config, save_reference, scaled_down
from siglip2_jax import load
from siglip2_jax.config import ConfigError
from siglip2_jax.model import vision
from test_parity import EMBED_TOL, TOKEN_TOL, normalize

# (preset, sizes): patch 16 on a 14x14 grid and patch 14 on a 27x27 grid; up, down, and sizes the patch
# does not divide (250 // 16 = 15; 300 // 14 = 21). The table resize
# alone is checked against torch on more grids, up and down.
CASES = [("siglip2-base-patch16-224", [448, 250]), ("siglip2-so400m-patch14-384", [300])]


def torch_interpolate(table: np.ndarray, new_grid: int) -> np.ndarray:
    """The reference's resize of a (G*G, D) table (SiglipVisionEmbeddings.interpolate_pos_encoding)."""
    grid, dim = round(len(table) ** 0.5), table.shape[1]
    x = torch.from_numpy(table).reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(-1, dim).numpy()


def test_table_resize_equals_torch_bicubic():
    for grid, new_grid in [(14, 28), (14, 15), (27, 16)]:
        table = np.random.default_rng(grid * new_grid).normal(size=(grid * grid, 8)).astype(np.float32)
        ours = np.asarray(vision.interpolate_fixres_positions(jnp.asarray(table), 16, new_grid * 16 + 7))
        reference = torch_interpolate(table, new_grid)
        assert ours.shape == reference.shape == (new_grid * new_grid, 8)
        assert np.abs(ours - reference).max() <= 1e-5, (grid, new_grid)
        # the same grid is the table itself, as in transformers (which skips the resize)
        same = vision.interpolate_fixres_positions(jnp.asarray(table), 16, grid * 16)
        assert np.array_equal(np.asarray(same), table)


def test_table_resize_comparison_can_fail(monkeypatch):
    table = np.random.default_rng(0).normal(size=(14 * 14, 8)).astype(np.float32)
    monkeypatch.setattr(vision, "bicubic_weights", vision.bilinear_antialias_weights)  # NaFlex's resize
    for new_grid in (28, 10):
        ours = np.asarray(vision.interpolate_fixres_positions(jnp.asarray(table), 16, new_grid * 16))
        assert np.abs(ours - torch_interpolate(table, new_grid)).max() > 1e-2


@pytest.mark.parametrize("name, sizes", CASES)
def test_load_at_another_size_matches_transformers_interpolate_pos_encoding(name, sizes, tmp_path):
    hf = scaled_down(preset_hf_config(name))
    reference = make_reference(hf, seed=3)
    convert_reference(save_reference(reference, tmp_path / "hf"), tmp_path / "ours")
    patch = hf["vision_config"]["patch_size"]
    rng = np.random.default_rng(0)
    for size in sizes:
        pipeline = load(tmp_path / "ours", image_size=size)
        assert pipeline.config.vision.image_size == size and pipeline.preprocessor.image_size == size
        pixels = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            ref = reference.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                         interpolate_pos_encoding=True)
        graphdef, state = nnx.split(pipeline.model.vision)
        pooled, tokens = jax.jit(lambda s, x: _pooled_tokens(nnx.merge(graphdef, s)(x)))(state, pixels)
        assert tokens.shape == (2, (size // patch) ** 2, hf["vision_config"]["hidden_size"])
        d_pooled = float(np.abs(normalize(pooled) - normalize(ref.pooler_output.numpy())).max())
        d_tokens = float(np.abs(np.asarray(tokens) - ref.last_hidden_state.numpy()).max())
        print(f"{name} at {size}: pooled {d_pooled:.2e}, tokens {d_tokens:.2e}")
        assert d_pooled <= EMBED_TOL and d_tokens <= TOKEN_TOL
    # dense features and preprocessing follow the new size
    features = pipeline.patch_features([np.zeros((50, 70, 3), np.uint8)])
    assert pipeline.preprocess(np.zeros((50, 70, 3), np.uint8)).shape == (1, size, size, 3)
    assert features.grid.tolist() == [[size // patch] * 2] and features.features.shape[1] == (size // patch) ** 2
    with pytest.raises(ConfigError, match="image_size"):
        load(tmp_path / "ours", image_size=patch - 1)
    if name == CASES[0][0]:  # saved at the new size, it loads at that size with its preprocessing
        again = load(pipeline.save(tmp_path / "saved"))
        assert again.config.vision.image_size == size and again.preprocessor == pipeline.preprocessor
        assert np.array_equal(again.model.vision.embed.position[...], pipeline.model.vision.embed.position[...])


def _pooled_tokens(out):
    return out.pooled, out.tokens
