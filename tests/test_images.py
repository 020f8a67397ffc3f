"""siglip2_jax.images against transformers' PIL-backend SigLIP / SigLIP 2 image processors: bit-exact."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from conftest import png_header_only
from siglip2_jax.images import (
    ImageError,
    load_image,
    naflex_target_size,
    preprocess_fixres,
    preprocess_naflex,
)

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.siglip2.image_processing_pil_siglip2 import (  # noqa: E402
    get_image_size_for_max_num_patches as hf_target_size,
)

# Hub preprocessor_config.json settings of the SigLIP 2 checkpoints.
HUB_SETTINGS = dict(resample=2, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=None)  # fmt: skip

# (height, width): tiny, extreme aspect ratios, odd, exact fits, larger than the targets.
SIZES = [
    (1, 1), (3000, 4), (4, 3000), (2, 3), (5, 5), (7, 13), (15, 16), (16, 15), (31, 64), (64, 31), (100, 100),
    (123, 457), (224, 224), (255, 257), (256, 256), (383, 385), (384, 384), (480, 640), (640, 480), (333, 999),
    (999, 333), (1, 1000), (1000, 1), (768, 1024), (1080, 1920), (17, 4000),
]  # fmt: skip
NAFLEX_SIZES = SIZES + [(224, 1024), (1024, 224), (100, 3000), (47, 61), (512, 512), (720, 1280)]
NAFLEX_BUDGETS = [256, 576, 784, 1024]


def _random_images(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _hf_fixres(image_size: int, **overrides):
    settings = {**HUB_SETTINGS, "size": {"height": image_size, "width": image_size}, **overrides}
    return transformers.SiglipImageProcessorPil(**settings)


def _hf_naflex(max_num_patches: int, **overrides):
    settings = {**HUB_SETTINGS, "patch_size": 16, "max_num_patches": max_num_patches, **overrides}
    return transformers.Siglip2ImageProcessorPil(**settings)


# ------------------------------------------------------------------------------------------------ FixRes


@pytest.mark.parametrize("image_size", [224, 256, 384])
def test_fixres_bit_exact_with_transformers(image_size):
    arrays = _random_images(SIZES)
    # PIL images avoid transformers guessing the channel axis of tiny arrays such as (1, 1, 3).
    reference = _hf_fixres(image_size)([Image.fromarray(a) for a in arrays], return_tensors="np")["pixel_values"]
    ours = preprocess_fixres(arrays, image_size)
    assert ours.shape == (len(SIZES), image_size, image_size, 3) and ours.dtype == np.float32
    assert reference.dtype == np.float32
    assert np.abs(ours - reference.transpose(0, 2, 3, 1)).max() == 0
    assert ours.min() >= -1 and ours.max() <= 1


def test_fixres_parity_can_fail():
    # Bicubic (SigLIP 1's setting) instead of bilinear must show up, so the exact comparison means something.
    arrays = _random_images([(480, 640), (100, 3000)])
    reference = _hf_fixres(224)([Image.fromarray(a) for a in arrays], return_tensors="np")["pixel_values"]
    bicubic = preprocess_fixres(arrays, 224, resample=Image.Resampling.BICUBIC)
    assert np.abs(bicubic - reference.transpose(0, 2, 3, 1)).max() > 0.01
    # ... as must normalizing in float64 and casting once at the end (HF casts after the rescale).
    resized = np.asarray(Image.fromarray(arrays[0]).resize((224, 224), Image.Resampling.BILINEAR))
    all_float64 = ((resized / 255 - 0.5) / 0.5).astype(np.float32)
    assert np.abs(all_float64 - reference[0].transpose(1, 2, 0)).max() > 0


def test_fixres_accepts_every_kind_of_source(tmp_path):
    array = _random_images([(90, 120)])[0]
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path)
    expected = preprocess_fixres([array], 224)
    for source in [array, path, str(path), path.read_bytes(), Image.fromarray(array)]:
        assert np.array_equal(preprocess_fixres(source, 224), expected)  # a single source is a batch of one
    assert np.array_equal(preprocess_fixres(np.stack([array, array]), 224), np.concatenate([expected] * 2))
    assert preprocess_fixres([], 224).shape == (0, 224, 224, 3)


# ------------------------------------------------------------------------------------------------ NaFlex

SPEC_TARGET_SIZES = {  # SPEC.md section 4, patch 16, budget 256
    (224, 224): (256, 256),
    (1024, 1024): (256, 256),
    (224, 1024): (112, 512),
    (480, 640): (224, 288),
    (1080, 1920): (192, 336),
    (100, 3000): (48, 1360),
    (5, 5): (256, 256),
}


@pytest.mark.parametrize("size, target", SPEC_TARGET_SIZES.items())
def test_naflex_target_sizes_from_the_spec(size, target):
    assert naflex_target_size(*size, patch_size=16, max_num_patches=256) == target
    assert hf_target_size(*size, patch_size=16, max_num_patches=256) == target


def test_naflex_target_size_equals_transformers_everywhere():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        height, width = (int(v) for v in rng.integers(1, 6000, size=2))
        patch = int(rng.choice([14, 16, 32]))
        budget = int(rng.choice([64, 256, 576, 784, 1024, 4096]))
        ours = naflex_target_size(height, width, patch, budget)
        assert ours == hf_target_size(height, width, patch_size=patch, max_num_patches=budget)
        assert ours[0] % patch == 0 and ours[1] % patch == 0
        assert (ours[0] // patch) * (ours[1] // patch) <= budget or ours == (patch, patch)


@pytest.mark.parametrize("max_num_patches", NAFLEX_BUDGETS)
def test_naflex_bit_exact_with_transformers(max_num_patches):
    arrays = _random_images(NAFLEX_SIZES, seed=max_num_patches)
    reference = _hf_naflex(max_num_patches)([Image.fromarray(a) for a in arrays], return_tensors="np")
    ours = preprocess_naflex(arrays, patch_size=16, max_num_patches=max_num_patches)
    n = len(NAFLEX_SIZES)
    assert ours.patches.shape == (n, max_num_patches, 16 * 16 * 3) and ours.patches.dtype == np.float32
    assert ours.mask.shape == (n, max_num_patches) and ours.mask.dtype == np.int32
    assert ours.spatial_shapes.shape == (n, 2) and ours.spatial_shapes.dtype == np.int32
    assert np.abs(ours.patches - reference["pixel_values"]).max() == 0
    assert np.array_equal(ours.mask, reference["pixel_attention_mask"])
    assert np.array_equal(ours.spatial_shapes, reference["spatial_shapes"])
    # The mask counts exactly the real patches, and padding rows are zero.
    assert np.array_equal(ours.mask.sum(1), ours.spatial_shapes.prod(1))
    assert not ours.patches[ours.mask == 0].any()


def test_naflex_patch_layout_is_py_px_c():
    # One 32x48 image, no resize needed at budget 6: patch (r, c) holds pixels [16r:16r+16, 16c:16c+16].
    array = _random_images([(32, 48)])[0]
    out = preprocess_naflex(array, patch_size=16, max_num_patches=6)
    assert out.spatial_shapes.tolist() == [[2, 3]]
    pixels = (array.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    for r in range(2):
        for c in range(3):
            expected = pixels[16 * r : 16 * r + 16, 16 * c : 16 * c + 16].reshape(-1)
            assert np.array_equal(out.patches[0, 3 * r + c], expected)


def test_naflex_parity_can_fail():
    arrays = _random_images([(480, 640)])
    reference = _hf_naflex(256)([Image.fromarray(a) for a in arrays], return_tensors="np")["pixel_values"]
    bicubic = preprocess_naflex(arrays, resample=Image.Resampling.BICUBIC).patches
    assert np.abs(bicubic - reference).max() > 0.01


# ------------------------------------------------------------------------------------------- image modes


def _mode_images() -> dict[str, tuple[Image.Image, str]]:
    """name -> (image, file format) in every mode a decoder may hand us; 37 wide, 23 high."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))
    gray = rng.integers(0, 256, (23, 37), dtype=np.uint8)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 37).astype(np.uint8), (23, 1)))
    la = Image.merge("LA", [Image.fromarray(gray), alpha])
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    palette = rgb.quantize(16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    pa = Image.merge("PA", [palette, alpha])
    pa.putpalette(palette.getpalette())
    cmyk = Image.frombytes("CMYK", (37, 23), rng.integers(0, 256, 37 * 23 * 4, dtype=np.uint8).tobytes())
    return {
        "gray.png": (Image.fromarray(gray), "PNG"),
        "gray_alpha.png": (la, "PNG"),
        "palette.png": (palette, "PNG"),
        "palette_transparent.png": (palette_transparent, "PNG"),
        "palette_alpha.tif": (pa, "TIFF"),
        "rgba.png": (rgba, "PNG"),
        "cmyk.jpg": (cmyk, "JPEG"),
        "sixteen_bit.png": (Image.fromarray(rng.integers(0, 65536, (23, 37), dtype=np.uint16)), "PNG"),
        "int32.tif": (Image.fromarray(rng.integers(-100, 400, (23, 37), dtype=np.int32)), "TIFF"),
        "float.tif": (Image.fromarray(rng.uniform(-10, 300, (23, 37)).astype(np.float32)), "TIFF"),
        "bilevel.png": (Image.fromarray(gray > 127), "PNG"),
        "ycbcr.tif": (rgb.convert("YCbCr"), "TIFF"),
        "rgb.webp": (rgb, "WEBP"),
        "name with spaces é 猫.png": (rgb, "PNG"),
    }


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modes")
    files = {}
    for name, (image, file_format) in _mode_images().items():
        if file_format == "WEBP" and not features.check("webp"):
            continue
        image.save(root / name, file_format, **({"lossless": True} if file_format == "WEBP" else {}))
        files[name] = root / name
    return files


def test_mode_files_decode_in_the_mode_they_were_made(mode_files):
    # So the conversions below really start from each mode.
    modes = {name: Image.open(path).mode for name, path in mode_files.items()}
    assert {"L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"} <= set(modes.values())
    assert "transparency" in Image.open(mode_files["palette_transparent.png"]).info


def test_every_mode_becomes_rgb_as_transformers_converts_it(mode_files):
    for name, path in mode_files.items():
        ours = load_image(path)
        assert ours.mode == "RGB" and ours.size == (37, 23), name
        assert np.array_equal(np.asarray(ours), hf_convert_to_rgb(Image.open(path), return_numpy=True)), name


def test_every_mode_end_to_end_with_transformers_convert_rgb(mode_files):
    paths = list(mode_files.values())
    hf = _hf_fixres(224, do_convert_rgb=True)([Image.open(p) for p in paths], return_tensors="np")["pixel_values"]
    assert np.abs(preprocess_fixres(paths, 224) - hf.transpose(0, 2, 3, 1)).max() == 0


def test_transparency_is_composited_on_white(mode_files):
    rgba = Image.open(mode_files["rgba.png"])
    ours = np.asarray(load_image(rgba))
    assert np.array_equal(ours[:, 0], np.full((23, 3), 255))  # alpha 0 column: white, whatever the RGB was
    assert np.array_equal(ours[:, -1], np.asarray(rgba.convert("RGB"))[:, -1])  # alpha 255 column: unchanged
    # A 4-channel array is RGBA too, the same as transformers' numpy path.
    array = np.asarray(rgba)
    assert np.array_equal(np.asarray(load_image(array)), hf_convert_to_rgb(array, return_numpy=True))


def test_arrays_grayscale_and_refusals():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=-1))
    assert np.array_equal(np.asarray(load_image(gray[..., None])), np.asarray(load_image(gray)))
    with pytest.raises(ImageError, match="float32"):
        load_image(np.zeros((4, 4, 3), np.float32))  # 0-1 or 0-255? refused, not guessed
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(TypeError):
        load_image(42)


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    assert np.asarray(load_image(tmp_path / "dot.png")).tolist() == [[[10, 20, 30]]]
    assert preprocess_fixres(tmp_path / "dot.png", 224).shape == (1, 224, 224, 3)
    # NaFlex never scales up more than 100x: one pixel becomes 112 x 112 (7 x 7 patches), as in transformers.
    assert naflex_target_size(1, 1) == hf_target_size(1, 1, patch_size=16, max_num_patches=256) == (112, 112)
    assert preprocess_naflex(tmp_path / "dot.png").spatial_shapes.tolist() == [[7, 7]]


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(3)
    stored = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be turned 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    ours = load_image(tmp_path / "rotated.jpg")
    assert ours.size == (20, 40)  # now 20 wide, 40 high
    decoded = Image.open(tmp_path / "rotated.jpg").convert("RGB")
    assert decoded.size == (40, 20)
    assert np.array_equal(np.asarray(ours), np.asarray(decoded.transpose(Image.Transpose.ROTATE_270)))
    assert np.array_equal(np.asarray(ours), np.asarray(hf_load_image(str(tmp_path / "rotated.jpg"))))
    # An image already opened is taken as the caller holds it, as transformers' processor takes it.
    opened = Image.open(tmp_path / "rotated.jpg")
    assert np.array_equal(np.asarray(load_image(opened)), np.asarray(decoded))
    reference = _hf_fixres(32)([Image.open(tmp_path / "rotated.jpg")], return_tensors="np")["pixel_values"]
    assert np.array_equal(preprocess_fixres(opened, 32), reference.transpose(0, 2, 3, 1))
    hf_naflex = _hf_naflex(16)([Image.open(tmp_path / "rotated.jpg")], return_tensors="np")
    assert hf_naflex["spatial_shapes"].tolist() == [[3, 5]]  # still wider than high
    assert np.array_equal(preprocess_naflex(opened, max_num_patches=16).spatial_shapes, hf_naflex["spatial_shapes"])
    assert np.array_equal(np.asarray(load_image(ImageOps.exif_transpose(opened))), np.asarray(ours))


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    assert np.asarray(load_image(tmp_path / "anim.gif")).reshape(-1, 3).tolist() == [[255, 0, 0]] * 48


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp(mode_files):
    expected = np.asarray(_mode_images()["rgb.webp"][0])
    assert np.array_equal(np.asarray(load_image(mode_files["rgb.webp"])), expected)  # lossless


# ------------------------------------------------------------------------------------------ broken inputs


def _jpeg_bytes(size=(256, 256)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_random_images([size])[0]).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _assert_image_error(source, *expected_in_message: str):
    with pytest.raises(ImageError) as error:
        load_image(source)
    message = str(error.value)
    assert "\n" not in message, message
    for text in expected_in_message:
        assert text in message, message
    return message


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("notes.png", b"this is a text file, not a picture\n" * 10, "not an image"),
        ("noise.jpg", np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
        ("truncated.jpg", _jpeg_bytes()[:3000], "truncated"),
        ("truncated.png", None, "cannot decode"),
        ("bomb.png", png_header_only(100_000, 100_000), "decompression bomb"),
        # HEIC without a HEIF plugin (none is installed here): an image we cannot decode, not "not an image"
        ("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
         "a HEIF/AVIF file ('heic') that this Pillow cannot decode"),
    ],
)
def test_broken_files_raise_image_error_naming_the_file(tmp_path, name, content, reason):
    if content is None:  # a PNG cut in the middle of its pixel data
        buffer = io.BytesIO()
        Image.fromarray(_random_images([(200, 200)])[0]).save(buffer, "PNG")
        content = buffer.getvalue()[:20_000]
    (tmp_path / name).write_bytes(content)
    message = _assert_image_error(tmp_path / name, name, reason)
    assert message.startswith(str(tmp_path / name) + ": ")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on behind anyone's back


def test_broken_bytes_are_named_as_bytes():
    _assert_image_error(b"definitely not an image", "<bytes>", "not an image")
    _assert_image_error(_jpeg_bytes()[:3000], "<bytes>", "truncated")


def test_missing_directory_and_dangling_symlink(tmp_path):
    _assert_image_error(tmp_path / "missing.png", "missing.png", "no such file")
    (tmp_path / "album").mkdir()
    _assert_image_error(tmp_path / "album", "album", "directory")
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    _assert_image_error(tmp_path / "link.png", "link.png", "dangling symlink")
    with pytest.raises(ImageError, match="missing.png"):  # and through the batch functions
        preprocess_fixres([tmp_path / "missing.png"], 224)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_limit_is_pils(tmp_path, monkeypatch):
    """Refused past twice PIL.Image.MAX_IMAGE_PIXELS, where PIL (and so transformers' processor) refuses;
    between the two PIL only warns, and the image decodes without PIL's two lines of warning on stderr
    (by default: a 12000x9000 photo decodes, a 20000x10000 one is refused)."""
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")  # 1600 pixels
    Image.new("RGB", (50, 41)).save(tmp_path / "medium.png")  # 2050 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(tmp_path / "small.png").size == (40, 40)
    assert not caught, [str(w.message) for w in caught]
    _assert_image_error(tmp_path / "medium.png", "medium.png", "decompression bomb", "MAX_IMAGE_PIXELS")


def test_truncated_jpeg_refused_even_if_someone_allows_truncated_images(tmp_path, monkeypatch):
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:3000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _assert_image_error(tmp_path / "cut.jpg", "cut.jpg", "LOAD_TRUNCATED_IMAGES")
    assert load_image(Image.new("L", (3, 2))).size == (3, 2)  # images already in memory are fine


def test_naflex_padding_rows():
    """The engine's padding images for NaFlex: zero patches on a 1x1 grid with one valid patch (never 0x0);
    the real rows are untouched, and a full batch is returned as is."""
    batch = preprocess_naflex([np.full((32, 48, 3), 200, np.uint8)], 16, 8)
    padded = batch.pad_rows(4)
    assert padded.patches.shape == (4, 8, 16 * 16 * 3) and not padded.patches[1:].any()
    assert padded.spatial_shapes[1:].tolist() == [[1, 1]] * 3 and padded.mask[1:].tolist() == [[1] + [0] * 7] * 3
    assert all(np.array_equal(a, b) for a, b in zip(padded.row(0), batch.row(0)))
    assert all(x.dtype == y.dtype for x, y in zip(padded, batch)) and batch.pad_rows(1) is batch
