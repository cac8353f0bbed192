"""Specification of the sandbox's edits and the demo's contact sheet (worker/devtools/imaging.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from worker.devtools import imaging


def picture(colour: tuple[int, int, int] = (30, 90, 200), size: tuple[int, int] = (320, 240)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.paste((250, 240, 200), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_same_input_prompt_and_seed_give_identical_bytes():
    source = picture()
    assert imaging.edit_png(source, "make it blue", 7, 512, 640) == imaging.edit_png(source, "make it blue", 7, 512, 640)


def test_another_prompt_or_seed_gives_another_image():
    source = picture()
    base = imaging.edit_png(source, "make it blue", 7, 512, 512)
    assert imaging.edit_png(source, "make it red", 7, 512, 512) != base
    assert imaging.edit_png(source, "make it blue", 8, 512, 512) != base


def test_prompts_and_seeds_spread_over_several_effects():
    chosen = {imaging.effect_for(f"prompt {i}", seed) for i in range(20) for seed in range(3)}
    assert len(chosen) >= 6


@pytest.mark.parametrize("effect", list(imaging.EFFECTS))
def test_every_effect_visibly_changes_the_picture(effect):
    # Find a prompt that picks this effect, then compare the edit (above the band) with the plain fit.
    prompt = next(f"p{i}" for i in range(10_000) if imaging.effect_for(f"p{i}", 3) == effect)
    source = Image.open(io.BytesIO(picture()))
    edited = imaging.edit_image(source, prompt, 3, 512, 512)
    fitted = Image.open(io.BytesIO(picture())).convert("RGB").resize((512, 512))
    above_band = (0, 0, 512, 512 - imaging.band_height(512))
    difference = ImageChops.difference(edited.crop(above_band), fitted.crop(above_band))
    assert max(ImageStat.Stat(difference).mean) > 5, f"{effect} left the picture almost unchanged"


@pytest.mark.parametrize("size", [(512, 512), (640, 1024), (2048, 512)])
def test_output_has_the_requested_size(size):
    assert decode(imaging.edit_png(picture(), "p", 1, *size)).size == size


def test_prompt_band_is_dark_with_light_text_at_the_bottom():
    area = (0, 512 - imaging.band_height(512), 512, 512)
    band = decode(imaging.edit_png(picture(), "add soft falling snow", 4, 512, 512)).crop(area)
    colours = {colour for _, colour in band.getcolors(maxcolors=1 << 16) or []}
    assert (16, 16, 16) in colours  # the band
    assert any(min(colour) > 200 for colour in colours)  # the text drawn on it
    other = decode(imaging.edit_png(picture(), "x", 4, 512, 512)).crop(area)
    assert band.tobytes() != other.tobytes()  # another prompt writes another text


def test_unreadable_input_is_edited_as_the_placeholder():
    assert imaging.edit_png(b"not an image", "p", 1, 512, 512) == imaging.edit_png(None, "p", 1, 512, 512)


def test_contact_sheet_puts_each_input_beside_its_outputs(tmp_path: Path):
    rows = []
    for index, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        before = tmp_path / f"in-{index}.png"
        before.write_bytes(picture(colour))
        after = tmp_path / f"out-{index}.png"
        after.write_bytes(imaging.edit_png(before.read_bytes(), f"prompt {index}", index, 512, 512))
        rows.append(imaging.SheetRow(caption=f"prompt {index}", before=before, after=[after]))

    sheet = imaging.contact_sheet(rows)

    m, t, c, h = imaging.MARGIN, imaging.THUMB, imaging.CAPTION, imaging.HEADER
    assert sheet.size == (m + 2 * (t + m), h + 2 * (c + t + m))
    # The second row's input thumbnail is its (blue) input: sample its top-left corner region.
    corner = sheet.getpixel((m + 4, h + (c + t + m) + c + (t - t * 240 // 320) // 2 + 4))
    assert corner == (0, 0, 200)
