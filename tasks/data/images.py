"""Image bytes -> the 28x28 gray pixels the model takes: one function for training and scoring.

Fashion-MNIST images are light garments on a black background, 28x28, gray.
Any other image is brought to look like that:

1. decoded (PNG, JPEG, BMP, GIF first frame, TIFF first page, WebP), EXIF
   orientation applied; its pixel count and longest side checked from the header
   before decoding (within them any shape is priced, a 2016x10 banner too); an image
   whose longest side is over ``WORK_SIDE`` is shrunk to it as it is decoded (JPEG: at
   a reduced DCT scale), before any padding, so memory follows the output, not the
   input's square;
2. transparency composited onto black, 16-bit and other modes to 8-bit gray;
3. inverted when its border is mostly light (a product photo on white), so
   the garment is light on dark as in the dataset;
4. padded to a square with the background (no distortion) and resized to 28x28.

A 28x28 gray image on a dark border, such as the dataset's own PNGs, passes
through unchanged.

Catalog models keep colour (mode ``rgb``): the same decoding rules (formats, EXIF,
pixel limit, transparency onto black), then RGB, padded to a square with the
border's median colour and resized to the model's ``input_size``.

``prepare(data, mode, size)`` is the one function training, evaluation and scoring
call; the mode and size come from the model's config (``preprocess``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 28
GRAY28 = "gray28"  # the demo: 28x28 gray, light garment on dark
RGB = "rgb"  # catalogs: colour, square, input_size x input_size
MODES = (GRAY28, RGB)
MAX_SIDE = 256  # catalog datasets store images with their longest side at most this
FORMATS = {"PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP"}
DEFAULT_MAX_PIXELS = 40_000_000  # refuse larger images instead of running out of memory
MAX_LONG_SIDE = 30_000  # refuse images with a longer side (from the header)
WORK_SIDE = 2048  # larger images are shrunk to this longest side before padding
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageRejected(ValueError):
    """The bytes cannot be priced; the message is the human-readable reason."""


def _to_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 gray, transparency composited onto black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        return ((arr - arr.min()) / span * 255.0 + 0.5).astype(np.uint8)
    im = _onto_black(im)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def fit_square(gray: np.ndarray) -> np.ndarray:
    """Light-on-dark, padded to a square, resized to 28x28."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:
        gray = 255 - gray
    h, w = gray.shape
    if (h, w) == (SIZE, SIZE):
        return gray
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = gray
    resized = Image.fromarray(square).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _decoded(data: bytes, max_pixels: int, convert) -> np.ndarray:
    """Open image bytes by the scoring rules and hand the first frame, EXIF-oriented,
    to ``convert``; raises ImageRejected with the reason."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not an image PIL can identify") from None
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"decompression bomb: {err}") from None
    except Exception as err:  # e.g. a JPEG cut inside its header: OSError from the plugin
        raise ImageRejected(f"not an image PIL can open: {type(err).__name__}: {err}") from None
    if im.format not in FORMATS:
        raise ImageRejected(f"unsupported format {im.format}")
    w, h = im.size
    if w * h > max_pixels:
        raise ImageRejected(
            f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )
    if w == 0 or h == 0:
        raise ImageRejected(f"empty image ({w}x{h})")
    if max(w, h) > MAX_LONG_SIDE:
        raise ImageRejected(
            f"too long: {w}x{h}, longest side {max(w, h)} > {MAX_LONG_SIDE} (MAX_LONG_SIDE)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.seek(0)  # first frame / page
            if max(w, h) <= WORK_SIDE:
                im.load()
                im = ImageOps.exif_transpose(im) or im
            else:
                im = _shrunk(im)
            return convert(im)
    except Exception as err:  # any plugin error (OSError, SyntaxError, MemoryError, ...)
        raise ImageRejected(
            f"truncated or corrupt {im.format}: {type(err).__name__}: {err}"
        ) from None


def _work_size(w: int, h: int) -> tuple[int, int]:
    scale = WORK_SIDE / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _shrunk(im: Image.Image) -> Image.Image:
    """A large image (longest side over ``WORK_SIDE``), decoded and shrunk to that
    longest side (aspect kept), then turned upright: at most the decoded image and the
    shrunk one are in memory at once, never a square of the longest side. Modes whose
    resampling would be nearest-neighbour (palette, bilevel) or whose transparency is a
    colour key are brought to L or RGBA first, as the conversions after do anyway."""
    orientation = im.getexif().get(0x0112)
    im.draft(None, _work_size(*im.size))  # JPEG: decode at 1/2 .. 1/8 scale, still >= target
    im.load()
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if max(im.size) > WORK_SIDE:
        im = im.resize(_work_size(*im.size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if orientation in _ORIENT:
        im = im.transpose(_ORIENT[orientation])
    return im


def to_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (28, 28); raises ImageRejected with the reason."""
    return _decoded(data, max_pixels, lambda im: fit_square(_to_gray(im)))


def _onto_black(im: Image.Image) -> Image.Image:
    """Palette and transparent images composited onto black; others as they are."""
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 RGB (h, w, 3), transparency composited onto black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_gray(im)
        return np.repeat(gray[..., None], 3, axis=-1)
    im = _onto_black(im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = MAX_SIDE):
    """Image bytes -> uint8 RGB (h, w, 3), the longest side at most ``max_side`` (aspect
    kept): how a catalog dataset stores its images. Raises ImageRejected."""

    def convert(im: Image.Image) -> np.ndarray:
        rgb = _to_rgb(im)
        h, w = rgb.shape[:2]
        if max(h, w) <= max_side:
            return rgb
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))

    return _decoded(data, max_pixels, convert)


def fit_square_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Padded to a square with the border's median colour, resized to size x size."""
    h, w = rgb.shape[:2]
    if (h, w) != (size, size):
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        side = max(h, w)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = np.median(border, axis=0).astype(np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = rgb
        if side != size:
            square = np.asarray(
                Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS)
            )
        rgb = square
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def prepare(
    data: bytes, mode: str = GRAY28, size: int = SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Image bytes -> what the model takes: gray28 (28, 28), or rgb (size, size, 3).
    The one preprocessing of training, evaluation and scoring; raises ImageRejected."""
    if mode == GRAY28:
        return to_pixels(data, max_pixels)
    if mode == RGB:
        return _decoded(data, max_pixels, lambda im: fit_square_rgb(_to_rgb(im), size))
    raise ValueError(f"unknown preprocessing mode {mode!r} (known: {', '.join(MODES)})")


def pixel_shape(mode: str, size: int) -> tuple[int, ...]:
    """The shape of one prepared image."""
    return (SIZE, SIZE) if mode == GRAY28 else (size, size, 3)


def model_input(images: np.ndarray) -> np.ndarray:
    """Prepared images as the model's input: gray gets its channel axis."""
    return images[..., None] if images.ndim == 3 else images


def encode_png_rgb(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def to_pixels_batch(blobs: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Many images that must all decode (the dataset's own shards)."""
    return np.stack([to_pixels(b, max_pixels) for b in blobs])


def prepare_batch(blobs: list[bytes], mode: str = GRAY28, size: int = SIZE) -> np.ndarray:
    """Many images that must all decode, prepared for a model of this mode and size."""
    return np.stack([prepare(b, mode, size) for b in blobs])
