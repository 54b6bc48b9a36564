"""Raw sources as DataTrove readers: files and globs, JSONL, Parquet, WARC/HTML web pages, and the
installed Python standard library.

Every reader is a DataTrove `BaseDiskReader`, so it runs as the first step of a pipeline on any
executor. What phitrain adds is accounting: DataTrove's stock readers log a warning and skip a bad line
(or, on invalid UTF-8, the rest of the file), which would lose documents without a trace. Here every
input unit is counted (`<source>|read`) and every one that cannot be used is counted with its reason
(`<source>|drop:<reason>`) in the step's DataTrove stats and listed in the task's drop log — or, for a
`strict` source, stops the run with one `PhitrainError` naming the file. Reasons that mean malformed
input are in `MALFORMED`; a compressed file that ends early (truncated gzip/zstd/WARC) is `corrupt`.

Sharding: a source's sorted file list is split into `tasks` *contiguous* ranges (not DataTrove's
round-robin), so (task, position in task) orders documents exactly as the global input order. That
makes "keep the first copy" in deduplication independent of the task count.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

import orjson
import zstandard
from datatrove.data import Document
from datatrove.pipeline.readers.base import BaseDiskReader

from phitrain.config import DataSourceConfig
from phitrain.data.accounting import Accounting
from phitrain.errors import PhitrainError

PAYLOAD = "_payload"
_SKIP = object()   # a JSONL line that was counted as dropped
# what a damaged or truncated compressed file raises (gzip: BadGzipFile or EOFError; zlib: error;
# zstandard: ZstdError): the file is counted as `corrupt`, never as a text-encoding problem
CORRUPT = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError)   # metadata key carrying a file's raw bytes from the reader to the cleaning step
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


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
    return sorted(set(files))


def list_files(cfg: DataSourceConfig) -> list[tuple[str, str]]:
    """`(document id prefix, absolute path)` of every input file of a source, in the global input order,
    cut after `max_files` files or once `max_bytes` of files are listed (the quickstart's knob for a fast
    subset)."""
    if cfg.kind == "stdlib":
        pairs = [(f"stdlib/{rel}", str(p)) for rel, p in _stdlib_files(cfg.include_tests)]
    elif cfg.kind == "synth":   # each generator's output file, not rejected/ nor the reports
        pairs = []
        for entry in cfg.paths:
            found = sorted(p for p in Path(entry).expanduser().glob("*") if p.name.endswith((".parquet", ".jsonl")))
            if not found:
                raise PhitrainError(f"source {cfg.name!r}: {entry!r} holds no `phitrain synth` output (.parquet/.jsonl)")
            pairs.extend((str(p), str(p)) for p in found)
    else:
        pairs = [(str(p), str(p)) for p in _expand(cfg)]
    if cfg.max_files is not None:
        pairs = pairs[:cfg.max_files]
    if cfg.max_bytes is not None:
        kept, size = [], 0
        for pair in pairs:
            if size >= cfg.max_bytes:
                break
            kept.append(pair)
            size += os.path.getsize(pair[1])
        pairs = kept
    return pairs


def task_range(n: int, task: int, tasks: int) -> range:
    """Contiguous block `task` of `tasks` over n items (sizes differ by at most one)."""
    return range(n * task // tasks, n * (task + 1) // tasks)


class SourceReader(Accounting, BaseDiskReader):
    """Reads task `rank` of a recipe's sources: rank // tasks picks the source, rank % tasks the
    contiguous block of its files. Documents carry `metadata["source"]`; file payloads travel as bytes
    (`metadata["_payload"]`) so that decoding problems are judged in one place, the cleaning step."""

    name = "📖 phitrain sources"
    log_name = "read"

    def __init__(self, sources: list[DataSourceConfig], tasks: int, invalid_utf8: str = "skip",
                 drop_dir: str | None = None):
        super().__init__(data_folder="/", add_file_path=False)
        self.sources = sources
        self.tasks = tasks
        self.invalid_utf8 = invalid_utf8
        self.drop_dir = drop_dir
        self.cfg: DataSourceConfig = sources[0]

    def reject(self, reason: str, where: str, detail: str = "") -> None:
        """Count one unusable input unit as read and dropped (or raise for a strict source)."""
        self.count(self.cfg.name, "read")
        self.drop(self.cfg.name, reason, where, detail, strict=self.cfg.strict)

    def doc(self, doc_id: str, text: str = "", payload: bytes | None = None, **metadata) -> Document:
        self.count(self.cfg.name, "read")
        self.count(self.cfg.name, "read_bytes", len(payload) if payload is not None else
                   len(text.encode("utf-8", errors="replace")))
        meta = {"source": self.cfg.name, **metadata}
        if payload is not None:
            meta[PAYLOAD] = payload
        return Document(text=text, id=doc_id, metadata=meta)

    # ---- formats ---------------------------------------------------------------------------------
    def _open(self, path: str):
        import fsspec

        return fsspec.open(path, "rb", compression="infer").open()

    def _read_all(self, path: str) -> bytes | None:
        try:
            with self._open(path) as f:
                return f.read()
        except CORRUPT as err:
            self.reject("corrupt", path, str(err) or type(err).__name__)
        except OSError as err:
            self.reject("unreadable", path, err.strerror or str(err))
        return None

    def _read_files(self, doc_id: str, path: str) -> Iterator[Document]:
        data = self._read_all(path)
        if data is not None:
            yield self.doc(doc_id, payload=data)

    def _record_text(self, rec, where: str) -> str | None:
        field = self.cfg.text_field
        if not isinstance(rec, dict) or rec.get(field) is None:
            self.reject("missing_field", where, f"no {field!r} field")
            return None
        text = rec[field]
        if not isinstance(text, str):
            self.reject("not_a_string", where, f"{field!r} is {type(text).__name__}")
            return None
        return text

    def _record_id(self, rec: dict, default: str) -> str:
        if self.cfg.id_field and isinstance(rec, dict) and rec.get(self.cfg.id_field) is not None:
            return f"{default}#{rec[self.cfg.id_field]}"
        return default

    def _read_jsonl(self, _: str, path: str) -> Iterator[Document]:
        try:
            f = self._open(path)
        except OSError as err:
            self.reject("unreadable", path, err.strerror or str(err))
            return
        lineno = 0
        try:
            with f:
                for lineno, raw in enumerate(f, 1):
                    where = f"{path}:{lineno}"
                    if not raw.strip():
                        continue
                    rec = self._parse_line(raw, where)
                    if rec is _SKIP:
                        continue
                    text = self._record_text(rec, where)
                    if text is not None:
                        yield self.doc(self._record_id(rec, where), text)
        except (*CORRUPT, OSError) as err:   # the compressed stream ends early: the lines before it count
            self.reject("corrupt", f"{path}:{lineno + 1}", str(err) or type(err).__name__)

    def _parse_line(self, raw: bytes, where: str):
        """One JSONL line: orjson on the raw bytes (it also checks UTF-8: the fast path, as in DataTrove's
        reader); only a line it refuses is decoded again to tell invalid UTF-8 from malformed JSON."""
        try:
            return orjson.loads(raw)
        except ValueError:   # orjson.JSONDecodeError
            pass
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            if self.invalid_utf8 == "skip" or self.cfg.strict:
                self.reject("invalid_utf8", where)
                return _SKIP
            line = raw.decode("utf-8", errors="replace")
        try:
            return json.loads(line)
        except ValueError as err:   # JSONDecodeError, whichever json module instance raised it
            self.reject("malformed_json", where, getattr(err, "msg", str(err)))
            return _SKIP

    def _read_parquet(self, _: str, path: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a corrupt or non-Parquet file
            self.reject("corrupt", path, str(err).splitlines()[0])
            return
        names = pf.schema_arrow.names
        if self.cfg.text_field not in names:
            raise PhitrainError(f"{path}: no column {self.cfg.text_field!r} (columns: {names}); set text_field "
                                f"of source {self.cfg.name!r}")
        columns = [self.cfg.text_field] + ([self.cfg.id_field] if self.cfg.id_field in names else [])
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            for rec in batch.to_pylist():
                where = f"{path}:row {row}"
                row += 1
                text = self._record_text(rec, where)
                if text is not None:
                    yield self.doc(self._record_id(rec, where), text)

    def _read_synth(self, doc_id: str, path: str) -> Iterator[Document]:
        """A synth generator's rows: `text`, and `id` (the generator and item number) as the document id."""
        yield from (self._read_parquet if path.endswith(".parquet") else self._read_jsonl)(doc_id, path)

    def _read_web(self, doc_id: str, path: str) -> Iterator[Document]:
        name = path.lower().removesuffix(".gz").removesuffix(".zst")
        if name.endswith(HTML_SUFFIXES):
            yield from self._read_files(doc_id, path)
        elif name.endswith((".warc", ".arc")):
            yield from self._read_warc(path)
        else:
            self.reject("not_web", path, "not a .warc/.html file")

    def _read_warc(self, path: str) -> Iterator[Document]:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        records = 0
        try:
            with open(path, "rb") as f:
                for record in ArchiveIterator(f):
                    if record.rec_type != "response":
                        continue
                    records += 1
                    url = record.rec_headers.get_header("WARC-Target-URI") or f"{path}#{records}"
                    ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                    body = record.content_stream().read()
                    if getattr(record.raw_stream, "limit", 0):   # warcio returns a cut-off record's partial body
                        self.reject("corrupt", f"{path}#{records}", f"{url}: record cut short")
                        continue
                    if "html" not in ctype.lower():
                        self.reject("not_html", url, ctype or "no content type")
                        continue
                    yield self.doc(url, payload=body, url=url, warc=path)
        except (ArchiveLoadFailed, *CORRUPT, OSError) as err:
            # a truncated gzip member or a record cut short: everything before it was read and counted
            self.reject("corrupt", f"{path}#{records + 1}", str(err).splitlines()[0] if str(err) else type(err).__name__)

    # ---- DataTrove step --------------------------------------------------------------------------
    def read_file(self, filepath: str) -> Iterator[Document]:
        """One file of the task's source, by the source's kind (called by DataTrove's `read_files_shard`)."""
        read = {"stdlib": self._read_files, "files": self._read_files, "jsonl": self._read_jsonl,
                "parquet": self._read_parquet, "web": self._read_web, "synth": self._read_synth}[self.cfg.kind]
        return read(self._ids[filepath], filepath)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        self.cfg = self.sources[rank // self.tasks]
        if self.cfg.kind == "synth":   # synth rows always carry `text` and `id`
            self.cfg = self.cfg.model_copy(update={"text_field": "text", "id_field": "id"})
        self.begin(rank)
        files = list_files(self.cfg)
        shard = [files[i] for i in task_range(len(files), rank % self.tasks, self.tasks)]
        self._ids = {path: doc_id for doc_id, path in shard}
        yield from self.read_files_shard([path for _, path in shard])
        self.end()
