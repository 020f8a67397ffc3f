"""SigLIP 2 image preprocessing (numpy + PIL), bit-exact with transformers' PIL-backend processors.

Both families share every step but the last:

    load_image: decode, EXIF orientation, first frame, to RGB (transparency composited on white)
    resize:     PIL bilinear on uint8 RGB, to a size that ignores the aspect ratio (FixRes: S x S) or keeps
                it within a patch budget (NaFlex: `naflex_target_size`)
    normalize:  x * (1/255) in float64, then float32, then (x - 0.5) / 0.5 in float32 -> [-1, 1]
    FixRes:     (n, S, S, 3) float32, NHWC
    NaFlex:     patches (n, max_num_patches, p*p*3) in (py, px, c) order, zero-padded, + mask + spatial shapes

The reference is transformers' `SiglipImageProcessorPil` (FixRes hub settings: resample=2 BILINEAR, mean and
std 0.5) and `Siglip2ImageProcessorPil` (NaFlex). Their torchvision backend and big_vision's TF resize differ
slightly from PIL; this module follows the PIL backend.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]

BILINEAR = Image.Resampling.BILINEAR  # SigLIP 2 hub configs: "resample": 2 (SigLIP 1 used bicubic)
IMAGE_MEAN = IMAGE_STD = 0.5


class ImageError(ValueError):
    """An input that is not a usable image. The message is one line: '<source>: <reason>'."""


# ------------------------------------------------------------------------------------------------ loading


def load_image(source: ImageSource) -> Image.Image:
    """Returns `source` as an RGB PIL image, decoded in full.

    `source` may be:
    - a path (str or Path) or the encoded bytes of an image file: decoded by PIL, first frame of an animated
      image, EXIF orientation applied (as transformers' `load_image` does);
    - a PIL image: its current frame, EXIF orientation applied;
    - a uint8 numpy array: (H, W) or (H, W, 1) grayscale, (H, W, 3) RGB, or (H, W, 4) RGBA. Float arrays are
      refused rather than guessed at (0-1 or 0-255?); convert with `(x * 255).round().astype(np.uint8)`.

    Every mode becomes RGB as transformers' `convert_to_rgb` does it: an image with an alpha band or a
    transparency key is composited onto white; anything else goes through PIL's `convert("RGB")` (16-bit
    and float images are clipped to 0-255 there, not scaled, exactly as in transformers).

    Raises `ImageError` for anything else: missing files, directories, dangling symlinks, empty, truncated or
    undecodable files, and images larger than `PIL.Image.MAX_IMAGE_PIXELS` (decompression bombs).
    Truncated files are never half-decoded: this refuses to run while `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`
    is set, because PIL would then fill in the missing part silently.
    """
    if isinstance(source, Image.Image):
        return to_rgb(_decoded(source, "<PIL image>"))
    if isinstance(source, np.ndarray):
        return to_rgb(_image_from_array(source))
    if isinstance(source, (bytes, bytearray)):
        return to_rgb(_decode(io.BytesIO(source), "<bytes>"))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"{source}: is a directory, not an image")
        if not path.is_file():
            raise ImageError(f"{source}: {'dangling symlink' if path.is_symlink() else 'no such file'}")
        if path.stat().st_size == 0:
            raise ImageError(f"{source}: empty file")
        try:
            file = open(path, "rb")
        except OSError as error:
            raise ImageError(f"{source}: cannot read ({error.strerror or error})") from None
        with file:
            return to_rgb(_decode(file, str(source)))
    raise TypeError(f"cannot read an image from a {type(source).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` makes it: transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _decode(file, name: str) -> Image.Image:
    """Opens an encoded image, refusing decompression bombs before any pixel is decoded."""
    try:
        image = Image.open(file)  # reads the header only
        image.seek(0)  # the first frame of an animated image
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as error:  # PIL's own limit, twice MAX_IMAGE_PIXELS
        raise ImageError(f"{name}: too large, a decompression bomb? ({_first_line(error)})") from None
    except Exception as error:  # PIL plugins raise many exception types on corrupt headers
        raise ImageError(f"{name}: cannot decode ({_first_line(error)})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ImageError(
            f"{name}: too large, a decompression bomb? ({image.width}x{image.height} pixels, "
            f"more than PIL.Image.MAX_IMAGE_PIXELS = {limit})"
        )
    return _decoded(image, name)


def _decoded(image: Image.Image, name: str) -> Image.Image:
    """Decodes all pixels now (PIL is lazy) and applies the EXIF orientation; truncated data is refused."""
    if ImageFile.LOAD_TRUNCATED_IMAGES and getattr(image, "tile", None):  # PIL would fill in what is missing
        raise ImageError(f"{name}: refusing to decode while PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:  # truncated data is an OSError; corrupt data can be anything
        raise ImageError(f"{name}: cannot decode ({_first_line(error)})") from None


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"<array>: dtype {array.dtype} is not accepted; pass uint8 values 0-255")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    modes = {3: "RGB", 4: "RGBA"}
    mode = "L" if array.ndim == 2 else modes.get(array.shape[-1]) if array.ndim == 3 else None
    if mode is None or 0 in array.shape:
        raise ImageError(f"<array>: shape {array.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    return Image.fromarray(np.ascontiguousarray(array), mode)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------- shared pixel steps


def resize(image: Image.Image, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """PIL resize of an RGB image to (height, width) as uint8 HWC, aspect ratio not kept."""
    return np.asarray(image.resize((width, height), resample=resample))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], with transformers' exact operations and dtypes (bit-exact)."""
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale: float64, then down
    mean = np.array([IMAGE_MEAN] * 3, dtype=np.float32)
    std = np.array([IMAGE_STD] * 3, dtype=np.float32)
    return (scaled - mean) / std  # normalize: in float32


def _as_image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image or many: a 4-D array is a batch, a 2-D/3-D array or any other single source is one image."""
    if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


# ------------------------------------------------------------------------------------------------ FixRes


def preprocess_fixres(
    images: ImageSource | Sequence[ImageSource], image_size: int, *, resample: int = BILINEAR
) -> np.ndarray:
    """Images -> float32 (n, image_size, image_size, 3), NHWC, in [-1, 1] (no crop, aspect ratio ignored)."""
    batch = [normalize(resize(load_image(image), image_size, image_size, resample)) for image in _as_image_list(images)]
    return np.stack(batch) if batch else np.zeros((0, image_size, image_size, 3), np.float32)


# ------------------------------------------------------------------------------------------------ NaFlex


def naflex_target_size(height: int, width: int, patch_size: int = 16, max_num_patches: int = 256) -> tuple[int, int]:
    """The (height, width) NaFlex resizes an image to: multiples of `patch_size`, at least one patch each
    way, aspect ratio kept as well as the budget of `max_num_patches` patches allows.

    A binary search for the largest scale that fits the budget, with transformers' exact float arithmetic
    (`get_image_size_for_max_num_patches`), so that borderline sizes round the same way.
    """

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    eps = 1e-5
    low, high = eps / 10, 100.0  # eps / 10 is 1.0000000000000002e-06, as in transformers
    while high - low >= eps:
        scale = (low + high) / 2
        if (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def patchify(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p*p*C): patches row-major over the image, each in (py, px, c) order."""
    height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixels.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


def preprocess_naflex(
    images: ImageSource | Sequence[ImageSource],
    patch_size: int = 16,
    max_num_patches: int = 256,
    *,
    resample: int = BILINEAR,
) -> dict[str, np.ndarray]:
    """Images -> NaFlex inputs, each image resized to its own `naflex_target_size`:

    - patches: float32 (n, max_num_patches, patch_size * patch_size * 3), zero rows after the real ones;
    - mask: int32 (n, max_num_patches), 1 for real patches (transformers' `pixel_attention_mask`);
    - spatial_shapes: int32 (n, 2), (rows, columns) of patches per image.
    """
    sources = _as_image_list(images)
    patches = np.zeros((len(sources), max_num_patches, patch_size * patch_size * 3), np.float32)
    mask = np.zeros((len(sources), max_num_patches), np.int32)
    spatial_shapes = np.zeros((len(sources), 2), np.int32)
    for i, source in enumerate(sources):
        image = load_image(source)
        height, width = naflex_target_size(image.height, image.width, patch_size, max_num_patches)
        image_patches = patchify(normalize(resize(image, height, width, resample)), patch_size)
        patches[i, : len(image_patches)] = image_patches
        mask[i, : len(image_patches)] = 1
        spatial_shapes[i] = (height // patch_size, width // patch_size)
    return dict(patches=patches, mask=mask, spatial_shapes=spatial_shapes)
