"""Token shards: documents tokenised in parallel into memory-mapped arrays, plus the reader over them.

Layout of one prepared source (`DATA_DIR/<source>/`):
    manifest.json                 source, tokenizer fingerprint, dtype, per-split doc/token counts
    train/shard-00000.bin         tokens (uint16 when the vocabulary fits, else uint32), documents each
                                  followed by <|endoftext|> (phi-1 §2.3: files joined by the EOS token)
    train/shard-00000.idx.npy     int64 end offset of each document within the shard
    train/shard-00000.json        the shard's record, written last: its presence marks the shard finished
    val/...                       the held-out split, same layout
Each shard is the tokenisation of one byte range of the cleaned-documents JSONL. A shard whose record
names the same input hash and tokenizer fingerprint is skipped on a re-run, so an interrupted prepare
resumes where it stopped and an unchanged corpus is not tokenised twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable

import numpy as np

from phitrain.config import atomic_write_text
from phitrain.errors import PhitrainError
from phitrain.files import read_json

MANIFEST = "manifest.json"
_ENCODE_BATCH = 256  # documents per encode_batch call: bounds a worker's memory to a few MB of ids

_worker_tokenizer = None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits (vocab ≤ 65,536)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def plan_chunks(path: Path, shard_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `shard_bytes` that end on line boundaries (one JSONL document per line),
    found by seeking, so the parent never holds the corpus in memory."""
    size = path.stat().st_size
    chunks, pos = [], 0
    with path.open("rb") as f:
        while pos < size:
            f.seek(min(pos + shard_bytes, size) - 1)
            f.readline()
            end = min(f.tell(), size)
            chunks.append((pos, end))
            pos = end
    return chunks


def init_worker(tokenizer) -> None:
    """Pool initializer: one tokenizer per process; its own Rust threads are turned off because the pool
    already keeps every core busy (two levels of parallelism would only contend)."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_array(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            arr.tofile(f)
    _atomic_save(path, write)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, arr)
    _atomic_save(path, write)


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


def tokenize_chunk(docs_path: str, start: int, end: int, out_dir: str, index: int, tokenizer=None) -> dict:
    """Tokenise the documents in bytes [start, end) of `docs_path` into shard `index` of `out_dir` and
    return the shard's record. Runs in a worker process (or inline when `tokenizer` is given)."""
    tok = tokenizer or _worker_tokenizer
    out = Path(out_dir)
    name = shard_name(index)
    with open(docs_path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    input_sha = hashlib.sha256(data).hexdigest()
    record_path = out / f"{name}.json"
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
            if old.get("input_sha256") == input_sha and old.get("tokenizer") == tok.fingerprint \
                    and (out / old["file"]).is_file() and (out / old["index"]).is_file():
                return {**old, "skipped": True}
        except (json.JSONDecodeError, KeyError):
            pass
    texts = [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
    del data
    dtype = token_dtype(tok.vocab_size)
    parts: list[np.ndarray] = []
    ends = np.empty(len(texts), dtype=np.int64)
    total = 0
    for b in range(0, len(texts), _ENCODE_BATCH):
        for j, ids in enumerate(_encode(tok, texts[b:b + _ENCODE_BATCH])):
            arr = np.empty(len(ids) + 1, dtype=dtype)
            arr[:-1] = ids
            arr[-1] = tok.eos_id
            parts.append(arr)
            total += len(arr)
            ends[b + j] = total
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    _write_array(out / f"{name}.bin", tokens)
    _write_npy(out / f"{name}.idx.npy", ends)
    record = {"file": f"{name}.bin", "index": f"{name}.idx.npy", "docs": len(texts), "tokens": int(total),
              "bytes": end - start, "input_sha256": input_sha, "tokenizer": tok.fingerprint}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return {**record, "skipped": False}


def tokenize_splits(jobs: list[tuple[Path, Path]], tokenizer, shard_bytes: int, pool: Executor | None,
                    progress: Callable[[int], None] | None = None) -> dict[Path, dict]:
    """Tokenise each `(docs_jsonl, out_dir)` job into shards, all shards of all jobs through one pool so
    small sources still keep every worker busy. Returns, per out_dir, {docs, tokens, shards, skipped}."""
    tasks = []
    for docs_path, out_dir in jobs:
        out_dir.mkdir(parents=True, exist_ok=True)
        chunks = plan_chunks(docs_path, shard_bytes) if docs_path.stat().st_size else []
        # shards left over from an earlier, larger run of this split would be read as data: remove them
        for stale in out_dir.glob("shard-*"):
            stem = stale.name.split(".")[0]
            if int(stem.split("-")[1]) >= len(chunks):
                stale.unlink()
        for i, (s, e) in enumerate(chunks):
            tasks.append((out_dir, (str(docs_path), s, e, str(out_dir), i)))
    results: dict[Path, dict] = {out: {"docs": 0, "tokens": 0, "shards": [], "skipped": 0} for _, out in jobs}
    if pool is None:
        records = (tokenize_chunk(*args, tokenizer=tokenizer) for _, args in tasks)
    else:
        records = pool.map(tokenize_chunk, *zip(*(args for _, args in tasks))) if tasks else iter(())
    for (out_dir, args), rec in zip(tasks, records):
        r = results[out_dir]
        r["docs"] += rec["docs"]
        r["tokens"] += rec["tokens"]
        r["skipped"] += rec.pop("skipped")
        r["shards"].append(rec)
        if progress:
            progress(args[2] - args[1])
    return results


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
        self.shards: list[np.ndarray] = []
        seg_shard, seg_start, seg_len = [], [], []
        self.docs = 0
        for k, rec in enumerate(info["shards"]):
            path = self.dir / split / rec["file"]
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
            ends = np.load(self.dir / split / rec["index"])
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


def read_manifest(source_dir: Path) -> dict:
    if not (source_dir / MANIFEST).is_file():
        raise PhitrainError(f"{source_dir}: not a prepared source (no {MANIFEST}); run `phitrain data prepare`")
    return read_json(source_dir / MANIFEST)
