"""Raw sources: files and globs, JSONL, Parquet, and the installed Python standard library.

Readers yield `(doc_id, payload)` where payload is the raw `bytes` of a file (decoding is the cleaning
stage's job, so invalid UTF-8 is counted in one place) or the `str` of a record's text field. Anything
a reader cannot use — a malformed JSONL line, a record without the text field — is recorded in `Drops`
by reason, or raised as one `PhitrainError` when the source is `strict`. Order is deterministic (sorted
paths, file order within a file) so a recipe prepares the same data every time.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from phitrain.config import DataSourceConfig
from phitrain.errors import PhitrainError

# Reasons that mean "the input is malformed" (as opposed to a document we chose to filter). A strict
# source raises on these instead of counting them.
MALFORMED = frozenset({"malformed_json", "missing_field", "not_a_string", "invalid_utf8", "binary", "unreadable"})


class Drops:
    """Per-source counts of documents dropped, by reason, with the first few examples of each."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    def add(self, source: str, reason: str, where: str, strict: bool = False, detail: str = "") -> None:
        if strict and reason in MALFORMED:
            raise PhitrainError(f"{where}: {reason.replace('_', ' ')}{': ' + detail if detail else ''} "
                                f"(source {source!r} is strict; set strict: false to count and skip)")
        self.counts[source][reason] += 1
        if len(self.examples[source][reason]) < 5:
            self.examples[source][reason].append(where)

    def as_dict(self) -> dict[str, dict]:
        return {s: {"counts": dict(c), "examples": dict(self.examples[s])} for s, c in self.counts.items()}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(include_tests: bool) -> list[tuple[str, Path]]:
    """The standard library's own .py files: no site-packages, no IDLE/turtledemo scripts, no test suites
    unless asked (they are mostly assertions and fixtures, not instructive code)."""
    root = stdlib_dir()
    skip_dirs = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}
    if not include_tests:
        skip_dirs |= {"test", "tests", "idle_test"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = Path(dirpath) / name
                out.append((p.relative_to(root).as_posix(), p))
    return out


def _expand(cfg: DataSourceConfig) -> list[Path]:
    """Files named by `paths` (files, directories walked recursively, or glob patterns), filtered by
    `include` on the file name, sorted, each once."""
    files: list[Path] = []
    for entry in cfg.paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            found = [q for q in p.rglob("*") if q.is_file()]
        elif p.is_file():
            found = [p]
        else:
            found = [Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file()]
        if not found:
            raise PhitrainError(f"source {cfg.name!r}: path {entry!r} matches no files")
        files.extend(q for q in found if any(fnmatch.fnmatch(q.name, pat) for pat in cfg.include))
    seen, out = set(), []
    for f in sorted(files):
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def _read_bytes(path: Path, cfg: DataSourceConfig, drops: Drops) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as err:
        drops.add(cfg.name, "unreadable", str(path), cfg.strict, err.strerror or str(err))
        return None


def _iter_files(cfg: DataSourceConfig, drops: Drops) -> Iterator[tuple[str, bytes | str]]:
    if cfg.kind == "stdlib":
        pairs = [(f"stdlib/{rel}", p) for rel, p in _stdlib_files(cfg.include_tests)]
    else:
        pairs = [(str(p), p) for p in _expand(cfg)]
    for doc_id, path in pairs:
        data = _read_bytes(path, cfg, drops)
        if data is not None:
            yield doc_id, data


def _record_text(rec, field: str, where: str, cfg: DataSourceConfig, drops: Drops) -> str | None:
    if not isinstance(rec, dict) or field not in rec or rec[field] is None:
        drops.add(cfg.name, "missing_field", where, cfg.strict, f"no {field!r} field")
        return None
    text = rec[field]
    if not isinstance(text, str):
        drops.add(cfg.name, "not_a_string", where, cfg.strict, f"{field!r} is {type(text).__name__}")
        return None
    return text


def _record_id(rec: dict, cfg: DataSourceConfig, default: str) -> str:
    if cfg.id_field and isinstance(rec, dict) and rec.get(cfg.id_field) is not None:
        return f"{default}#{rec[cfg.id_field]}"
    return default


def _iter_jsonl(cfg: DataSourceConfig, drops: Drops, invalid_utf8: str) -> Iterator[tuple[str, str]]:
    for path in _expand(cfg):
        try:
            f = path.open("rb")
        except OSError as err:
            drops.add(cfg.name, "unreadable", str(path), cfg.strict, err.strerror or str(err))
            continue
        with f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    if invalid_utf8 == "skip" or cfg.strict:
                        drops.add(cfg.name, "invalid_utf8", where, cfg.strict)
                        continue
                    line = raw.decode("utf-8", errors="replace")
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    drops.add(cfg.name, "malformed_json", where, cfg.strict, err.msg)
                    continue
                text = _record_text(rec, cfg.text_field, where, cfg, drops)
                if text is not None:
                    yield _record_id(rec, cfg, where), text


def _iter_parquet(cfg: DataSourceConfig, drops: Drops) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    for path in _expand(cfg):
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a corrupt or non-Parquet file
            drops.add(cfg.name, "unreadable", str(path), cfg.strict, str(err).splitlines()[0])
            continue
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            raise PhitrainError(f"{path}: no column {cfg.text_field!r} (columns: {names}); set text_field")
        columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field and cfg.id_field in names else [])
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            for rec in batch.to_pylist():
                where = f"{path}:row {row}"
                row += 1
                text = _record_text(rec, cfg.text_field, where, cfg, drops)
                if text is not None:
                    yield _record_id(rec, cfg, where), text


def iter_source(cfg: DataSourceConfig, drops: Drops, invalid_utf8: str = "skip") -> Iterator[tuple[str, bytes | str]]:
    """All documents of one source as `(doc_id, payload)`, stopping after `max_files` documents or once
    `max_bytes` of payload have been read (the quickstart's knob for a fast subset)."""
    if cfg.kind in ("files", "stdlib"):
        it: Iterator[tuple[str, bytes | str]] = _iter_files(cfg, drops)
    elif cfg.kind == "jsonl":
        it = _iter_jsonl(cfg, drops, invalid_utf8)
    else:
        it = _iter_parquet(cfg, drops)
    n = size = 0
    for doc_id, payload in it:
        if cfg.max_files is not None and n >= cfg.max_files:
            return
        if cfg.max_bytes is not None and size >= cfg.max_bytes:
            return
        n += 1
        size += len(payload)
        yield doc_id, payload
