"""Seeds for generation: passages, topics mined from code and docs, and functions to reverse.

Phi-4 §2 builds synthetic data from seeds (web pages, books, code) rather than from bare prompts, and
phi-1.5 used 20K topics; both are read here from plain files, JSONL, Parquet or the installed standard
library (always present, so recipes run offline). Everything is read in sorted path order, so a recipe
plans the same items every time.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from phitrain.errors import PhitrainError
from phitrain.files import iter_jsonl
from phitrain.synth.config import CodeCorpusConfig, CorpusConfig

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo"}
_RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class CodeItem:
    """A function to reverse: its source, tests defining `check(candidate)` (or None), and its name."""

    code: str
    test: str | None
    entry_point: str


def expand_paths(paths: list[str], include: list[str], where: str) -> list[tuple[Path, Path]]:
    """(file, root) pairs, sorted and unique; `root` is what module names are relative to. `stdlib:NAME`
    is a module (`json.decoder`) or package (`json`) of the installed standard library."""
    out: dict[Path, Path] = {}
    for entry in paths:
        if entry.startswith("stdlib:"):
            root = Path(sysconfig.get_paths()["stdlib"])
            name = entry[len("stdlib:"):].removesuffix(".py")
            target = root.joinpath(*name.split(".")) if name else root
            if not target.is_dir():
                target = target.with_name(target.name + ".py")
            if not target.exists():
                raise PhitrainError(f"{where}: {entry!r}: the standard library has no module or package {name!r}")
            found = _walk(target, root)
        else:
            p = Path(entry).expanduser()
            if p.is_dir():
                found = _walk(p, p)
            elif p.is_file():
                found = [(p, p.parent)]
            else:
                found = [(Path(q), Path(q).parent) for q in sorted(glob.glob(str(p), recursive=True)) if Path(q).is_file()]
        found = [(f, r) for f, r in found if any(fnmatch.fnmatch(f.name, pat) for pat in include)]
        if not found:
            raise PhitrainError(f"{where}: path {entry!r} matches no files (include: {include})")
        for f, r in found:
            out.setdefault(f, r)
    return sorted(out.items())


def _walk(target: Path, root: Path) -> list[tuple[Path, Path]]:
    if target.is_file():
        return [(target, root)]
    files = []
    for f in sorted(target.rglob("*")):
        if f.is_file() and not any(part in _SKIP_DIRS or part.startswith(".") for part in f.relative_to(target).parts[:-1]):
            files.append((f, root))
    return files


def _records(path: Path, field: str, where: str) -> Iterator[tuple[str, dict]]:
    """(location, record) of a JSONL(.gz) or Parquet file; `field` must be present in every record."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise PhitrainError(f"{where}: {path}: not a readable Parquet file ({err})") from None
        if field not in table.column_names:
            raise PhitrainError(f"{where}: {path}: no column {field!r} (columns: {table.column_names})")
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", rec
        return
    records = iter_jsonl(path)
    while True:
        try:
            item = next(records, None)
        except PhitrainError as err:   # phitrain's strict JSONL reader names the file and line
            raise PhitrainError(f"{where}: {err}") from None
        if item is None:
            return
        number, rec = item
        if not isinstance(rec.get(field), str):
            raise PhitrainError(f"{where}: {path}:{number}: needs a string field {field!r}")
        yield f"{path}:{number}", rec


def _read_text(path: Path) -> str | None:
    """A file's text, or None for binary / non-UTF-8 files (skipped: they are not seed text)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PhitrainError(f"{path}: cannot read: {err.strerror or err}") from None
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _extract(text: str, max_chars: int) -> str:
    """The first `max_chars` characters, cut back to the last line break when there is one."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    at = cut.rfind("\n")
    return (cut[:at] if at > max_chars // 2 else cut).rstrip()


def read_passages(cfg: CorpusConfig, where: str) -> list[str]:
    """Seed passages: one per file or record, cut to `max_chars`, empty and repeated ones dropped."""
    seen: dict[str, None] = {}
    for path, _ in expand_paths(cfg.paths, cfg.include, where):
        if path.name.endswith(_RECORD_SUFFIXES):
            texts = (rec[cfg.text_field] for _, rec in _records(path, cfg.text_field, where))
        else:
            texts = iter([_read_text(path) or ""])
        for text in texts:
            passage = _extract(text, cfg.max_chars)
            if passage:
                seen.setdefault(passage)
            if cfg.max_docs is not None and len(seen) >= cfg.max_docs:
                return list(seen)
    if not seen:
        raise PhitrainError(f"{where}: no non-empty passages in {cfg.paths}")
    return list(seen)


def parse_python(text: str) -> ast.Module | None:
    """The module's AST, or None when the text is not Python."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None


def mine_topics(cfg: CorpusConfig, where: str) -> list[str]:
    """Topics from a corpus: `module.name (first docstring line)` for every public, documented top-level
    function and class of Python files; headings of Markdown/reST/text files; `text_field` of records."""
    seen: dict[str, None] = {}
    for path, root in expand_paths(cfg.paths, cfg.include, where):
        if path.name.endswith(_RECORD_SUFFIXES):
            found = [rec[cfg.text_field].strip() for _, rec in _records(path, cfg.text_field, where)]
        elif path.suffix == ".py":
            found = _python_topics(path, root)
        else:
            text = _read_text(path) or ""
            found = [ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#") and ln.lstrip("#").strip()]
        for topic in found:
            if topic:
                seen.setdefault(topic[:cfg.max_chars])
            if cfg.max_docs is not None and len(seen) >= cfg.max_docs:
                return list(seen)
    if not seen:
        raise PhitrainError(f"{where}: no topics found in {cfg.paths} (documented functions/classes, headings)")
    return list(seen)


def _python_topics(path: Path, root: Path) -> list[str]:
    tree = parse_python(_read_text(path) or "")
    if tree is None:
        return []
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or [path.parent.name]
    module = ".".join(parts)
    topics = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = (ast.get_docstring(node) or "").strip()
            if doc:
                sentence = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
                topics.append(f"{module}.{node.name} ({sentence})")
    return topics


def read_code(cfg: CodeCorpusConfig, where: str) -> list[CodeItem]:
    """Functions to reverse: records (code, optional tests, entry point) or the top-level functions of
    Python files with `min_lines`..`max_lines` lines (no tests: similarity decides)."""
    items: dict[str, CodeItem] = {}
    for path, _ in expand_paths(cfg.paths, cfg.include, where):
        if path.name.endswith(_RECORD_SUFFIXES):
            found = [_record_code(rec, cfg, f"{where}: {loc}") for loc, rec in _records(path, cfg.code_field, where)]
        else:
            found = _python_functions(_read_text(path) or "", cfg)
        for item in found:
            items.setdefault(item.code, item)
            if cfg.max_docs is not None and len(items) >= cfg.max_docs:
                return list(items.values())
    if not items:
        raise PhitrainError(f"{where}: no functions of {cfg.min_lines}-{cfg.max_lines} lines in {cfg.paths}")
    return list(items.values())


def _record_code(rec: dict, cfg: CodeCorpusConfig, where: str) -> CodeItem:
    code = rec[cfg.code_field]
    test = rec.get(cfg.test_field)
    if test is not None and not isinstance(test, str):
        raise PhitrainError(f"{where}: {cfg.test_field!r} must be a string")
    entry = rec.get(cfg.entry_point_field)
    if entry is None:
        tree = parse_python(code)
        defs = [n.name for n in (tree.body if tree else []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if not defs:
            raise PhitrainError(f"{where}: no {cfg.entry_point_field!r} field and the code defines no function")
        entry = defs[0]
    if not isinstance(entry, str) or not entry.isidentifier():
        raise PhitrainError(f"{where}: {cfg.entry_point_field!r} must be a Python identifier, got {entry!r}")
    return CodeItem(code=code, test=test or None, entry_point=entry)


def _python_functions(text: str, cfg: CodeCorpusConfig) -> list[CodeItem]:
    tree = parse_python(text)
    if tree is None:
        return []
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            source = ast.get_source_segment(text, node)
            if source and cfg.min_lines <= source.count("\n") + 1 <= cfg.max_lines:
                out.append(CodeItem(code=source + "\n", test=None, entry_point=node.name))
    return out


def read_lines(path: str, where: str) -> list[str]:
    """Non-empty, stripped lines of a text file (a topics file: one topic per line, `#` lines are comments)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PhitrainError(f"{where}: no such file {path}")
    text = _read_text(p)
    if text is None:
        raise PhitrainError(f"{where}: {path} is not UTF-8 text")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise PhitrainError(f"{where}: {path} has no topics (one per line)")
    return lines
