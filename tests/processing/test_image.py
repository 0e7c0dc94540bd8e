"""load_image (formats, modes, EXIF, errors, stdin) and preprocess (parity with transformers)."""

import io
import sys

import pytest
import torch
from PIL import Image

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.image import load_image, preprocess


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    data = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8)
    return Image.frombytes(mode, (w, h), bytes(data.flatten().tolist()))


def hf_image_processor(size: int):
    """The reference: transformers' PIL-backed SigLIP processor, configured as PaliGemma's.

    `SiglipImageProcessor` in transformers 5 is the torchvision backend (torch bicubic with antialias,
    not PIL); the PIL backend is the one that matches PaliGemma checkpoints' processor config.
    """
    siglip = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    return siglip.SiglipImageProcessorPil(
        do_resize=True, size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_rescale=True, rescale_factor=1 / 255,
    )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_preprocess_matches_transformers(mode):
    ref = hf_image_processor(28)
    images = [random_image(50, 31, mode, 0), random_image(9, 17, mode, 1), random_image(28, 28, mode, 2)]
    ours = preprocess(images, 28)
    theirs = ref(images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, 28, 28) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() == 0.0  # same PIL resize, same float64 rescale
    assert ours.min() >= -1 and ours.max() <= 1


def test_preprocess_values():
    image = Image.new("RGB", (5, 3), (0, 255, 51))
    x = preprocess([image], 4)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_rgb_jpeg_and_bytes(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(encode(Image.new("RGB", (8, 6), (200, 10, 10)), "JPEG", quality=95))
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (8, 6)
        assert abs(image.getpixel((3, 3))[0] - 200) < 6


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))  # red in the top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90 degrees clockwise to view
    path = tmp_path / "phone.png"
    path.write_bytes(encode(image, exif=exif))
    upright = load_image(path)
    assert upright.size == (2, 4)
    assert upright.getpixel((1, 0)) == (255, 0, 0)  # top-left went to top-right


def test_palette_and_transparent_palette():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 255, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    image = load_image(encode(palette, "GIF"))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 0, 255), (255, 255, 0)]
    image = load_image(encode(palette, "PNG", transparency=0))  # index 0 transparent
    assert [image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (255, 255, 0)]


def test_grayscale():
    image = load_image(encode(Image.new("L", (3, 3), 77)))
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (77, 77, 77)
    image = load_image(encode(Image.new("1", (3, 3), 1)))
    assert image.getpixel((1, 1)) == (255, 255, 255)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # transparent black: white, not black
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    image = load_image(encode(rgba))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (255, 127, 127)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    image = load_image(encode(cmyk, "JPEG", quality=100))
    r, g, b = image.getpixel((4, 4))
    assert image.mode == "RGB" and r < 10 and g > 245 and b > 245


def test_16_bit_png_is_rescaled_not_clipped():
    gray16 = Image.new("I;16", (4, 1))
    for x, v in enumerate([0, 257 * 10, 32768, 65535]):
        gray16.putpixel((x, 0), v)
    data = encode(gray16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = load_image(data)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (10, 10, 10), (128, 128, 128), (255,) * 3]


def test_32_bit_gray_with_8_bit_values():
    gray = Image.new("I", (2, 1))
    gray.putpixel((1, 0), 200)
    image = load_image(encode(gray, "TIFF"))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (200, 200, 200)]


def test_missing_file(tmp_path):
    with pytest.raises(PaliGemmaError, match=r"cannot read image '.*nope\.jpg': no such file"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("data", [b"definitely not an image", b"", None], ids=["garbage", "empty", "truncated"])
def test_corrupt_file(tmp_path, data):
    if data is None:
        data = encode(random_image(64, 64), "PNG")[:300]
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    with pytest.raises(PaliGemmaError, match=r"cannot read image '.*x\.jpg': ") as e:
        load_image(path)
    assert "\n" not in str(e.value)


def test_stdin(monkeypatch):
    data = encode(Image.new("RGB", (3, 2), (1, 2, 3)))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    image = load_image("-")
    assert image.size == (3, 2) and image.getpixel((0, 0)) == (1, 2, 3)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(PaliGemmaError, match="cannot read image '<stdin>': empty input"):
        load_image("-")
