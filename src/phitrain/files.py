"""Reading and writing the files phitrain produces and consumes.

Readers: strict JSON and JSONL (manifests, stats, benchmark and task sets); every problem becomes one
PhitrainError naming the file and, for JSONL, the line.

Writers: every file and directory phitrain writes goes through a temporary sibling and one rename
(`atomic_path`, `atomic_write_text`, `atomic_write_bytes`, `atomic_directory`), so a reader — or a re-run
after a crash or `kill -9` — sees the old complete file or the new complete one, never half of one.
Temporary names are hidden (they start with ".") and temporary files end in ".tmp", so no glob for the
real files (`*.json`, `shard-*`) ever matches one.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from phitrain.errors import PhitrainError


# ---- atomic writes -------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to `path` (which does not exist yet) for a writer that streams
    to a file (`np.save`, `ndarray.tofile`, `pyarrow.parquet.write_table`, `pickle.dump`); on success it
    is renamed to `path`, on any error or interrupt it is removed. The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_directory(staging: Path, path: Path) -> None:
    """Rename the finished `staging` directory to `path` in one step.

    An existing `path` is moved aside first and deleted only after the new one is in place, so at every
    instant either the old or the new complete directory exists under the final name.
    """
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, staging: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` (see
    `replace_directory`), on any error or interrupt it is removed. `staging` is an existing empty
    directory on the same filesystem to use instead of a new one (distributed checkpoints: every rank
    writes its shards into it before rank 0 finishes it here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging if staging is not None else Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- strict readers ------------------------------------------------------------------------------

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
