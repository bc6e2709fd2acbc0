"""Uploaded image bytes -> the model's input, with every way an upload can be wrong named.

numpy and Pillow only. The pixel rule is the training one (`cifarlab.constants`): RGB, 32x32,
(pixel / 255 - MEAN) / STD, channels first. How an upload becomes 32x32 RGB:

- formats: PNG, JPEG, WebP, BMP, GIF (told apart by their bytes, not by the file name or the
  declared content type); anything else is refused with 415;
- size: the central square crop, then a resize to 32x32 with `RESIZE_FILTER` (a 32x32 upload is
  used as it is); EXIF orientation is applied first, as a camera's viewer would;
- colour: grayscale, palette, CMYK and 1-bit images are converted to RGB; 16-bit images keep
  their top 8 bits; transparent pixels are flattened onto white;
- animations and multi-frame files: the first frame is classified (the answer says how many
  frames there were);
- limits, checked on the header before any pixel is decoded: at most `max_pixels` pixels
  (413 otherwise), so a small file that would expand to gigabytes is never decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from cifarlab.constants import IMAGE_SIZE, MEAN, RESIZE_FILTER, STD

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# Pillow names some variants of the accepted formats differently.
_FORMAT_ALIASES = {"MPO": "JPEG"}  # phone cameras' multi-picture JPEG
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a 48 MP phone photo at 4:3 is 8000x6000 = 48 MP
_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
# A PNG's compressed text and ICC chunks are expanded while it is opened: keep that small
# (Pillow's defaults allow 64 MB). Text is never needed here; an upload over these is refused.
PngImagePlugin.MAX_TEXT_CHUNK = 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024
_MEAN = np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
_STD = np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)


class ImageRejected(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid_image"):
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Decoded:
    """One upload as 32x32 RGB uint8 pixels, with what it was."""

    pixels: np.ndarray  # (32, 32, 3) uint8
    format: str
    width: int
    height: int
    mode: str
    frames: int


def decode_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Bytes of one uploaded file -> `Decoded`; raises `ImageRejected` naming the problem."""
    return finish_decode(open_image(data, max_pixels))


# Up to this many pixels (and a single frame), decoding takes well under a millisecond: the
# service does it on its event loop. Anything bigger goes to a decoding thread.
INLINE_PIXELS = 128 * 128


def is_cheap(img: Image.Image) -> bool:
    """Whether decoding this opened image is cheap, judged by its header (never by its byte
    size: a 4 KB palette PNG can hold 36 megapixels). A GIF's frame count is not in its header
    and counting means reading the file, so GIFs are never taken as cheap."""
    width, height = img.size
    return (
        width * height <= INLINE_PIXELS and img.format != "GIF" and getattr(img, "n_frames", 1) == 1
    )


def open_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an upload's header: format and size checked, no pixel decoded yet."""
    if not data:
        raise ImageRejected("the uploaded file is empty (0 bytes)", reason="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)  # reads the header only
    except UnidentifiedImageError:
        claimed = _sniff(data)
        if claimed:
            raise ImageRejected(
                f"the file starts like a {claimed} but is truncated or corrupt ({len(data)} bytes)",
                reason="corrupt",
            ) from None
        raise ImageRejected(
            f"the upload is not an image Pillow can identify ({len(data)} bytes, starting "
            f"{data[:8]!r}); send one of {', '.join(ACCEPTED_FORMATS)}",
            status=415,
            reason="not_an_image",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            f"the image is over the limit of {max_pixels / 1e6:.1f} megapixels "
            f"({exc}); it was not decoded",
            status=413,
            reason="too_many_pixels",
        ) from None
    except Exception as exc:  # a header so broken that Pillow fails while identifying it
        raise ImageRejected(f"the image header is corrupt: {exc}", reason="corrupt") from None
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
    if fmt not in ACCEPTED_FORMATS:
        img.close()
        raise ImageRejected(
            f"image format {fmt} is not accepted; send one of {', '.join(ACCEPTED_FORMATS)}",
            status=415,
            reason="unsupported_format",
        )
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise ImageRejected(f"the image has no pixels ({width}x{height})", reason="corrupt")
    if width * height > max_pixels:
        img.close()
        raise ImageRejected(
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"limit of {max_pixels / 1e6:.1f} megapixels; it was not decoded",
            status=413,
            reason="too_many_pixels",
        )
    return img


def finish_decode(img: Image.Image) -> Decoded:
    """An image from `open_image` -> its 32x32 RGB pixels (the costly part)."""
    with img:
        fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
        width, height = img.size
        mode = img.mode
        try:
            # Counting frames walks the whole file: a truncated animation fails here.
            frames = getattr(img, "n_frames", 1)
            img.seek(0)
            if fmt == "JPEG" and min(width, height) > 4 * IMAGE_SIZE:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster, still >= 2x the target.
                img.draft("RGB", (2 * IMAGE_SIZE, 2 * IMAGE_SIZE))
            img.load()  # frame 0 of an animation
            rgb = _to_rgb(ImageOps.exif_transpose(img))
            pixels = np.asarray(_square_resize(rgb), dtype=np.uint8)
        except ImageRejected:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError,
            # ValueError, EOFError, but also IndexError or struct.error on cut-off frames
            raise ImageRejected(
                f"the {fmt} data is truncated or corrupt: {type(exc).__name__}: {exc}",
                reason="corrupt",
            ) from None
    return Decoded(pixels, fmt, width, height, mode, frames)


def _sniff(data: bytes | bytearray) -> str | None:
    """The accepted format these bytes start like, if any (signatures only)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, by the rules in the module docstring."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PNG opens as I;16 or I): keep the top 8 bits.
        values = np.asarray(img).astype(np.int64)
        img = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _square_resize(img: Image.Image) -> Image.Image:
    """Central square crop, then resize to IMAGE_SIZE; a 32x32 image is returned unchanged."""
    w, h = img.size
    if (w, h) == (IMAGE_SIZE, IMAGE_SIZE):
        return img
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize(
        (IMAGE_SIZE, IMAGE_SIZE), _FILTERS[RESIZE_FILTER], box=(left, top, left + side, top + side)
    )


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) or (32, 32, 3) -> normalised float32 (N, 3, 32, 32), as in training."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((x - _MEAN) / _STD, dtype=np.float32)
