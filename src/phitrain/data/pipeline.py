"""`phitrain data prepare`: raw sources → clean → dedup → quality → decontaminate → exercises →
tokenizer → token shards, with every document accounted for in `stats.json`.

The order follows phi-1 §2: deduplicate first (the paper filters the *deduplicated* Stack), then score
educational value, then remove anything overlapping the evaluation sets (§5) — the exercises too, since
they are cut from the same code. Output (`DATA_DIR`):
    tokenizer/                 the tokenizer the shards use (Tokenizer.save), picked up by training
    <source>/ manifest.json, train/, val/    one prepared source each (see shards.py), incl. `exercises`
    exercises.jsonl            {"prompt", "completion", "source"} pairs for finetuning
    reports/                   dedup clusters, decontamination matches, quality summary, drop examples
    work/<source>.<split>.jsonl  the cleaned documents that were tokenised (inputs of the shards)
    stats.json                 the numbers `phitrain data stats` prints
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phitrain.config import DataRecipe, atomic_write_text
from phitrain.data.clean import clean_document
from phitrain.data.decontam import Decontaminator, parse_python
from phitrain.data.dedup import deduplicate
from phitrain.data.exercises import extract_exercises
from phitrain.data.quality import quality_filter
from phitrain.data.shards import MANIFEST, init_worker, token_dtype, tokenize_splits
from phitrain.data.sources import Drops, iter_source
from phitrain.errors import PhitrainError

STATS_FILE = "stats.json"
TOKENIZER_DIR = "tokenizer"


class _Progress:
    """Rich progress bars on stderr (one per stage), or nothing when `enabled` is false."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True))

    def __enter__(self) -> "_Progress":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    @contextmanager
    def stage(self, description: str, total: int | None) -> Iterator:
        if self.bar is None:
            yield lambda n=1: None
            return
        task = self.bar.add_task(description, total=total)
        yield lambda n=1: self.bar.advance(task, n)
        done = self.bar.tasks[task].total or self.bar.tasks[task].completed
        self.bar.update(task, total=done, completed=done)


def _in_val(text: str, fraction: float) -> bool:
    """Held-out by content hash: deterministic, independent of order, and duplicates (if any survived)
    land on the same side."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", errors="replace")).digest()[:8], "big")
    return h < fraction * 2**64


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _split_docs(docs: list[tuple[str, str]], fraction: float) -> dict[str, list[tuple[str, str]]]:
    val = [d for d in docs if _in_val(d[1], fraction)] if fraction > 0 else []
    if fraction > 0 and not val and len(docs) >= 2:
        # a small source would otherwise have no validation data at all: hold out its lowest-hash document
        val = [min(docs, key=lambda d: hashlib.sha256(d[1].encode("utf-8", errors="replace")).digest())]
    val_ids = {id(d) for d in val}
    return {"train": [d for d in docs if id(d) not in val_ids], "val": val}


def _load_or_train_tokenizer(recipe: DataRecipe, out: Path, train_files: list[Path]):
    from phitrain.tokenizer import load_tokenizer, train_bpe

    tcfg = recipe.tokenizer
    tok_dir = out / TOKENIZER_DIR
    if not tcfg.train:
        tok = load_tokenizer(tcfg.spec)
        tok.save(tok_dir)
        return tok, False
    key = hashlib.sha256()
    key.update(f"{tcfg.vocab_size}:{tcfg.train_max_bytes}".encode())
    for p in train_files:
        key.update(hashlib.sha256(p.read_bytes()).digest())
    key_file = out / "work" / "tokenizer.key"
    if tok_dir.is_dir() and key_file.is_file() and key_file.read_text() == key.hexdigest():
        return load_tokenizer(tok_dir), True

    def texts() -> Iterator[str]:
        budget = tcfg.train_max_bytes
        for p in train_files:
            with p.open(encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    yield text
                    if budget is not None:
                        budget -= len(text)
                        if budget <= 0:
                            return

    tok = train_bpe(texts(), tcfg.vocab_size, out_dir=tok_dir)
    atomic_write_text(key_file, key.hexdigest())
    return tok, False


def prepare(recipe: DataRecipe, out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run the whole recipe into `out_dir` and return (and write) the stats. Re-running with the same
    recipe reuses the trained tokenizer and every finished shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}
    drops = Drops()
    per: dict[str, Counter] = defaultdict(Counter)
    reports: dict[str, object] = {}

    with _Progress(progress) as bars:
        # 1. read + clean ---------------------------------------------------------------------------
        source_of: list[str] = []
        ids: list[str] = []
        texts: list[str] = []
        for src in recipe.sources:
            with bars.stage(f"read {src.name}", None) as tick:
                for doc_id, payload in iter_source(src, drops, recipe.clean.invalid_utf8):
                    per[src.name]["read"] += 1
                    per[src.name]["read_bytes"] += len(payload)
                    text, reason = clean_document(payload, recipe.clean)
                    tick()
                    if text is None:
                        drops.add(src.name, reason, doc_id, src.strict)
                        continue
                    if reason:
                        drops.add(src.name, reason, doc_id, src.strict)
                        per[src.name]["utf8_replaced"] += 1
                    per[src.name]["cleaned"] += 1
                    source_of.append(src.name)
                    ids.append(doc_id)
                    texts.append(text)
        for name, counts in drops.counts.items():
            per[name]["dropped_clean"] = sum(v for r, v in counts.items() if r != "utf8_replaced")
        if not texts:
            raise PhitrainError("prepare: no documents left after reading and cleaning; see the drop counts "
                                f"{ {s: dict(c) for s, c in drops.counts.items()} }")
        timings["read_clean"] = time.time() - t0

        # 2. dedup ----------------------------------------------------------------------------------
        t = time.time()
        with bars.stage("dedup", len(texts)) as tick:
            dd = deduplicate(ids, texts, recipe.dedup, progress=tick)
        where = dict(zip(ids, source_of))
        for c in dd.exact_clusters:
            for d in c[1:]:
                per[where[d]]["exact_dupes"] += 1
        for c in dd.near_clusters:
            for d in c[1:]:
                per[where[d]]["near_dupes"] += 1
        reports["dedup"] = {"exact_clusters": dd.exact_clusters, "near_clusters": dd.near_clusters,
                            "threshold": recipe.dedup.threshold}
        alive = [i for i, k in enumerate(dd.keep) if k]
        timings["dedup"] = time.time() - t

        # 3. quality --------------------------------------------------------------------------------
        t = time.time()
        qcfg = recipe.quality
        if qcfg.enabled:
            scope = set(qcfg.sources or [s.name for s in recipe.sources])
            cand = [i for i in alive if source_of[i] in scope]
            with bars.stage("quality", len(cand)) as tick:
                q = quality_filter([texts[i] for i in cand], qcfg, recipe.seed, progress=tick)
            rejected = {i for i, k in zip(cand, q.keep) if not k}
            for i in cand:
                per[source_of[i]]["quality_scored"] += 1
                per[source_of[i]]["quality_dropped" if i in rejected else "quality_kept"] += 1
            alive = [i for i in alive if i not in rejected]
            reports["quality"] = q.summary()
        timings["quality"] = time.time() - t

        # 4. decontaminate (+ 5. extract exercises from what survives, sharing one parse per doc) -----
        t = time.time()
        deco = Decontaminator.from_config(recipe.decontam) if recipe.decontam.enabled else None
        ex_scope = set(recipe.exercises.sources or [s.name for s in recipe.sources])
        matches, exercises, kept = [], [], []
        with bars.stage("decontaminate", len(alive)) as tick:
            for i in alive:
                tick()
                tree = parse_python(texts[i])
                found = deco.check(ids[i], texts[i], tree) if deco else []
                if found:
                    matches.extend(m.as_dict() for m in found)
                    per[source_of[i]]["contaminated"] += 1
                    continue
                kept.append(i)
                if recipe.exercises.enabled and source_of[i] in ex_scope:
                    exercises.extend(extract_exercises(ids[i], texts[i], recipe.exercises, tree))
        ex_matches = []
        if deco:
            clean_ex = []
            for ex in exercises:
                found = deco.check(f"exercise {ex['source']}", ex["prompt"] + ex["completion"])
                ex_matches.extend(m.as_dict() for m in found)
                if not found:
                    clean_ex.append(ex)
            exercises = clean_ex
        reports["decontamination"] = {
            "benchmarks": [b.name for b in recipe.decontam.benchmarks] if deco else [],
            "ngram": recipe.decontam.ngram, "ast_threshold": recipe.decontam.ast_threshold,
            "benchmark_functions_too_short_for_ast": deco.too_short if deco else [],
            "documents": matches, "exercises": ex_matches}
        timings["decontam_exercises"] = time.time() - t

        # 6. write cleaned documents per source and split --------------------------------------------
        by_source: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i in kept:
            by_source[source_of[i]].append((ids[i], texts[i]))
        del texts
        names = [s.name for s in recipe.sources]
        if recipe.exercises.enabled:
            ex_name = recipe.exercises.name
            names.append(ex_name)
            by_source[ex_name] = [(e["source"], e["prompt"] + e["completion"]) for e in exercises]
            per[ex_name]["extracted"] = len(exercises) + len({m["doc_id"] for m in ex_matches})
            per[ex_name]["contaminated"] = len({m["doc_id"] for m in ex_matches})
            _write_jsonl(out / "exercises.jsonl", exercises)
        work = out / "work"
        split_files: dict[tuple[str, str], Path] = {}
        for name in names:
            for split, docs in _split_docs(by_source.get(name, []), recipe.shards.val_fraction).items():
                path = work / f"{name}.{split}.jsonl"
                _write_jsonl(path, ({"id": d, "text": x} for d, x in docs))
                split_files[(name, split)] = path
        by_source.clear()

        # 7. tokenizer ------------------------------------------------------------------------------
        t = time.time()
        train_files = [split_files[(n, "train")] for n in names]
        with bars.stage("tokenizer", 1) as tick:
            tokenizer, reused = _load_or_train_tokenizer(recipe, out, train_files)
            tick()
        timings["tokenizer"] = time.time() - t

        # 8. shards ---------------------------------------------------------------------------------
        t = time.time()
        jobs = [(path, out / name / split) for (name, split), path in split_files.items()]
        workers = recipe.shards.workers or os.cpu_count() or 1
        total_bytes = sum(p.stat().st_size for p, _ in jobs)
        with bars.stage("tokenize → shards", total_bytes) as tick:
            if workers > 1:
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                         initargs=(tokenizer,)) as pool:
                    results = tokenize_splits(jobs, tokenizer, recipe.shards.shard_bytes, pool, tick)
            else:
                results = tokenize_splits(jobs, tokenizer, recipe.shards.shard_bytes, None, tick)
        timings["shards"] = time.time() - t
        dtype = token_dtype(tokenizer.vocab_size)
        shards_skipped = 0
        for name in names:
            splits = {split: results[out / name / split] for split in ("train", "val")}
            for split, r in splits.items():
                per[name][f"{split}_docs"] = r["docs"]
                per[name][f"{split}_tokens"] = r["tokens"]
                shards_skipped += r.pop("skipped")
            manifest = {"source": name, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
                        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                                      "vocab_size": tokenizer.vocab_size, "dir": f"../{TOKENIZER_DIR}"},
                        "splits": splits}
            atomic_write_text(out / name / MANIFEST, json.dumps(manifest, indent=1))

    timings["total"] = time.time() - t0
    reports_dir = out / "reports"
    for key in ("dedup", "decontamination", "quality"):
        if key in reports:
            atomic_write_text(reports_dir / f"{key}.json", json.dumps(reports[key], indent=1))
    atomic_write_text(reports_dir / "drops.json", json.dumps(drops.as_dict(), indent=1))
    stats = {
        "sources": {n: {**dict(per[n]), "drops": dict(drops.counts.get(n, {}))} for n in names},
        "quality": reports.get("quality"),
        "dedup": {"exact_clusters": len(dd.exact_clusters), "near_clusters": len(dd.near_clusters),
                  "exact_dropped": dd.exact_dropped, "near_dropped": dd.near_dropped},
        "decontamination": {"document_matches": len(matches), "exercise_matches": len(ex_matches),
                            "task_ids": sorted({m["task_id"] for m in matches + ex_matches})},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "fingerprint": tokenizer.fingerprint, "reused": reused, "dtype": dtype.name},
        "shards": {"workers": workers, "skipped": shards_skipped},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1))
    return stats
