"""Model answers drawn on the picture they are about: boxes with their labels."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from paligemma_cli.processing.locations import Box

# Colours with enough contrast on photos; picked per label so one class keeps one colour.
_PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
)


def draw_boxes(image: Image.Image, boxes: list[Box], line_width: int = 3) -> Image.Image:
    """A copy of `image` with each box outlined and its label written on a filled tag above it."""
    out = image.convert("RGB")  # convert always copies, so the caller's image is left alone
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    colours: dict[str, str] = {}
    for box in boxes:
        colour = colours.setdefault(box.label, _PALETTE[len(colours) % len(_PALETTE)])
        draw.rectangle((box.x0, box.y0, box.x1, box.y1), outline=colour, width=line_width)
        left, top, right, bottom = draw.textbbox((0, 0), box.label, font=font)
        text_w, text_h = right - left, bottom - top
        # The tag sits above the box, or inside it when the box touches the top edge.
        tag_y = box.y0 - text_h - 4 if box.y0 - text_h - 4 >= 0 else box.y0
        draw.rectangle((box.x0, tag_y, box.x0 + text_w + 4, tag_y + text_h + 4), fill=colour)
        draw.text((box.x0 + 2 - left, tag_y + 2 - top), box.label, fill="white", font=font)
    return out
