"""Token shards: documents tokenised into memory-mapped arrays, plus the reader over them (which also
reads DataTrove's own tokenized output).

Layout of one prepared source (`DATA_DIR/<source>/`):
    manifest.json                 source, tokenizer fingerprint, dtype, per-split doc/token counts
    train/shard-NNNNN.bin         task NNNNN's tokens (uint16 when the vocabulary fits, else uint32),
                                  documents each followed by <|endoftext|> (phi-1 §2.3: files joined by EOS)
    train/shard-NNNNN.idx.npy     int64 end offset of each document within the shard
    train/shard-NNNNN.json        the shard's record, written last: its presence marks the shard finished
    val/...                       the held-out split, same layout
A shard whose record names the same input hash and tokenizer fingerprint is skipped on a re-run.

DataTrove interop: a directory of DataTrove `DocumentTokenizer` output (`NNNNN.ds` tokens, `.ds.index`
uint64 document ends, `.ds.metadata` with the tokenizer name and token size) is a prepared source too:
`TokenStream` reads it directly (uint16 or uint32 by its metadata), so existing DataTrove data trains
without conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from datatrove.pipeline.base import PipelineStep

from phitrain.errors import PhitrainError
from phitrain.files import atomic_path, atomic_write_text, read_json

MANIFEST = "manifest.json"
# Text per encode_batch call. Bounded in bytes, not documents: the tokenizer's per-token objects (HF
# Encodings, then Python ints) take ~100 bytes a token, so 256 documents of a large-file corpus could
# take hundreds of MB; 1 MB of text stays near 40 MB whatever the documents' sizes.
_ENCODE_BYTES = 1 << 20



def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits (vocab ≤ 65,536)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, arr)


def _batches(lines) -> Iterator[list[str]]:
    """The `text` of each JSONL line, grouped into lists of about `_ENCODE_BYTES` (at least one text)."""
    batch: list[str] = []
    size = 0
    for line in lines:
        batch.append(json.loads(line)["text"])
        size += len(line)
        if size >= _ENCODE_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tok, texts: list[str]) -> list[list[int]]:
    """Single-threaded encoding for a pool worker. tiktoken-backed kinds encode one text at a time:
    their `encode_batch` starts a thread pool per call, which only contends with the other workers
    (measured ~10% slower per process); HF-backed kinds use their Rust batch loop (faster than a
    Python loop, and single-threaded here because TOKENIZERS_PARALLELISM is off)."""
    if tok.kind in ("tiktoken", "codegen"):
        return [tok.encode(t) for t in texts]
    return tok.encode_batch(texts)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(docs_path: Path, out_dir: Path, index: int, tok) -> dict:
    """Tokenise the documents of one JSONL file (one task's share of a source and split) into shard
    `index` of `out_dir` and return the shard's record. Streams: documents are read, encoded and appended
    about `_ENCODE_BYTES` of text at a time, so memory does not grow with the file or its documents. A shard whose record names the same
    input hash and tokenizer fingerprint is kept as it is."""
    name = shard_name(index)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with docs_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    input_sha = digest.hexdigest()
    record_path = out_dir / f"{name}.json"
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
            if old.get("input_sha256") == input_sha and old.get("tokenizer") == tok.fingerprint \
                    and (out_dir / old["file"]).is_file() and (out_dir / old["index"]).is_file():
                return {**old, "skipped": True}
        except (json.JSONDecodeError, KeyError):
            pass
    dtype = token_dtype(tok.vocab_size)
    ends: list[int] = []
    total = 0

    with atomic_path(out_dir / f"{name}.bin") as tmp, docs_path.open(encoding="utf-8") as src, tmp.open("wb") as out:
        for texts in _batches(src):
            for ids in _encode(tok, texts):
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = tok.eos_id
                arr.tofile(out)
                total += len(arr)
                ends.append(total)
    _write_npy(out_dir / f"{name}.idx.npy", np.asarray(ends, dtype=np.int64))
    record = {"file": f"{name}.bin", "index": f"{name}.idx.npy", "docs": len(ends), "tokens": int(total),
              "bytes": docs_path.stat().st_size, "input_sha256": input_sha, "tokenizer": tok.fingerprint}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return {**record, "skipped": False}


class ShardWriter(PipelineStep):
    """Stage `shards`: task r tokenises its own document files (`work/docs/<source>/<split>/r.jsonl`) into
    `<source>/<split>/shard-r.*`. Tasks are the unit of parallelism, so the shards of a given input and
    task count are the same bytes however many workers run them."""

    name = "🔢 token shards"
    type = "phitrain"

    def __init__(self, docs_dir: str, out_dir: str, tokenizer_dir: str):
        super().__init__()
        self.docs_dir, self.out_dir, self.tokenizer_dir = Path(docs_dir), Path(out_dir), tokenizer_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from phitrain.tokenizer import load_tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"   # tasks already keep every core busy
        tok = load_tokenizer(self.tokenizer_dir)
        for path in sorted(self.docs_dir.glob(f"*/*/{rank:05d}.jsonl")):
            split, source = path.parent.name, path.parent.parent.name
            rec = write_shard(path, self.out_dir / source / split, rank, tok)
            self.stat_update(f"{source}|{split}_shards", f"{source}|shards_skipped" if rec["skipped"] else
                             f"{source}|shards_written")
        return
        yield


class TokenStream:
    """One split of one prepared source as a single token sequence (shards in order), memory-mapped.

    With `min_doc_tokens` only documents of at least that many tokens (EOS excluded) are kept — the
    long-context selection of phi-4 midtraining (§3: documents over 8K tokens). The stream is a list of
    segments (shard, start, length); `read(pos, n)` gathers n tokens across segment boundaries."""

    def __init__(self, source_dir: str | os.PathLike, split: str, min_doc_tokens: int = 0):
        self.dir = Path(source_dir)
        self.manifest = read_manifest(self.dir)
        self.split = split
        info = self.manifest["splits"].get(split)
        if info is None:
            raise PhitrainError(f"{self.dir / MANIFEST}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self.dtype = np.dtype(self.manifest["dtype"])
        base = self.dir if self.manifest.get("layout") == "datatrove" else self.dir / split
        self.shards: list[np.ndarray] = []
        seg_shard, seg_start, seg_len = [], [], []
        self.docs = 0
        for k, rec in enumerate(info["shards"]):
            path = base / rec["file"]
            if not path.is_file():
                raise PhitrainError(f"{path}: shard listed in the manifest is missing; re-run `phitrain data prepare`")
            n = path.stat().st_size // self.dtype.itemsize
            if n != rec["tokens"]:
                raise PhitrainError(f"{path}: has {n} tokens, the manifest says {rec['tokens']}; re-run prepare")
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r") if n else np.empty(0, self.dtype))
            if min_doc_tokens <= 0:
                if n:
                    seg_shard.append(k), seg_start.append(0), seg_len.append(n)
                self.docs += rec["docs"]
                continue
            ends = _load_ends(base / rec["index"])
            starts = np.concatenate([[0], ends[:-1]])
            keep = (ends - starts - 1) >= min_doc_tokens
            self.docs += int(keep.sum())
            for s, e in _runs(starts[keep], ends[keep]):
                seg_shard.append(k), seg_start.append(s), seg_len.append(e - s)
        self.seg_shard = np.asarray(seg_shard, dtype=np.int64)
        self.seg_start = np.asarray(seg_start, dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(np.asarray(seg_len, dtype=np.int64))])
        self.tokens = int(self.cum[-1])

    def __len__(self) -> int:
        return self.tokens

    def read(self, pos: int, n: int) -> np.ndarray:
        if pos < 0 or pos + n > self.tokens:
            raise IndexError(f"read [{pos}, {pos + n}) outside a stream of {self.tokens} tokens")
        out = np.empty(n, dtype=np.int64)
        seg = int(np.searchsorted(self.cum, pos, side="right")) - 1
        filled = 0
        while filled < n:
            off = pos + filled - int(self.cum[seg])
            take = min(n - filled, int(self.cum[seg + 1] - self.cum[seg]) - off)
            start = int(self.seg_start[seg]) + off
            out[filled:filled + take] = self.shards[int(self.seg_shard[seg])][start:start + take]
            filled += take
            seg += 1
        return out


def _runs(starts: np.ndarray, ends: np.ndarray):
    """Merge adjacent [start, end) document spans into maximal contiguous runs."""
    if len(starts) == 0:
        return
    run_s, run_e = int(starts[0]), int(ends[0])
    for s, e in zip(starts[1:].tolist(), ends[1:].tolist()):
        if s == run_e:
            run_e = e
        else:
            yield run_s, run_e
            run_s, run_e = s, e
    yield run_s, run_e


def _load_ends(path: Path) -> np.ndarray:
    """Document end offsets: phitrain's `.idx.npy`, or DataTrove's raw little-endian uint64 `.ds.index`."""
    if path.suffix == ".npy":
        return np.load(path)
    return np.fromfile(path, dtype="<u8").astype(np.int64)


def datatrove_manifest(source_dir: Path) -> dict | None:
    """A manifest for a folder of DataTrove `DocumentTokenizer` output (all of it is the `train` split),
    or None when the folder holds no `.ds` files. The token size (2 or 4 bytes) comes from each file's
    size over its token count in `.ds.metadata` (the tokenizer name on line 1, the token count on 2)."""
    files = sorted(source_dir.glob("*.ds"))
    if not files:
        return None
    shards, names, dtypes = [], set(), set()
    for f in files:
        meta_path = f.with_name(f.name + ".metadata")
        index = f.with_name(f.name + ".index")
        if not meta_path.is_file() or not index.is_file():
            raise PhitrainError(f"{f}: DataTrove tokens without their .ds.index and .ds.metadata files")
        lines = meta_path.read_text().splitlines()
        try:
            name, count = lines[0], int(lines[1])
        except (IndexError, ValueError):
            raise PhitrainError(f"{meta_path}: expected the tokenizer name and the token count on two lines") from None
        size = f.stat().st_size // max(count, 1)
        if count and size not in (2, 4):
            raise PhitrainError(f"{f}: {f.stat().st_size} bytes for {count} tokens is neither uint16 nor uint32")
        names.add(name)
        dtypes.add("uint32" if size == 4 else "uint16")
        shards.append({"file": f.name, "index": index.name, "docs": index.stat().st_size // 8, "tokens": count})
    if len(dtypes) > 1 or len(names) > 1:
        raise PhitrainError(f"{source_dir}: DataTrove files disagree on tokenizer or token size ({names}, {dtypes})")
    return {"source": source_dir.name, "layout": "datatrove", "dtype": dtypes.pop(),
            "tokenizer": {"kind": "datatrove", "fingerprint": f"datatrove:{names.pop()}"},
            "splits": {"train": {"shards": shards, "docs": sum(s["docs"] for s in shards),
                                 "tokens": sum(s["tokens"] for s in shards)}}}


def read_manifest(source_dir: Path) -> dict:
    if not (source_dir / MANIFEST).is_file():
        manifest = datatrove_manifest(source_dir) if source_dir.is_dir() else None
        if manifest is not None:
            return manifest
        raise PhitrainError(f"{source_dir}: not a prepared source (no {MANIFEST}); run `phitrain data prepare`")
    return read_json(source_dir / MANIFEST)
