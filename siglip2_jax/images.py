"""SigLIP 2 image preprocessing (numpy + PIL), bit-exact with transformers' PIL-backend processors.

`ImagePreprocessor` is the one object that turns images into the image tower's input. It holds settings only
(it pickles into data-loader workers) and is built from a checkpoint's processor config
(`ImagePreprocessor.from_dir`), so every pixel-changing field of `preprocessor_config.json` is honoured:

    load_image: decode, EXIF orientation, first frame, to RGB (transparency composited on white)
    resize:     PIL `resample` filter on uint8 RGB (`do_resize`), to `size` ignoring the aspect ratio (FixRes)
                or within a patch budget (NaFlex: `naflex_target_size(patch_size, max_num_patches)`)
    rescale:    x * rescale_factor in float64, then float32 (`do_rescale`)
    normalize:  (x - image_mean) / image_std in float32 (`do_normalize`)
    FixRes:     (n, S, S, 3) float32, NHWC
    NaFlex:     a NaFlexBatch: patches (n, max_num_patches, p*p*3) in (py, px, c) order, zero-padded, + mask
                + spatial shapes

The reference is transformers' `SiglipImageProcessorPil` (FixRes) and `Siglip2ImageProcessorPil` (NaFlex),
read from the same directory. Their torchvision backend and big_vision's TF resize differ slightly from
PIL; this module follows the PIL backend. Hub SigLIP 2 settings: resample 2 (bilinear), mean = std = 0.5,
rescale 1/255; SigLIP 1 repos use resample 3 (bicubic).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import ConfigError, VisionConfig
from .errors import first_line

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]

BILINEAR = Image.Resampling.BILINEAR  # SigLIP 2 hub configs: "resample": 2 (SigLIP 1 used bicubic)
IMAGE_MEAN = IMAGE_STD = 0.5


# the major brands of HEIF (HEIC photos, image sequences) and AVIF files
HEIF_BRANDS = {"heic", "heix", "hevc", "hevx", "heim", "heis", "hevm", "hevs", "mif1", "msf1", "avif", "avis"}


class ImageError(ValueError):
    """An input that is not a usable image. The message is one line: '<source>: <reason>'."""


# ------------------------------------------------------------------------------------------------ loading


def load_image(source: ImageSource, *, do_convert_rgb: bool | None = None) -> Image.Image:
    """Returns `source` as an RGB PIL image, decoded in full.

    `source` may be:
    - a path (str or Path) or the encoded bytes of an image file: decoded by PIL, first frame of an animated
      image, EXIF orientation applied (as transformers' `load_image` does);
    - a PIL image: its current frame, as it is (no EXIF rotation: an image already in memory is taken as the
      caller holds it, as transformers' processor takes it; `PIL.ImageOps.exif_transpose` it first to rotate);
    - a uint8 numpy array: (H, W) or (H, W, 1) grayscale, (H, W, 3) RGB, or (H, W, 4) RGBA. Float arrays are
      refused rather than guessed at (0-1 or 0-255?); convert with `(x * 255).round().astype(np.uint8)`.

    Every mode becomes RGB as transformers' `convert_to_rgb` does it: an image with an alpha band or a
    transparency key is composited onto white; anything else goes through PIL's `convert("RGB")` (16-bit
    and float images are clipped to 0-255 there, not scaled, exactly as in transformers).

    `do_convert_rgb` is a processor config's field: None (default, and the SigLIP 2 hub value) leaves RGB
    images as they are and converts the others (transformers could not run them unconverted); True
    converts every image with `to_rgb` (so an RGB image with a transparent colour key, as an RGB PNG with
    a tRNS chunk, is composited too, as in transformers); False refuses images that are not RGB.

    Raises `ImageError` for anything else: missing files, directories, dangling symlinks, empty, truncated or
    undecodable files, and images of more than twice `PIL.Image.MAX_IMAGE_PIXELS` pixels (decompression
    bombs; 179 million by default, the size past which PIL, hence transformers' processor, refuses too: the
    12000x9000 photo of a 108-megapixel phone decodes).
    Truncated files are never half-decoded: this refuses to run while `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`
    is set, because PIL would then fill in the missing part silently.
    """
    if isinstance(source, Image.Image):
        return _as_rgb(_decoded(source, "<PIL image>", exif_transpose=False), "<PIL image>", do_convert_rgb)
    if isinstance(source, np.ndarray):
        return _as_rgb(_image_from_array(source), "<array>", do_convert_rgb)
    if isinstance(source, (bytes, bytearray)):
        return _as_rgb(_decode(io.BytesIO(source), "<bytes>"), "<bytes>", do_convert_rgb)
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
            return _as_rgb(_decode(file, str(source)), str(source), do_convert_rgb)
    raise TypeError(f"cannot read an image from a {type(source).__name__}")


def _as_rgb(image: Image.Image, name: str, do_convert_rgb: bool | None) -> Image.Image:
    if image.mode == "RGB" and not do_convert_rgb:
        return image
    if do_convert_rgb is False:
        raise ImageError(f"{name}: a {image.mode} image, and the processor config sets do_convert_rgb false "
                         f"(only RGB images are accepted then)")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` makes it: transparency composited onto white (an RGB
    image with a transparent colour key, as an RGB PNG with a tRNS chunk, included)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(file, name: str) -> Image.Image:
    """Opens an encoded image, refusing decompression bombs before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # PIL warns between MAX_IMAGE_PIXELS and twice it: a big photo, decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)  # reads the header only
            image.seek(0)  # the first frame of an animated image
    except UnidentifiedImageError:
        brand = _iso_media_brand(file)
        if brand:  # an iPhone's HEIC photo is an image, just not one this Pillow can decode
            raise ImageError(f"{name}: a HEIF/AVIF file ({brand!r}) that this Pillow cannot decode (a HEIF "
                             f"plugin such as pillow-heif is not installed, or the file is damaged); convert it to "
                             f"JPEG or PNG") from None
        raise ImageError(f"{name}: not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as error:  # past twice MAX_IMAGE_PIXELS, from the header alone
        raise ImageError(f"{name}: too large, a decompression bomb? ({first_line(error)}; raise "
                         f"PIL.Image.MAX_IMAGE_PIXELS to accept it)") from None
    except Exception as error:  # PIL plugins raise many exception types on corrupt headers
        raise ImageError(f"{name}: cannot decode ({first_line(error)})") from None
    return _decoded(image, name)


def _iso_media_brand(file) -> str | None:
    """The major brand of an ISO base media file ('heic', 'avif', 'mif1'...: the HEIF family), else None."""
    file.seek(0)
    head = file.read(12)
    if head[4:8] == b"ftyp" and head[8:12].decode("ascii", "replace") in HEIF_BRANDS:
        return head[8:12].decode("ascii")
    return None


def _decoded(image: Image.Image, name: str, exif_transpose: bool = True) -> Image.Image:
    """Decodes all pixels now (PIL is lazy) and, if `exif_transpose`, applies the EXIF orientation; truncated
    data is refused."""
    if ImageFile.LOAD_TRUNCATED_IMAGES and getattr(image, "tile", None):  # PIL would fill in what is missing
        raise ImageError(f"{name}: refusing to decode while PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True")
    try:
        image.load()
        return ImageOps.exif_transpose(image) if exif_transpose else image
    except Exception as error:  # truncated data is an OSError; corrupt data can be anything
        raise ImageError(f"{name}: cannot decode ({first_line(error)})") from None


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


# ----------------------------------------------------------------------------------- shared pixel steps


def resize(image: Image.Image, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """PIL resize of an RGB image to (height, width) as uint8 HWC, aspect ratio not kept."""
    return np.asarray(image.resize((width, height), resample=resample))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] with the hub settings (rescale 1/255, mean = std = 0.5), bit-exact."""
    return ImagePreprocessor().rescale_and_normalize(pixels)


def _as_image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image or many: a 4-D array is a batch, a 2-D/3-D array or any other single source is one image."""
    if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


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


def patchify_image(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """numpy (H, W, C), one image -> (H/p * W/p, p*p*C): patches row-major over the image, each in (py, px, c)
    order (`siglip2_jax.model.vision.patchify_batch` is the same order for a jax batch)."""
    height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixels.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


# ------------------------------------------------------------------------------------ the NaFlex batch


class NaFlexBatch(NamedTuple):
    """The image tower's input for a NaFlex model: n images as patches in a fixed budget of N rows each.

    patches: float32 (n, N, p*p*3), (py, px, c) order inside a patch, zero rows after the real ones;
    mask: int32 (n, N), 1 for real patches (transformers' `pixel_attention_mask`);
    spatial_shapes: int32 (n, 2), (rows, columns) of patches per image.

    numpy arrays on the host, jax arrays inside the model. A NamedTuple is a pytree to `jax.tree` and
    `jit` without registration, so this module (which runs in data-loader workers) needs no jax.
    """

    patches: np.ndarray
    mask: np.ndarray
    spatial_shapes: np.ndarray

    def row(self, index: int) -> NaFlexBatch:
        """One image's input, without the batch axis: (N, p*p*3), (N,), (2,)."""
        return NaFlexBatch(self.patches[index], self.mask[index], self.spatial_shapes[index])

    def pad_rows(self, size: int) -> NaFlexBatch:
        """This batch of n images grown to `size` (>= n) with padding images (numpy): zero patches on a 1x1
        grid with one valid patch, never an empty 0x0 grid, whose position resize would divide by zero and
        whose attention would have no key at all."""
        count = len(self.mask)
        if count == size:
            return self

        def grow(x, fill):
            x = np.asarray(x)
            return np.concatenate([x, np.full((size - count, *x.shape[1:]), fill, x.dtype)])

        mask = grow(self.mask, 0)
        mask[count:, 0] = 1
        return NaFlexBatch(grow(self.patches, 0), mask, grow(self.spatial_shapes, 1))


# ------------------------------------------------------------------------------------ the preprocessor

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # transformers' order: nested first
RESAMPLE_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL ids
FIXRES_PROCESSORS = ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
NAFLEX_PROCESSORS = ("Siglip2ImageProcessor", "Siglip2ImageProcessorFast", "Siglip2ImageProcessorPil")
# The class defaults of transformers' SiglipImageProcessorPil / Siglip2ImageProcessorPil: what a field left
# out of (or null in) a processor config means there. Only resample and do_convert_rgb differ.
_HF_DEFAULTS = {
    False: dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), do_convert_rgb=True),
    True: dict(do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), do_convert_rgb=None, max_num_patches=256),
}
_NOT_IMPLEMENTED = ("do_center_crop", "do_pad")  # refused when true: SigLIP processors neither crop nor pad


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """Images (paths, bytes, PIL images, uint8 arrays) -> the image tower's input, exactly as transformers'
    PIL processor makes it from the same settings. Settings only: it pickles into worker processes.

    Build it with `from_dir(checkpoint_dir, vision_config)` (reads the checkpoint's processor config) or
    `for_model(vision_config)` (today's defaults: the hub SigLIP 2 settings). Calling it returns
    - FixRes: float32 (n, image_size, image_size, 3), NHWC;
    - NaFlex: a `NaFlexBatch` (patches float32 (n, max_num_patches, p*p*3), mask int32 (n, max_num_patches),
      spatial_shapes int32 (n, 2) = (rows, cols) of patches).
    Raises `ImageError` for an input it cannot use (one line naming it).

    Fields are the processor config's; `resample` is a PIL filter id (0 nearest, 1 lanczos, 2 bilinear,
    3 bicubic, 4 box, 5 hamming). `do_convert_rgb` as in `load_image`: true converts every image as
    transformers does; null (the SigLIP 2 hub value) leaves RGB images alone and converts the others,
    which transformers could not run; false refuses images that are not RGB.
    """

    naflex: bool = False
    image_size: int | None = 224        # FixRes: the square side images are resized to
    patch_size: int = 16
    max_num_patches: int | None = None  # NaFlex: the patch budget per image
    do_resize: bool = True
    resample: int = int(BILINEAR)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (IMAGE_MEAN,) * 3
    image_std: tuple[float, ...] = (IMAGE_STD,) * 3
    do_convert_rgb: bool | None = None

    def __post_init__(self):
        if self.naflex:
            if not _is_int(self.max_num_patches) or self.max_num_patches < 1:
                raise ConfigError(f"max_num_patches {self.max_num_patches!r}: must be a whole number of at least 1")
        elif not _is_int(self.image_size) or self.image_size < self.patch_size:
            raise ConfigError(f"image_size {self.image_size!r}: must be a whole number of at least the patch size "
                              f"{self.patch_size}")

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def for_model(cls, vision: VisionConfig, *, max_num_patches: int | None = None,
                  image_size: int | None = None) -> ImagePreprocessor:
        """The settings of a checkpoint without a processor config: hub SigLIP 2 (bilinear, 0.5, 1/255) at
        the model's own size (or `image_size`) / a budget of `max_num_patches` (default 256)."""
        if vision.naflex:
            _no_image_size_for_naflex(image_size)
            return cls(naflex=True, image_size=None, patch_size=vision.patch_size,
                       max_num_patches=256 if max_num_patches is None else max_num_patches)
        return cls(image_size=vision.image_size if image_size is None else image_size, patch_size=vision.patch_size)

    @classmethod
    def from_dir(cls, directory: str | Path, vision: VisionConfig, *, max_num_patches: int | None = None,
                 image_size: int | None = None) -> ImagePreprocessor:
        """The preprocessor of a checkpoint directory, read as transformers reads it: the "image_processor"
        object of `processor_config.json` if there is one, else `preprocessor_config.json`; neither:
        `for_model`. `max_num_patches` / `image_size` override the file's budget / size (`image_size` is
        for a FixRes model run at another resolution; see `siglip2_jax.load`).
        Raises ConfigError naming the file and field for a value that is not implemented."""
        settings, source = read_processor_config(directory)
        if settings is None:
            return cls.for_model(vision, max_num_patches=max_num_patches, image_size=image_size)
        return cls.from_config(settings, vision, max_num_patches=max_num_patches, image_size=image_size,
                               source=source)

    @classmethod
    def from_config(cls, settings: dict, vision: VisionConfig, *, max_num_patches: int | None = None,
                    image_size: int | None = None, source: str = "preprocessor_config.json") -> ImagePreprocessor:
        """From a processor config dict (HF layout), read as transformers' PIL processor reads it: a field
        left out takes the processor class's default (SiglipImageProcessor: bicubic!), a null is None
        (false for a flag; refused where transformers would fail on it). Except FixRes `size` and NaFlex `patch_size`: left out or null,
        they are the model's (transformers' 224 / 16 would not run another model)."""
        def fail(field, why):
            raise ConfigError(f"{source}: {field} {json.dumps(settings.get(field))}: {why}")

        kind = settings.get("image_processor_type")
        if kind is not None:
            if kind not in FIXRES_PROCESSORS + NAFLEX_PROCESSORS:
                fail("image_processor_type", "not implemented (only SigLIP's SiglipImageProcessor for FixRes "
                                             "and Siglip2ImageProcessor for NaFlex)")
            if (kind in NAFLEX_PROCESSORS) != vision.naflex:
                fail("image_processor_type", f"the model is a {'NaFlex' if vision.naflex else 'FixRes'} model")
        for field in _NOT_IMPLEMENTED:
            if settings.get(field):
                fail(field, "not implemented (SigLIP processors neither crop nor pad)")
        # A field left out takes the class default; a null is None to transformers: a false flag, or no
        # filter, mean, std or factor at all (which transformers then cannot run, so neither do we).
        value = {**_HF_DEFAULTS[vision.naflex], **settings}
        for field in ("do_resize", "do_rescale", "do_normalize"):
            value[field] = bool(value[field]) if value[field] is None else value[field]
            if not isinstance(value[field], bool):
                fail(field, "expected true or false")
        if value["do_convert_rgb"] is not None and not isinstance(value["do_convert_rgb"], bool):
            fail("do_convert_rgb", "expected true, false or null")
        if value["resample"] is None and not value["do_resize"]:
            value["resample"] = int(BILINEAR)  # unused
        if not _is_int(value["resample"]) or value["resample"] not in RESAMPLE_FILTERS:
            fail("resample", f"not a PIL filter id ({', '.join(f'{k} {v}' for k, v in RESAMPLE_FILTERS.items())})")
        if value["rescale_factor"] is None and not value["do_rescale"]:
            value["rescale_factor"] = 1 / 255  # unused
        if not _is_number(value["rescale_factor"]):
            fail("rescale_factor", "expected a number")
        for field in ("image_mean", "image_std"):
            if value[field] is None and not value["do_normalize"]:
                value[field] = 0.5  # unused
            numbers_ = value[field] if isinstance(value[field], (list, tuple)) else [value[field]] * 3
            if len(numbers_) != 3 or not all(_is_number(x) for x in numbers_):
                fail(field, "expected a number or a list of 3 numbers (R, G, B)")
            if field == "image_std" and any(x == 0 for x in numbers_):
                fail(field, "a standard deviation of 0")
            value[field] = tuple(numbers_)
        common = {k: value[k] for k in ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                                        "image_mean", "image_std", "do_convert_rgb")}
        if vision.naflex:
            _no_image_size_for_naflex(image_size)
            patch_size = settings.get("patch_size")
            if patch_size is not None and patch_size != vision.patch_size:
                fail("patch_size", f"the model's patches are {vision.patch_size} pixels")
            if max_num_patches is None:
                max_num_patches = value["max_num_patches"]
                if not _is_int(max_num_patches) or max_num_patches < 1:
                    fail("max_num_patches", "expected a whole number of at least 1")
            return cls(naflex=True, image_size=None, patch_size=vision.patch_size, max_num_patches=max_num_patches,
                       **common)
        size = settings.get("size")
        if size is not None:
            if not isinstance(size, dict) or set(size) != {"height", "width"}:
                fail("size", 'not implemented (only {"height": S, "width": S})')
            if size["height"] != size["width"] or not _is_int(size["height"]):
                fail("size", "not a square of whole pixels (FixRes models take square images)")
            if image_size is None and size["height"] != vision.image_size:
                fail("size", f"the model takes {vision.image_size}x{vision.image_size} images (pass "
                             f"image_size={size['height']}, or --image-size {size['height']} to a command, to run "
                             f"it at that size)")
        return cls(image_size=vision.image_size if image_size is None else image_size,
                   patch_size=vision.patch_size, **common)

    def to_config(self) -> dict:
        """These settings as a transformers processor config (the contents of preprocessor_config.json)."""
        config = {"image_processor_type": "Siglip2ImageProcessor" if self.naflex else "SiglipImageProcessor",
                  "processor_class": "Siglip2Processor" if self.naflex else "SiglipProcessor",
                  "do_resize": self.do_resize, "resample": self.resample, "do_rescale": self.do_rescale,
                  "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                  "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                  "do_convert_rgb": self.do_convert_rgb}
        if self.naflex:
            config.update(patch_size=self.patch_size, max_num_patches=self.max_num_patches)
        else:
            config.update(size={"height": self.image_size, "width": self.image_size})
        return config

    def save(self, directory: str | Path) -> None:
        """Writes `to_config()` as directory/preprocessor_config.json (and into the "image_processor" object
        of a processor_config.json there, which transformers would read first)."""
        directory = Path(directory)
        (directory / "preprocessor_config.json").write_text(json.dumps(self.to_config(), indent=2) + "\n")
        nested = directory / "processor_config.json"
        if nested.is_file():
            processor = json.loads(nested.read_text())
            if isinstance(processor, dict) and "image_processor" in processor:
                processor["image_processor"] = self.to_config()
                nested.write_text(json.dumps(processor, indent=2) + "\n")

    # ---------------------------------------------------------------------------------- processing

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray | NaFlexBatch:
        sources = _as_image_list(images)
        if not self.naflex:
            batch = [self.pixels(source) for source in sources]
            return np.stack(batch) if batch else np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        p, budget = self.patch_size, self.max_num_patches
        patches = np.zeros((len(sources), budget, p * p * 3), np.float32)
        mask = np.zeros((len(sources), budget), np.int32)
        spatial_shapes = np.zeros((len(sources), 2), np.int32)
        for i, source in enumerate(sources):
            pixels = self.pixels(source)
            image_patches = patchify_image(pixels, p)
            patches[i, : len(image_patches)] = image_patches
            mask[i, : len(image_patches)] = 1
            spatial_shapes[i] = (pixels.shape[0] // p, pixels.shape[1] // p)
        return NaFlexBatch(patches, mask, spatial_shapes)

    def one(self, source: ImageSource) -> np.ndarray | NaFlexBatch:
        """One image -> its input without the batch axis: FixRes (S, S, 3); NaFlex `NaFlexBatch.row`."""
        batch = self([source])
        return batch.row(0) if self.naflex else batch[0]

    def pixels(self, source: ImageSource) -> np.ndarray:
        """One image -> float32 (H, W, 3): decoded, resized, rescaled and normalized."""
        image = load_image(source, do_convert_rgb=self.do_convert_rgb)
        if self.do_resize:
            height, width = self.target_size(image.height, image.width)
            return self.rescale_and_normalize(resize(image, height, width, self.resample))
        name = source if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"
        p = self.patch_size
        if not self.naflex and (image.height, image.width) != (self.image_size, self.image_size):
            raise ImageError(f"{name}: is {image.width}x{image.height}; with do_resize false the processor "
                             f"config needs {self.image_size}x{self.image_size} images")
        if self.naflex and (image.height % p or image.width % p or (image.height // p) * (image.width // p) > self.max_num_patches):
            raise ImageError(f"{name}: is {image.width}x{image.height}; with do_resize false the processor config "
                             f"needs sides that are multiples of {p} and at most {self.max_num_patches} patches")
        return self.rescale_and_normalize(np.asarray(image))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if self.naflex:
            return naflex_target_size(height, width, self.patch_size, self.max_num_patches)
        return self.image_size, self.image_size

    def rescale_and_normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32, with transformers' exact operations and dtypes: the rescale in
        float64 then cast to float32; the normalization in float32 (integers are cast to float32 first)."""
        x = pixels
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.astype(np.float32, copy=False)  # neither: uint8 values, exact in float32


def read_processor_config(directory: str | Path) -> tuple[dict | None, str]:
    """(the image processor settings of a checkpoint directory, the file they came from), or (None, "")
    when it has none. Raises ConfigError for a file that is not a JSON object."""
    for name in PROCESSOR_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: unreadable ({first_line(error)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a JSON object")
        if name == "processor_config.json":
            if isinstance(data.get("image_processor"), dict):
                return data["image_processor"], str(path)
            continue
        return data, str(path)
    return None, ""


def _no_image_size_for_naflex(image_size) -> None:
    if image_size is not None:
        raise ConfigError(f"image_size={image_size}: only for FixRes models; NaFlex models take max_num_patches")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------- with the hub settings


def preprocess_fixres(
    images: ImageSource | Sequence[ImageSource], image_size: int, *, resample: int = BILINEAR
) -> np.ndarray:
    """Images -> float32 (n, image_size, image_size, 3), NHWC, in [-1, 1] (no crop, aspect ratio ignored),
    with the hub SigLIP 2 settings. `ImagePreprocessor` for any other."""
    return ImagePreprocessor(image_size=image_size, resample=int(resample))(images)


def preprocess_naflex(
    images: ImageSource | Sequence[ImageSource],
    patch_size: int = 16,
    max_num_patches: int = 256,
    *,
    resample: int = BILINEAR,
) -> NaFlexBatch:
    """Images -> a `NaFlexBatch` with the hub settings, each image resized to its own `naflex_target_size`:

    - patches: float32 (n, max_num_patches, patch_size * patch_size * 3), zero rows after the real ones;
    - mask: int32 (n, max_num_patches), 1 for real patches (transformers' `pixel_attention_mask`);
    - spatial_shapes: int32 (n, 2), (rows, columns) of patches per image.
    """
    return ImagePreprocessor(naflex=True, image_size=None, patch_size=patch_size, max_num_patches=max_num_patches,
                             resample=int(resample))(images)
