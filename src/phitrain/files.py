"""Strict readers for the JSON and JSONL files phitrain consumes (manifests, stats, benchmark and task
sets). Every problem becomes one PhitrainError naming the file and, for JSONL, the line."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

from phitrain.errors import PhitrainError


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PhitrainError(f"{path}: not valid JSON ({err.msg})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PhitrainError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(obj, dict):
                    raise PhitrainError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                yield number, obj
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise PhitrainError(f"{path}: cannot read: {err}") from None
