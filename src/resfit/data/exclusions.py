"""Files a user has chosen to leave out (``--exclude-from FILE``), read from an audit or a plain list.

FILE is either the ``audit.json`` that ``resfit audit`` writes (its ``exclude`` list, which the user
reviews and edits) or a text file with one path per line (``#`` starts a comment). Paths are relative
to the dataset's folder (a CSV manifest's folder) or absolute. The files themselves are never touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError


def read_exclusions(path: str | os.PathLike) -> list[str]:
    """The listed paths, as written (relative or absolute)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read exclusion list {path}: {getattr(error, 'strerror', None) or error}"
        ) from None
    if path.suffix.lower() == ".json":
        try:
            listed = json.loads(text).get("exclude") if text.strip().startswith("{") else None
        except ValueError as error:
            raise DataError(f"exclusion list {path} is not valid JSON: {error}") from None
        if not isinstance(listed, list) or not all(isinstance(entry, str) for entry in listed):
            raise DataError(f"{path}: expected an object with an 'exclude' list of paths (as audit.json has)")
        return [entry for entry in listed if entry.strip()]
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def resolve_exclusions(entries: list[str], base: Path) -> set[str]:
    """Absolute normalised paths (CIFAR keys such as 'cifar10:train:12' are kept as they are)."""
    return {
        entry
        if entry.startswith("cifar10:")
        else os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
        for entry in entries
    }
