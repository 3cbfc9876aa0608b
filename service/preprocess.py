"""Image decoding and eval preprocessing, built from a manifest's :class:`Preprocess`.

One function for everyone: fine-tune evaluation, the server and the TorchServe handler all
call :func:`preprocess_image` so the same image gives the same tensor everywhere.
NumPy and Pillow only, so an ONNX-only server never imports torch.

    array = preprocess_bytes(jpeg_bytes, manifest.preprocess)   # float32 (3, H, W)
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge
from service.manifest import Preprocess

DEFAULT_MAX_PIXELS = 40_000_000  # about 6300x6300: larger is treated as a decompression bomb
_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
MAX_RESIZED_PIXELS = 16_000_000  # above it, resize_and_crop resizes only the region its crop keeps
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's pool of freed image memory (its "block allocator"): off by default, so every image
# buffer is a fresh allocation the kernel must page in. Reusing up to 32 blocks of at most 1 MiB
# (32 MiB held at most) makes decode + preprocess of a 256 px JPEG 2-2.5x faster here. The GIL
# guards the pool. PILLOW_BLOCKS_MAX / PILLOW_BLOCK_SIZE in the environment win.
IMAGE_BLOCKS_CACHED = 32
IMAGE_BLOCK_SIZE = 1 << 20


def reuse_image_memory(blocks: int = IMAGE_BLOCKS_CACHED, block_size: int = IMAGE_BLOCK_SIZE) -> None:
    """Let Pillow keep freed image memory for the next image, unless its environment variables say otherwise."""
    if "PILLOW_BLOCK_SIZE" not in os.environ:
        Image.core.set_block_size(block_size)  # type: ignore[attr-defined]
    if "PILLOW_BLOCKS_MAX" not in os.environ:
        Image.core.set_blocks_max(blocks)  # type: ignore[attr-defined]


reuse_image_memory()


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit to ``max_pixels`` where it is lower.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` (89 Mpx) and refuses above twice that, before
    :func:`decode_image` applies its own cap; a process whose cap is higher calls this once at start.
    The limit is process-wide, and only ever raised here.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def draft_size(spec: Preprocess) -> int:
    """The shorter side a JPEG may be decoded down to for ``spec`` (0: decode it whole)."""
    return spec.resize if spec.jpeg_draft else 0


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image", draft_to: int = 0
) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image.

    ``draft_to`` > 0: a JPEG whose shorter side is at least twice that is decoded by libjpeg at 1/2,
    1/4 or 1/8 scale (DCT scaling), keeping the shorter side at ``draft_to`` or more: a 12 MP photo
    decodes about 3x faster, and the resize that follows sees nearly the same pixels.
    Raises InvalidInput naming ``source`` for empty, truncated or non-image data and
    PayloadTooLarge for images over ``max_pixels`` (checked before pixels are decoded) or over
    Pillow's own limit (see :func:`allow_pixels`). No warning filters are touched: they are
    process-wide, and this runs on many threads at once.
    """
    if not data:
        raise InvalidInput(f"{source}: empty image data")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        _check_size(image, max_pixels, source)
        if draft_to > 0 and image.format == "JPEG":
            _draft(image, draft_to)
        image.load()
        return to_rgb(image)  # inside: a damaged EXIF block fails here, in exif_transpose
    except (PayloadTooLarge, InvalidInput):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{source}: image too large to decode ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"{source}: not a recognised image (JPEG, PNG, WebP, BMP, GIF, TIFF)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Warning) as exc:  # Warning: where warnings are errors
        raise InvalidInput(f"{source}: corrupt or truncated image ({exc})") from exc


def _draft(image: Image.Image, short_side: int) -> None:
    width, height = image.size
    short = min(width, height)
    if short >= 2 * short_side:
        scale = short_side / short
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _check_size(image: Image.Image, max_pixels: int, source: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput(f"{source}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{source}: {width}x{height} pixels is over the limit of {max_pixels}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled.

    May return ``image`` itself when it is already an upright RGB image.
    """
    image.load()  # a PNG's eXIf chunk may follow its pixels
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_and_crop(image: Image.Image, spec: Preprocess) -> Image.Image:
    """Resize the shorter side to ``spec.resize`` (aspect kept), then center-crop ``spec.crop``.

    Matches torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images. An extreme aspect ratio
    (a 1x4000 strip resizes to 182x728000) resizes only the region the crop keeps, within a few
    levels of the full resize: resizing all of it would cost gigabytes for a few bytes of PNG.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    left = round((size[0] - spec.crop) / 2.0)
    top = round((size[1] - spec.crop) / 2.0)
    if size[0] * size[1] > MAX_RESIZED_PIXELS:
        scale_x, scale_y = width / size[0], height / size[1]
        box = (left * scale_x, top * scale_y, (left + spec.crop) * scale_x, (top + spec.crop) * scale_y)
        return image.resize((spec.crop, spec.crop), _RESAMPLING[spec.interpolation], box=box)
    if size != image.size:
        image = image.resize(size, _RESAMPLING[spec.interpolation])
    return image.crop((left, top, left + spec.crop, top + spec.crop))


def normalize(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB image -> float32 CHW array, scaled to [0,1] and normalized (see :func:`normalize_array`)."""
    return normalize_array(np.asarray(image), spec)


def normalize_array(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """RGB uint8 HWC array -> float32 CHW array, scaled to [0,1] and normalized.

    Channel-planar arithmetic on a contiguous CHW copy: the same float32 operations as
    ``(x / 255 - mean) / std`` on HWC (bit-identical results), about 10x faster than broadcasting
    over a last axis of 3. A package's parity images are stored as such uint8 arrays.
    """
    planes = pixels.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    if spec.channel_order == "BGR":
        planes, mean, std = planes[::-1], mean[::-1], std[::-1]
    array = np.ascontiguousarray(planes).astype(np.float32)
    array *= np.float32(1.0 / 255.0)
    array -= mean[:, None, None]
    array /= std[:, None, None]
    return array


def crop_pixels(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """PIL image (any mode) -> the uint8 (crop, crop, 3) RGB pixels the model sees, before normalization."""
    return np.asarray(resize_and_crop(to_rgb(image), spec))


def preprocess_image(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """PIL image (any mode) -> float32 (3, crop, crop) array ready for the model."""
    return normalize_array(crop_pixels(image, spec), spec)


def preprocess_bytes(
    data: bytes, spec: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image"
) -> np.ndarray:
    """Encoded image bytes -> float32 (3, crop, crop) array (a large JPEG in draft mode where ``spec`` says so)."""
    rgb = decode_image(data, max_pixels=max_pixels, source=source, draft_to=draft_size(spec))  # upright RGB
    return normalize(resize_and_crop(rgb, spec), spec)
