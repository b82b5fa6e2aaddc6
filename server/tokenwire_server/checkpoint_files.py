"""Reading checkpoint files without torch (the tokenizer uses these too): GGUF and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFReader

from .errors import CheckpointError


def open_gguf(path: Path) -> GGUFReader:
    """Open and index a GGUF file; any damage becomes one CheckpointError naming the file."""
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
        raise CheckpointError(path, f"not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None


def metadata(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(path, "file is missing")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot read JSON ({e})") from None
