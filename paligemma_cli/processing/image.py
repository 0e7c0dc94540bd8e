"""Reading images and turning them into PaliGemma's pixel tensor.

References: transformers' `SiglipImageProcessorPil` (PIL bicubic resize, rescale 1/255, normalise
mean = std = 0.5) and `image_transforms.convert_to_rgb`, whose handling of transparency (composite
onto white) we copy. big_vision trained with bilinear+antialias
resizing; transformers and this package use PIL bicubic.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from paligemma_cli.errors import PaliGemmaError

MAX_PIXELS_ENV = "PALIGEMMA_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 128_000_000  # above a 108 MP phone photo; a 20000 x 20000 "decompression bomb" is refused
MAX_FILE_BYTES = 1 << 30  # an image file (or stdin) larger than this is refused before it is read whole


def max_pixels() -> int:
    """The largest image, in pixels, the tool decodes: `$PALIGEMMA_MAX_PIXELS`, else the default."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit < 1:
        raise PaliGemmaError(f"{MAX_PIXELS_ENV} must be a positive number of pixels, got {value!r}")
    return limit


def load_image(source: str | Path | bytes) -> Image.Image:
    """Read an image into an upright RGB PIL image.

    Args:
        source: a path, the encoded bytes of a file, or "-" for the bytes on stdin. Any format
            Pillow reads (JPEG, PNG, WebP, GIF, TIFF, BMP, ...).

    Returns:
        An RGB image with its EXIF orientation applied.

    Raises:
        PaliGemmaError: "cannot read image 'x.jpg': ..." when the file is missing, not an image, corrupt,
            larger than `max_pixels()` pixels (checked on the header, before decoding) or than
            `MAX_FILE_BYTES` bytes.
    """
    if isinstance(source, bytes):
        name, data = "<bytes>", source
    elif str(source) == "-":
        name, data = "<stdin>", sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    else:
        name = os.fsdecode(source).encode("utf-8", "backslashreplace").decode("utf-8")  # printable
        try:
            if Path(source).stat().st_size > MAX_FILE_BYTES:
                raise PaliGemmaError(f"cannot read image '{name}': larger than {MAX_FILE_BYTES >> 20} MB")
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise PaliGemmaError(f"cannot read image '{name}': no such file") from None
        except IsADirectoryError:
            raise PaliGemmaError(f"cannot read image '{name}': it is a folder") from None
        except OSError as e:
            raise PaliGemmaError(f"cannot read image '{name}': {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PaliGemmaError(f"cannot read image '{name}': larger than {MAX_FILE_BYTES >> 20} MB")
    limit = max_pixels()
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check (a warning at ~89 MP, an error at twice that) is replaced by ours, on the
            # size read from the header, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            width, height = image.size
            if width * height > limit:
                raise Image.DecompressionBombError(f"{width} x {height} = {width * height / 1e6:.0f} MP")
            image.load()  # Image.open is lazy: decode now so a truncated file fails here
        # Phones store pixels sideways and record the rotation in EXIF; the model must see it upright.
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise PaliGemmaError(f"cannot read image '{name}': too large ({e}; the limit is {limit / 1e6:.0f} MP, "
                             f"raise it with {MAX_PIXELS_ENV})") from None
    except UnidentifiedImageError:
        reason = "empty input" if not data else "not an image format Pillow can read"
        raise PaliGemmaError(f"cannot read image '{name}': {reason}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise PaliGemmaError(f"cannot read image '{name}': corrupt or truncated ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited onto white, as
    transformers' `convert_to_rgb` does: `Image.convert("RGB")` would instead keep the colour under
    fully transparent pixels, often black. 16- and 32-bit grayscale is rescaled to 0..255: a plain
    `convert` would clip every value above 255 to white. CMYK, YCbCr, palette, 1-bit and 8-bit gray
    go through Pillow's own conversion.
    """
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # "I" can hold either range (PNG 16-bit gray was "I" in older Pillow); values above 255 mean 16-bit.
        top = 65535 if image.mode != "I" or image.getextrema()[1] > 255 else 255
        image = image.convert("F").point(lambda v: v * 255 / top + 0.5).convert("L")  # +0.5: round
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(images: Sequence[Image.Image], size: int):
    """Resize, rescale and normalise images for the vision tower.

    Args:
        images: B PIL images (any mode; converted with `to_rgb`).
        size: S, the model's square input side (224, 448 or 896).

    Returns:
        float32 tensor [B, 3, S, S] in [-1, 1]: PIL bicubic resize to (S, S) without keeping the
        aspect ratio, x / 255, (x - 0.5) / 0.5.
    """
    out = torch.empty(len(images), 3, size, size)
    for b, image in enumerate(images):
        image = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        x = pixels.float() / 255
        out[b] = ((x - 0.5) / 0.5).permute(2, 0, 1)  # [S, S, 3] -> [3, S, S]
    return out
