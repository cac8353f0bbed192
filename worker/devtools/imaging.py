"""The sandbox's "edits" and the demo's contact sheet: deterministic Pillow transforms of an input
image, chosen by prompt and seed, with the prompt written on the result.

Same input bytes + prompt + seed + size -> the same PNG bytes (no clock, no randomness beyond the
seed, Pillow's built-in font). Development only: the real provider does the real edit.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

EffectFn = Callable[[Image.Image, random.Random], Image.Image]


def _posterize(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.posterize(img, rng.randint(2, 3))


def _sepia(img: Image.Image, rng: random.Random) -> Image.Image:
    warmth = rng.randint(0, 40)
    return ImageOps.colorize(ImageOps.grayscale(img), black=(40, 20, 5), white=(255, 235 - warmth // 2, 190 - warmth))


def _invert(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.invert(img)


def _edges(img: Image.Image, rng: random.Random) -> Image.Image:
    kind = rng.choice([ImageFilter.EMBOSS, ImageFilter.CONTOUR, ImageFilter.FIND_EDGES])
    out = img.filter(kind)
    return ImageOps.autocontrast(out) if kind is ImageFilter.FIND_EDGES else out


def _hue_rotate(img: Image.Image, rng: random.Random) -> Image.Image:
    shift = rng.randint(60, 200)
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda value: (value + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _mirror(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.flip(img) if rng.random() < 0.5 else ImageOps.mirror(img)


def _pixelate(img: Image.Image, rng: random.Random) -> Image.Image:
    block = rng.randint(16, 40)
    small = img.resize((max(1, img.width // block), max(1, img.height // block)), Image.Resampling.BILINEAR)
    return small.resize(img.size, Image.Resampling.NEAREST)


def _tint(img: Image.Image, rng: random.Random) -> Image.Image:
    colour = (rng.randint(40, 255), rng.randint(40, 255), rng.randint(40, 255))
    return Image.blend(img, Image.new("RGB", img.size, colour), 0.45)


def _solarize(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.solarize(img, threshold=rng.randint(64, 192))


# Order matters for determinism: an effect is picked by index.
EFFECTS: dict[str, EffectFn] = {
    "posterize": _posterize,
    "sepia": _sepia,
    "invert": _invert,
    "edges": _edges,
    "hue-rotate": _hue_rotate,
    "mirror": _mirror,
    "pixelate": _pixelate,
    "tint": _tint,
    "solarize": _solarize,
}


def effect_for(prompt: str, seed: int) -> str:
    """The name of the effect a prompt and seed get."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    names = list(EFFECTS)
    return names[int.from_bytes(digest[:4], "big") % len(names)]


def band_height(height: int) -> int:
    """Height of the prompt band at the bottom of an output of this height."""
    return max(20, height // 14)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in font (bundled in the wheel): no font file, no network.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_fitting(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_band(img: Image.Image, text: str) -> None:
    """Write `text` on a dark band across the bottom of `img` (in place)."""
    band = band_height(img.height)
    top = img.height - band
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, top, img.width, img.height], fill=(16, 16, 16))
    font = _font(max(10, int(band * 0.55)))
    pad = max(4, band // 4)
    shown = _text_fitting(draw, text, font, img.width - 2 * pad)
    draw.text((pad, top + band / 2), shown, font=font, fill=(245, 245, 245), anchor="lm")


def placeholder(width: int = 512, height: int = 512) -> Image.Image:
    """What the sandbox edits when it cannot read the input (an unreachable URL in a test)."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(0, height, 32):
        for x in range(0, width, 32):
            shade = 90 if (x // 32 + y // 32) % 2 else 170
            draw.rectangle([x, y, x + 31, y + 31], fill=(shade, shade, shade + 30))
    return img


def load_image(data: bytes | None) -> Image.Image:
    """The input as RGB; a placeholder when there is none or it is not an image."""
    if data:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                return opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    return placeholder()


def edit_image(source: Image.Image, prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """`source` fitted to width x height, transformed by the prompt's and seed's effect, prompt written on it."""
    fitted = ImageOps.fit(source.convert("RGB"), (width, height), Image.Resampling.BICUBIC)
    rng = random.Random(f"{seed}\x00{prompt}")
    edited = EFFECTS[effect_for(prompt, seed)](fitted, rng).convert("RGB")
    draw_band(edited, prompt)
    return edited


def edit_png(input_bytes: bytes | None, prompt: str, seed: int, width: int, height: int) -> bytes:
    """The sandbox's edited output as PNG bytes (deterministic)."""
    return to_png(edit_image(load_image(input_bytes), prompt, seed, width, height))


def to_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --- the demo's contact sheet ---------------------------------------------------------------------

THUMB = 256  # each picture's box on the sheet
MARGIN = 16
CAPTION = 28  # the caption line above each row
HEADER = 40


@dataclass(frozen=True)
class SheetRow:
    caption: str
    before: Path
    after: Sequence[Path]


def sheet_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of a sheet of `rows` jobs with at most `columns` pictures each (input included)."""
    return MARGIN + columns * (THUMB + MARGIN), HEADER + rows * (CAPTION + THUMB + MARGIN)


def contact_sheet(rows: Sequence[SheetRow], title: str = "edit-worker demo: before -> after") -> Image.Image:
    """Each row: the prompt as caption, then the input and its output(s) side by side."""
    columns = max([1 + len(row.after) for row in rows] or [2])
    sheet = Image.new("RGB", sheet_size(len(rows), columns), (250, 250, 247))
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, HEADER / 2), title, font=_font(20), fill=(20, 20, 20), anchor="lm")
    caption_font = _font(15)
    for index, row in enumerate(rows):
        top = HEADER + index * (CAPTION + THUMB + MARGIN)
        caption = _text_fitting(draw, f"“{row.caption}”", caption_font, sheet.width - 2 * MARGIN)
        draw.text((MARGIN, top + CAPTION / 2), caption, font=caption_font, fill=(40, 40, 40), anchor="lm")
        for column, path in enumerate([row.before, *row.after]):
            with Image.open(path) as picture:
                thumb = ImageOps.contain(picture.convert("RGB"), (THUMB, THUMB), Image.Resampling.BICUBIC)
            x = MARGIN + column * (THUMB + MARGIN) + (THUMB - thumb.width) // 2
            y = top + CAPTION + (THUMB - thumb.height) // 2
            sheet.paste(thumb, (x, y))
    return sheet
