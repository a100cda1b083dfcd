"""The audit's contact sheet: one PNG with the worst cases, each tile labelled so it can be found again.

Rows are sections (label conflicts, leakage, copies inside a class, likely label errors, outliers);
copies of one picture sit side by side. Under each tile: class and split, then a short path, then why
it is shown. Only Pillow: the images are read as training reads them, and nothing is written but the PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.splits import DatasetSource
from ..fileio import atomic_write

TILE = 128
CAPTION_LINES = 3
LINE = 13
COLUMNS = 8
MARGIN = 6
TITLE_HEIGHT = 26


@dataclass
class Tile:
    item: str
    lines: tuple[str, str, str]  # "class / split", short path, the reason
    group_start: bool = False  # a thicker gap before it: a new set of copies


def write_contact_sheet(source: DatasetSource, sections: list[tuple[str, list[Tile]]], path: Path) -> bool:
    """Draw the non-empty sections into ``path``; False (nothing written) when every section is empty."""
    sections = [(title, tiles) for title, tiles in sections if tiles]
    if not sections:
        return False
    font = _font(11)
    title_font = _font(14)
    cell_w, cell_h = TILE + MARGIN, TILE + CAPTION_LINES * LINE + MARGIN
    rows = sum((len(tiles) + COLUMNS - 1) // COLUMNS for _, tiles in sections)
    width = COLUMNS * cell_w + MARGIN
    sheet = Image.new("RGB", (width, rows * cell_h + len(sections) * TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for title, tiles in sections:
        draw.text((MARGIN, y + 6), title, fill="black", font=title_font)
        y += TITLE_HEIGHT
        for start in range(0, len(tiles), COLUMNS):
            for column, tile in enumerate(tiles[start : start + COLUMNS]):
                x = MARGIN + column * cell_w
                _paste(sheet, source, tile.item, (x, y))
                if tile.group_start and column:
                    draw.line([(x - MARGIN // 2, y), (x - MARGIN // 2, y + TILE)], fill="black", width=2)
                for n, text in enumerate(tile.lines):
                    colour = "black" if n < 2 else "firebrick"
                    draw.text((x, y + TILE + 1 + n * LINE), _fit(draw, text, font), fill=colour, font=font)
            y += cell_h
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return True


def short_path(item: str, root: Path, keep: int = 22) -> str:
    """The path below the dataset folder, its middle elided to fit under a tile."""
    try:
        text = str(Path(item).relative_to(root if root.is_dir() else root.parent))
    except ValueError:
        text = item
    return text if len(text) <= keep else f"{text[: keep // 2 - 1]}…{text[-(keep // 2) :]}"


def _paste(sheet: Image.Image, source: DatasetSource, item: str, at: tuple[int, int]) -> None:
    try:
        image, _ = source.read(item)
    except Exception:  # noqa: BLE001 - a file that broke since the scan is drawn as a grey square, named
        image = Image.new("RGB", (TILE, TILE), "lightgrey")
    image = image.copy()
    image.thumbnail((TILE, TILE))
    sheet.paste(image, (at[0] + (TILE - image.width) // 2, at[1] + (TILE - image.height) // 2))


def _fit(draw: ImageDraw.ImageDraw, text: str, font) -> str:
    while text and draw.textlength(text, font=font) > TILE:
        text = text[:-2] + "…"
    return text


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()
