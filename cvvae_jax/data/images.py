"""Images in memory (the input pipeline): opening, converting any usable mode to 8-bit RGB, orienting, resizing.

Every mode Pillow reads that carries a picture is used, not skipped: grayscale (1, L, I;16, I), palette (P, PA),
alpha (LA, RGBA, PA, P with a transparent colour), CMYK, YCbCr, LAB, HSV. Alpha is composited on a **white**
background (`BACKGROUND`); 16-bit samples (I;16, I;16B, I;16L, and I holding 16-bit values, e.g. 16-bit
grayscale PNG) become 8-bit by rounding `v / 257` (so 0 -> 0, 65535 -> 255, 257 * k -> k exactly). 16-bit RGB
PNGs are reduced to 8 bits by Pillow's own reader. The EXIF orientation tag is applied
(`PIL.ImageOps.exif_transpose`), so sizes are those of the picture as it is meant to be seen. Frames come out
as uint8 RGB `[H, W, 3]`; every failure a user's file can cause is `media.BadInput(reason)`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from cvvae_jax.data.media import BadInput, ImageInfo

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
_RESAMPLE = Image.Resampling.BICUBIC
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_ORIENTATION_TAG = 0x0112


def open_image(data: bytes) -> Image.Image:
  """Opens an image lazily (header only) and checks that its mode can be converted to RGB.

  Raises:
    BadInput: empty, unreadable, or a mode without a picture to convert (e.g. float "F" data).
  """
  if not data:
    raise BadInput("empty file (0 bytes)")
  try:
    image = Image.open(io.BytesIO(data))
  except (OSError, Image.DecompressionBombError, ValueError) as e:
    raise BadInput(f"unreadable as image: {e}") from None
  if image.mode == "F" or image.mode.startswith("I;32") or image.mode in ("BGR;15", "BGR;16", "BGR;24"):
    raise BadInput(f"image mode {image.mode!r} cannot be converted to RGB (expected a grayscale, palette, "
                   "RGB(A), CMYK or 16-bit integer image)")
  return image


def _orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(_ORIENTATION_TAG, 1))
  except (OSError, ValueError, SyntaxError, TypeError):
    return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) of an image opened by `open_image`, after its EXIF orientation is applied."""
  w, h = image.size
  return (w, h) if _orientation(image) in _SWAPPED_ORIENTATIONS else (h, w)


def to_rgb(image: Image.Image) -> Image.Image:
  """A loaded image of any supported mode -> 8-bit RGB (alpha over `BACKGROUND`, 16 bits by round(v / 257))."""
  if image.mode == "RGB":
    return image
  if image.mode in _SIXTEEN_BIT:
    values = np.asarray(image).astype(np.int64)
    gray = np.clip((values + 128) // 257, 0, 255).astype(np.uint8)  # round(v / 257), halves never occur
    return Image.fromarray(gray, "L").convert("RGB")
  if image.mode == "P" and "transparency" in image.info or image.mode in _ALPHA:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def load_image(image: Image.Image, height: int, width: int) -> np.ndarray:
  """Decodes an image opened by `open_image`, orients, converts and resizes it to `height` x `width`.

  JPEGs are decoded at a reduced DCT scale when that still covers the target size (Pillow `draft`).

  Returns:
    uint8 `[height, width, 3]`, RGB.
  Raises:
    BadInput: truncated or corrupt data.
  """
  try:
    orientation = _orientation(image)
    swapped = orientation in _SWAPPED_ORIENTATIONS
    image.draft("RGB", (height, width) if swapped else (width, height))
    image.load()
    image = to_rgb(ImageOps.exif_transpose(image) if orientation != 1 else image)
    if image.size != (width, height):
      image = image.resize((width, height), _RESAMPLE)
    return np.asarray(image, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInput(f"truncated or corrupt image: {e}") from None


def probe_image(data: bytes) -> ImageInfo:
  """Opens and fully decodes an image to check it; the size is the oriented one."""
  image = open_image(data)
  height, width = oriented_size(image)
  try:
    image.load()
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInput(f"truncated or corrupt image: {e}") from None
  return ImageInfo(height=height, width=width)
