"""Images held as encoded bytes in Arrow tables (a `datasets` dataset on disk, parquet files), read by row.

A Hugging Face dataset keeps each image as a ``{"bytes", "path"}`` cell, not as a file, so an item of
such a source is a key, ``<dataset>::<table>::<row>``, and reading it decodes that cell's bytes through
the same Pillow boundary as a file (images.open_rgb / check_image): broken bytes are an ImageReadError
with a reason, never a traceback. Nothing is written anywhere near the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ImageReadError
from .images import EncodedImages

ITEM_SEPARATOR = "::"


def row_item(root: Path, table: str, row: int) -> str:
    """The item key of one row, e.g. '/data/beans::train::12'."""
    return f"{root}{ITEM_SEPARATOR}{table}{ITEM_SEPARATOR}{row}"


class ArrowImages(EncodedImages):
    """The image column of each table (split) of one dataset, and the way from an item key to its pixels.

    ``tables`` maps a table name to anything with pyarrow's ``column(name)``: the memory-mapped tables
    `datasets.load_from_disk` gives (they pickle as file paths, cheap for DataLoader workers), or
    in-memory pyarrow tables read from parquet.
    """

    def __init__(self, root: Path, image_column: str, tables: dict[str, Any]):
        self.root = Path(root)
        self.image_column = image_column
        self.tables = tables

    def encoded(self, item: str) -> bytes:
        """The row's encoded image (a path-only cell is read from its file); raises ImageReadError."""
        table_name, row = self._locate(item)
        cell = self.tables[table_name].column(self.image_column)[row].as_py()
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        else:
            data, path = (cell, None) if isinstance(cell, bytes) else (None, cell)
        if data:
            return data
        if isinstance(path, str) and path:
            return self._file_bytes(item, path)
        raise ImageReadError(item, "no image in this row (empty bytes and no path)")

    def _locate(self, item: str) -> tuple[str, int]:
        parts = item.rsplit(ITEM_SEPARATOR, 2)
        if len(parts) != 3 or parts[1] not in self.tables or not parts[2].isdigit():
            raise ImageReadError(item, f"not a row of {self.root} (expected '<dataset>::<split>::<row>')")
        row = int(parts[2])
        if row >= len(self.tables[parts[1]]):
            raise ImageReadError(item, f"row {row} is past the end of {parts[1]}")
        return parts[1], row

    def _file_bytes(self, item: str, path: str) -> bytes:
        """A cell that names a file instead of holding bytes: absolute, or relative to the dataset."""
        full = path if os.path.isabs(path) else os.path.join(self.root, path)
        try:
            with open(full, "rb") as handle:
                return handle.read()
        except OSError as error:
            raise ImageReadError(
                item, f"its image file {full} cannot be read: {error.strerror or error}"
            ) from None
