"""Every pixel-changing field of a checkpoint's processor config, against transformers' PIL processors read
from the same directory (bit-exact), wherever preprocessing happens; and one-line refusals of the rest."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

import siglip2_jax
from siglip2_jax.config import ConfigError, VisionConfig
from siglip2_jax.images import ImageError, ImagePreprocessor

transformers = pytest.importorskip("transformers")

FIXRES = VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16, image_size=64)
NAFLEX = VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16, naflex=True)
HUB_FIXRES = {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
              "do_resize": True, "size": {"height": 64, "width": 64}, "resample": 2, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
              "do_convert_rgb": None}
HUB_NAFLEX = {**{k: v for k, v in HUB_FIXRES.items() if k != "size"}, "image_processor_type": "Siglip2ImageProcessor",
              "processor_class": "Siglip2Processor", "patch_size": 16, "max_num_patches": 64}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
# One change from the hub settings per case: each field, each PIL filter.
CHANGES = {f"resample {r}": {"resample": r} for r in range(6)} | {
    "imagenet mean/std": IMAGENET,
    "scalar mean/std": {"image_mean": 0.25, "image_std": 2.0},
    "no rescale": {"do_rescale": False},
    "rescale factor": {"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3},
    "no normalize": {"do_normalize": False},
    "neither": {"do_rescale": False, "do_normalize": False},
    "convert rgb": {"do_convert_rgb": True},
    "nulls": {"do_rescale": None, "do_convert_rgb": None},  # None to transformers: false
    "fields left out": {"drop": ["resample", "image_std", "rescale_factor", "do_convert_rgb"]},
}


def _write(directory, settings, name="preprocessor_config.json"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(settings))
    return directory


def _settings(base, change):
    change = dict(change)
    settings = {k: v for k, v in base.items() if k not in change.pop("drop", [])}
    return {**settings, **change}


def _images():
    """Photos of several sizes and modes (RGBA and LA composite onto white, P with transparency, L)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(48, 80), (100, 37), (64, 64), (9, 200)]]
    images = [Image.fromarray(a) for a in arrays]
    rgba = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    images += [Image.fromarray(rgba), Image.fromarray(rgba).convert("LA"), Image.fromarray(arrays[0]).convert("L"),
               Image.fromarray(arrays[1]).convert("P")]
    images[-1].info["transparency"] = 7
    return images


def _reference(directory, images, naflex):
    cls = transformers.Siglip2ImageProcessorPil if naflex else transformers.SiglipImageProcessorPil
    return cls.from_pretrained(directory)(images, return_tensors="np")


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_fixres_fields_bit_exact_with_transformers(tmp_path, change):
    directory = _write(tmp_path, _settings(HUB_FIXRES, change))
    images = _images()
    if not transformers.SiglipImageProcessorPil.from_pretrained(directory).do_convert_rgb:
        images = [image.convert("RGB") for image in images]  # transformers cannot run other modes then
    ours = ImagePreprocessor.from_dir(directory, FIXRES)(images)
    reference = _reference(directory, images, naflex=False)["pixel_values"].transpose(0, 2, 3, 1)
    assert ours.shape == (len(images), 64, 64, 3) and ours.dtype == np.float32
    assert np.array_equal(ours, reference.astype(np.float32))


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_naflex_fields_bit_exact_with_transformers(tmp_path, change):
    directory = _write(tmp_path, _settings(HUB_NAFLEX, change))
    images = [image.convert("RGB") for image in _images()]  # do_convert_rgb null: transformers does not convert
    ours = ImagePreprocessor.from_dir(directory, NAFLEX)(images)
    reference = _reference(directory, images, naflex=True)
    assert ours.patches.shape == (len(images), 64, 16 * 16 * 3)
    assert np.array_equal(ours.patches, reference["pixel_values"].astype(np.float32))
    assert np.array_equal(ours.mask, reference["pixel_attention_mask"])
    assert np.array_equal(ours.spatial_shapes, reference["spatial_shapes"])


def test_budget_and_no_resize_bit_exact_with_transformers(tmp_path):
    naflex = _write(tmp_path / "naflex", {**HUB_NAFLEX, "max_num_patches": 20, "do_resize": False})
    fixres = _write(tmp_path / "fixres", {**HUB_FIXRES, "do_resize": False})
    rng = np.random.default_rng(1)
    fits = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in [(64, 80, 3), (16, 320, 3), (32, 32, 3)]]
    ours = ImagePreprocessor.from_dir(naflex, NAFLEX)(fits)
    reference = _reference(naflex, fits, naflex=True)
    assert np.array_equal(ours.patches, reference["pixel_values"])
    assert np.array_equal(ours.spatial_shapes, reference["spatial_shapes"])
    square = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]
    reference = _reference(fixres, square, naflex=False)["pixel_values"].transpose(0, 2, 3, 1)
    assert np.array_equal(ImagePreprocessor.from_dir(fixres, FIXRES)(square), reference)
    # images the model could not take unresized are refused, one line naming the field
    for directory, vision, image in [(naflex, NAFLEX, (40, 80, 3)), (naflex, NAFLEX, (96, 96, 3)),
                                     (fixres, FIXRES, (64, 65, 3))]:
        with pytest.raises(ImageError, match="do_resize false") as error:
            ImagePreprocessor.from_dir(directory, vision)(np.zeros(image, np.uint8))
        assert "\n" not in str(error.value)


def test_the_issues_small_cases(tmp_path):
    """The values transformers gives (issue 15): ImageNet mean/std on one pixel; bicubic on a checkerboard."""
    imagenet = _write(tmp_path / "imagenet", {**HUB_FIXRES, **IMAGENET})
    pixel = np.full((8, 8, 3), (128, 64, 200), np.uint8)
    ours = ImagePreprocessor.from_dir(imagenet, FIXRES)(pixel)[0, 0, 0]
    assert np.array_equal(ours, _reference(imagenet, [Image.fromarray(pixel)], False)["pixel_values"][0, :, 0, 0])
    assert np.allclose(ours, [0.074065, -0.915266, 1.681394], atol=1e-6)

    size_224 = VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16, image_size=224)
    bicubic = _write(tmp_path / "bicubic", {**HUB_FIXRES, "size": {"height": 224, "width": 224}, "resample": 3})
    board = (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    row = ImagePreprocessor.from_dir(bicubic, size_224)(board)[0, 0, 52:60, 0]
    assert np.array_equal(row, _reference(bicubic, [Image.fromarray(board)], False)["pixel_values"][0, 0, 0, 52:60])
    expected = [-0.1294, -0.0745, -0.0118, 0.0431, 0.1059, 0.1608, 0.2235, 0.2863]
    assert np.allclose(row, expected, atol=1e-4)
    # today's defaults (no processor config) are bilinear: the issue's "ours" row
    bilinear = ImagePreprocessor.from_dir(tmp_path / "none", size_224)(board)[0, 0, 52:60, 0]
    assert np.allclose(bilinear, [-0.1216, -0.0902, -0.0510, -0.0196, 0.0196, 0.0510, 0.0902, 0.1216], atol=1e-4)


def test_no_processor_config_keeps_the_hub_defaults_and_nested_config_wins(tmp_path):
    assert ImagePreprocessor.from_dir(tmp_path, FIXRES) == ImagePreprocessor(image_size=64)
    assert ImagePreprocessor.from_dir(tmp_path, NAFLEX).max_num_patches == 256
    # transformers reads processor_config.json's "image_processor" before preprocessor_config.json
    _write(tmp_path, {**HUB_FIXRES, "resample": 0})
    _write(tmp_path, {"image_processor": {**HUB_FIXRES, "resample": 4}}, "processor_config.json")
    assert transformers.SiglipImageProcessorPil.from_pretrained(tmp_path).resample == 4
    assert ImagePreprocessor.from_dir(tmp_path, FIXRES).resample == 4


def test_saved_settings_read_back_by_transformers(tmp_path):
    preprocessor = ImagePreprocessor.from_config({**HUB_FIXRES, **IMAGENET, "resample": 3}, FIXRES, image_size=96)
    preprocessor.save(tmp_path)
    images = _images()[:3]
    reference = _reference(tmp_path, images, naflex=False)["pixel_values"].transpose(0, 2, 3, 1)
    assert np.array_equal(preprocessor(images), reference) and reference.shape[1] == 96
    assert ImagePreprocessor.from_dir(tmp_path, FIXRES, image_size=96) == preprocessor
    assert pickle.loads(pickle.dumps(preprocessor)) == preprocessor  # grain workers get it pickled


REFUSED = [
    ("resample", 7, FIXRES), ("resample", "bilinear", FIXRES), ("do_center_crop", True, FIXRES),
    ("do_pad", True, NAFLEX), ("size", {"shortest_edge": 64}, FIXRES), ("size", {"height": 64, "width": 80}, FIXRES),
    ("size", {"height": 128, "width": 128}, FIXRES), ("image_mean", [0.5, 0.5], FIXRES), ("image_std", 0, NAFLEX),
    ("rescale_factor", "1/255", FIXRES), ("do_normalize", "yes", FIXRES), ("patch_size", 14, NAFLEX),
    ("max_num_patches", 0, NAFLEX), ("image_processor_type", "CLIPImageProcessor", FIXRES),
    ("image_processor_type", "SiglipImageProcessor", NAFLEX), ("do_convert_rgb", "sometimes", FIXRES),
    ("image_mean", None, FIXRES), ("rescale_factor", None, NAFLEX), ("resample", None, FIXRES),  # nor transformers
]


@pytest.mark.parametrize("field, value, vision", REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_values_not_implemented_are_refused_in_one_line_naming_the_field(tmp_path, field, value, vision):
    _write(tmp_path, {**(HUB_NAFLEX if vision.naflex else HUB_FIXRES), field: value})
    with pytest.raises(ConfigError) as error:
        ImagePreprocessor.from_dir(tmp_path, vision)
    message = str(error.value)
    assert "\n" not in message and "preprocessor_config.json" in message and field in message


def test_a_size_not_the_models_says_how_to_run_at_it(tmp_path):
    # the hint named only load's image_size=, not the commands' flag
    _write(tmp_path, {**HUB_FIXRES, "size": {"height": 128, "width": 128}})
    with pytest.raises(ConfigError, match=r"pass image_size=128, or --image-size 128 to a command, to run it"):
        ImagePreprocessor.from_dir(tmp_path, FIXRES)


def test_do_convert_rgb_false_refuses_other_modes(tmp_path):
    _write(tmp_path, {**HUB_FIXRES, "do_convert_rgb": False})
    preprocessor = ImagePreprocessor.from_dir(tmp_path, FIXRES)
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert preprocessor(rgb).shape == (1, 64, 64, 3)
    with pytest.raises(ImageError, match="do_convert_rgb false"):
        preprocessor(Image.fromarray(rgb).convert("RGBA"))


def test_load_embed_and_finetune_use_the_processor_config(fixres, tmp_path):
    """One directory with ImageNet mean/std and bicubic: load, the server's `preprocess`, embed's workers and
    the fine-tuning transform all give transformers' pixels; a whole model gives transformers' embeddings."""
    import torch

    from siglip2_jax.embed import _preprocessor

    hf_dir = tmp_path / "hf"
    shutil.copytree(fixres[0], hf_dir)
    _write(hf_dir, {**HUB_FIXRES, **IMAGENET, "resample": 3, "do_convert_rgb": True,
                    "size": {"height": 224, "width": 224}})
    images = _images()
    reference_pixels = _reference(hf_dir, images, naflex=False)["pixel_values"]
    pipeline = siglip2_jax.load(hf_dir)
    assert np.array_equal(pipeline.preprocess(images), reference_pixels.transpose(0, 2, 3, 1))
    source = siglip2_jax.ModelSource(hf_dir)   # what embed's workers and finetune's transform take theirs from
    from_embed = _preprocessor("image", source, None, None, None)
    assert from_embed == pipeline.preprocessor == source.preprocessor()
    with torch.no_grad():
        model = transformers.AutoModel.from_pretrained(hf_dir).eval()
        expected = model.get_image_features(pixel_values=torch.from_numpy(reference_pixels)).pooler_output.numpy()
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    cosine = (pipeline.encode_images(images) * expected).sum(-1)
    assert cosine.min() >= 1 - 1e-5, cosine
    # a bad value is refused before any weight is read, naming the file and field
    _write(hf_dir, {**HUB_FIXRES, "resample": 9, "size": {"height": 224, "width": 224}})
    with pytest.raises(ConfigError, match="resample"):
        siglip2_jax.load(hf_dir)


def test_search_by_image_uses_the_budget_out_was_embedded_with(tmp_path, tokenizer_model):
    """An image found in OUT by itself scores 1: the query gets OUT's NaFlex budget, not the default."""
    from conftest import hf_dir_for
    from siglip2_jax.checkpoint import convert
    from siglip2_jax.embed import embed
    from siglip2_jax.search import search
    from test_embed import write_photos

    convert(hf_dir_for(tmp_path, "siglip2-base-patch16-naflex", tokenizer_model), tmp_path / "ours")
    paths = write_photos(tmp_path / "photos", 3, seed=3)
    embed(tmp_path / "ours", tmp_path / "photos", tmp_path / "out", max_num_patches=64, batch_size=4,
          workers=0, progress=False)
    hits = search(tmp_path / "out", image=paths[1], top_k=1)  # the model and settings of OUT's manifest
    assert hits[0].path == paths[1] and hits[0].score == pytest.approx(1.0, abs=1e-5)
