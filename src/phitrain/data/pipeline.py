"""`phitrain data prepare`: the phi-1 §2 / Phi-4 §2 data pipeline as DataTrove stages.

Documents stream through DataTrove pipeline steps; no stage holds the corpus in memory. Each stage is one
DataTrove executor (local, Slurm or Ray — the recipe's `executor`), depending on the one before, and
every finished task is marked in `work/logs/<stage>/completions/`, so a re-run (after a crash, a
`kill -9`, a preempted Slurm job) runs only what is left. With T = `executor.tasks` and S sources:

    read          S×T  sources → clean → (web: extract, language, Gopher/FineWeb filters) → work/clean/
                       + MinHash signatures and content hashes
    dedup-buckets  B   DataTrove MinHash stage 2 (B = num_buckets)
    dedup-cluster  1   clusters, first-in-input-order kept (dedup.Clusters)
    dedup         S×T  DataTrove MinHash stage 4 → work/deduped/
    quality-fit    1   annotate a content-hash sample, fit the random forest (phi-1 §2.1)
    filter        S×T  quality filter → decontaminate (13-gram + AST) → exercises → val split
                       → work/docs/<source>/<split>/NNNNN.jsonl
    tokenizer      1   train the BPE on the train documents (or load the recipe's tokenizer)
    shards        S×T  token shards <source>/<split>/shard-NNNNN.*
    report         1   manifests, exercises.jsonl, reports/, stats.json

The order follows phi-1 §2: deduplicate first (the paper filters the *deduplicated* Stack), then score
educational value, then remove anything overlapping the evaluation sets (§5) — the exercises too, since
they are cut from the same code. Output (`DATA_DIR`):
    tokenizer/                 the tokenizer the shards use (Tokenizer.save), picked up by training
    <source>/ manifest.json, train/, val/    one prepared source each (see shards.py), incl. `exercises`
    exercises.jsonl            {"prompt", "completion", "source"} pairs for finetuning
    reports/                   dedup clusters, decontamination matches, quality summary, drop examples
    work/                      intermediate documents, MinHash files, DataTrove logs and completions
    stats.json                 the numbers `phitrain data stats` prints
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from phitrain.config import DataRecipe
from phitrain.data.accounting import drop_examples, merge_task_stats
from phitrain.data.clean import Clean
from phitrain.data.decontam import DecontaminateAndMine
from phitrain.data.dedup import Clusters, CountDedup, Signatures, cluster_report, minhash_config
from phitrain.data.executors import make_executors
from phitrain.data.quality import QualityFilter, QualityFit, QualityModel, sample_key
from phitrain.data.shards import MANIFEST, ShardWriter, token_dtype
from phitrain.data.sources import SourceReader
from phitrain.data.web import WebFilters
from phitrain.errors import PhitrainError
from phitrain.files import atomic_path, atomic_write_text

STATS_FILE = "stats.json"
TOKENIZER_DIR = "tokenizer"


def in_val(text: str, fraction: float) -> bool:
    """Held-out by content hash: deterministic, independent of order and task count, and duplicates (if
    any survived) land on the same side."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", errors="replace")).digest()[:8], "big")
    return h < fraction * 2**64


class TaskFile(JsonlReader):
    """Reads the one JSONL file a previous stage's task `rank` wrote (`NNNNN.jsonl`), so a stage with
    the same task count sees exactly the documents, in the order, that its task of the same rank made.
    No `file_path` metadata: outputs must not depend on where the data directory is."""

    def __init__(self, data_folder: str, **kwargs):
        super().__init__(data_folder, add_file_path=False, **kwargs)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if self.data_folder.isfile(f"{rank:05d}.jsonl"):
            yield from self.read_file(f"{rank:05d}.jsonl")


class Split(PipelineStep):
    """Marks each document `train` or `val` (metadata "split") by content hash and counts them."""

    name = "✂️ val split"
    type = "phitrain"

    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = fraction

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            split = "val" if self.fraction > 0 and in_val(doc.text, self.fraction) else "train"
            doc.metadata["split"] = split
            self.stat_update(f"{doc.metadata['source']}|{split}_docs")
            yield doc


class TrainTokenizer(PipelineStep):
    """Stage `tokenizer` (one task): train the byte-level BPE on the kept train documents, or save the
    recipe's tokenizer. A corpus larger than `train_max_bytes` is sampled evenly (each document kept with
    probability budget / total, by a hash of its text, so the sample spans every source and task and does
    not depend on the task count): the trainer's memory is bounded by the budget, not the corpus."""

    name = "🔤 tokenizer"
    type = "phitrain"

    def __init__(self, recipe: DataRecipe, names: list[str], docs_dir: str, out_dir: str):
        super().__init__()
        self.tcfg, self.names, self.docs_dir, self.out_dir = recipe.tokenizer, names, Path(docs_dir), Path(out_dir)
        self.seed = recipe.seed

    def texts(self):
        files = [path for name in self.names for path in sorted((self.docs_dir / name / "train").glob("*.jsonl"))]
        total = sum(path.stat().st_size for path in files)
        budget = self.tcfg.train_max_bytes
        threshold = 2**64 if budget is None or total <= budget else int(2**64 * budget / total)
        for path in files:
            with path.open(encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    if sample_key(text, self.seed) < threshold:
                        yield text

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from phitrain.tokenizer import load_tokenizer, train_bpe

        if self.tcfg.train:
            texts = self.texts()
            first = next(texts, None)
            if first is None:
                raise PhitrainError("prepare: no train documents left after filtering to train a tokenizer on; "
                                    "see the drop counts in the stage stats under work/logs/")
            train_bpe(itertools.chain([first], texts), self.tcfg.vocab_size, out_dir=self.out_dir)
        else:
            load_tokenizer(self.tcfg.spec).save(self.out_dir)
        return
        yield


class Report(PipelineStep):
    """Stage `report` (one task): manifests, `exercises.jsonl`, `reports/` and `stats.json` from the
    stages' per-task stats and logs."""

    name = "📊 report"
    type = "phitrain"

    def __init__(self, recipe: DataRecipe, out: str):
        super().__init__()
        self.recipe, self.out = recipe, Path(out)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_report(self.recipe, self.out)
        return
        yield


def source_names(recipe: DataRecipe) -> list[str]:
    names = [s.name for s in recipe.sources]
    return names + [recipe.exercises.name] if recipe.exercises.enabled else names


def build_stages(recipe: DataRecipe, out: Path) -> list[tuple[str, list, int]]:
    """(stage name, DataTrove pipeline, tasks) in the order they run."""
    work = out / "work"
    T = recipe.executor.tasks
    R = len(recipe.sources) * T
    mh = minhash_config(recipe.dedup)
    dropped = str(work / "dropped")
    dedup_on = recipe.dedup.exact or recipe.dedup.near
    names = [s.name for s in recipe.sources]
    read = [SourceReader(recipe.sources, T, recipe.clean.invalid_utf8, drop_dir=dropped),
            Clean(recipe.clean, [s.name for s in recipe.sources if s.strict], drop_dir=dropped),
            WebFilters(recipe.sources, T, recipe.web),
            JsonlWriter(str(work / "clean"), output_filename="${rank}.jsonl", compression=None)]
    if dedup_on:
        read.append(Signatures(str(work / "minhash" / "sigs"), mh))
    stages: list[tuple[str, list, int]] = [("read", read, R)]
    if dedup_on:
        stages += [
            ("dedup-buckets", [MinhashDedupBuckets(str(work / "minhash" / "sigs"), str(work / "minhash" / "dups"),
                                                   config=mh)], mh.num_buckets),
            ("dedup-cluster", [Clusters(str(work / "minhash" / "sigs"), str(work / "minhash" / "dups"),
                                        str(work / "minhash" / "remove"), mh, recipe.dedup)], 1),
            ("dedup", [TaskFile(str(work / "clean"), compression=None),
                       CountDedup(str(work / "minhash" / "remove"), str(work / "minhash" / "sigs"), dropped),
                       MinhashDedupFilter(str(work / "minhash" / "remove")),
                       JsonlWriter(str(work / "deduped"), output_filename="${rank}.jsonl", compression=None)], R)]
    docs_in = work / ("deduped" if dedup_on else "clean")
    filt: list = [TaskFile(str(docs_in), compression=None)]
    q = recipe.quality
    if q.enabled:
        scope = q.sources or names
        stages.append(("quality-fit", [QualityFit(q, recipe.seed, scope, str(docs_in), str(work / "quality.pkl"))], 1))
        filt.append(QualityFilter(q, scope, str(work / "quality.pkl"), dropped))
    filt += [DecontaminateAndMine(recipe.decontam, recipe.exercises, recipe.exercises.sources or names, dropped,
                                  str(work / "matches")),
             Split(recipe.shards.val_fraction),
             JsonlWriter(str(work / "docs"), output_filename="${source}/${split}/${rank}.jsonl", compression=None,
                         adapter=_doc_record)]
    stages += [("filter", filt, R),
               ("tokenizer", [TrainTokenizer(recipe, source_names(recipe), str(work / "docs"), str(out / TOKENIZER_DIR))], 1),
               ("shards", [ShardWriter(str(work / "docs"), str(out), str(out / TOKENIZER_DIR))], R),
               ("report", [Report(recipe, str(out))], 1)]
    return stages


def _doc_record(self, document) -> dict:
    """What the filter stage writes per kept document: text, id and metadata (split and source stay in
    the path)."""
    return {"text": document.text, "id": document.id, "metadata": document.metadata}


def _recipe_key(recipe: DataRecipe) -> str:
    """What the finished tasks depend on: the whole recipe, including the task count (it decides which
    documents each task holds), but not where or how many at once the tasks run."""
    data = recipe.model_dump(mode="json")
    data["executor"] = {"tasks": recipe.executor.tasks}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def prepare(recipe: DataRecipe, out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run every stage of the recipe into `out_dir` (skipping tasks finished by an earlier run of the same
    recipe) and return the stats. A changed recipe (or task count) starts over: its work directory is
    cleared, since finished tasks of another recipe are not this one's. On Slurm the stages are submitted
    and an empty dict is returned: the `report` job writes the stats."""
    out = Path(out_dir)
    work = out / "work"
    key_file = work / "recipe.sha256"
    key = _recipe_key(recipe)
    if key_file.is_file() and key_file.read_text() != key:
        if progress:
            print(f"data prepare: the recipe changed since {out} was prepared; starting over", file=sys.stderr)
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    atomic_write_text(key_file, key)
    for src in recipe.sources:   # fail fast, before any task starts, on a path that matches nothing
        if src.kind != "stdlib":
            from phitrain.data.sources import list_files

            list_files(src)
    if any(src.kind == "web" for src in recipe.sources):   # and on a bad web filter setting
        from phitrain.data.web import web_steps

        web_steps(recipe.web)
    stages = build_stages(recipe, out)
    t0 = time.time()
    skipped = run_stages(recipe, stages, out, progress)
    if recipe.executor.kind == "slurm":
        print(f"submitted {len(stages)} Slurm stages; `phitrain data stats {out}` once the `report` job has run")
        return {}
    stats = json.loads((out / STATS_FILE).read_text())
    stats["tasks"] = skipped
    stats["seconds"] = {"total": round(time.time() - t0, 2)}
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1))
    return stats


def run_stages(recipe: DataRecipe, stages, out: Path, progress: bool) -> dict[str, dict]:
    """Run (or, on Slurm, submit) every stage; return per stage how many tasks ran and were skipped."""
    executors = make_executors(recipe.executor, stages, out / "work" / "logs")
    counts: dict[str, dict] = {}
    for (name, _, tasks), ex in zip(stages, executors):
        todo = len(ex.get_incomplete_ranks())
        t = time.time()
        ex.run()
        seconds = round(time.time() - t, 2)
        counts[name] = {"tasks": tasks, "ran": todo, "skipped": tasks - todo, "seconds": seconds}
        if progress and recipe.executor.kind != "slurm":
            print(f"  {name:<14} {tasks:>4} tasks ({tasks - todo} already done)  {seconds:6.1f} s",
                  file=sys.stderr, flush=True)
    return counts


# ---- the report stage --------------------------------------------------------------------------------

def write_report(recipe: DataRecipe, out: Path) -> dict:
    from phitrain.tokenizer import load_tokenizer

    work = out / "work"
    counts: Counter = Counter()
    for stage_stats in sorted((work / "logs").glob("*/stats")):
        counts.update(merge_task_stats(stage_stats))
    per: dict[str, dict] = defaultdict(dict)
    drops: dict[str, dict] = defaultdict(dict)
    for key, value in counts.items():
        source, label = key.split("|", 1)
        if label.startswith("drop:"):
            drops[source][label[5:]] = value
        else:
            per[source][label] = value
    for source, d in drops.items():
        for reason in ("exact_dupe", "near_dupe", "contaminated", "quality"):
            if reason in d:
                per[source][{"exact_dupe": "exact_dupes", "near_dupe": "near_dupes", "contaminated": "contaminated",
                             "quality": "quality_dropped"}[reason]] = d.pop(reason)
    for source, p in per.items():
        if "utf8_replaced" in p:
            drops[source]["utf8_replaced"] = p.pop("utf8_replaced")

    tokenizer = load_tokenizer(out / TOKENIZER_DIR)
    dtype = token_dtype(tokenizer.vocab_size)
    names = source_names(recipe)
    for name in names:
        splits = {}
        for split in ("train", "val"):
            records = [json.loads(p.read_text()) for p in sorted((out / name / split).glob("shard-*.json"))]
            splits[split] = {"docs": sum(r["docs"] for r in records), "tokens": sum(r["tokens"] for r in records),
                             "shards": records}
            per[name][f"{split}_docs"] = splits[split]["docs"]
            per[name][f"{split}_tokens"] = splits[split]["tokens"]
        manifest = {"source": name, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
                    "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                                  "vocab_size": tokenizer.vocab_size, "dir": f"../{TOKENIZER_DIR}"},
                    "splits": splits}
        atomic_write_text(out / name / MANIFEST, json.dumps(manifest, indent=1))

    if recipe.exercises.enabled:   # streamed: the pairs are never all in memory
        with atomic_path(out / "exercises.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
            for path in sorted((work / "docs" / recipe.exercises.name).glob("*/*.jsonl"),
                               key=lambda p: (p.name, p.parent.name)):
                with path.open(encoding="utf-8") as src:
                    for line in src:
                        rec = json.loads(line)
                        f.write(json.dumps({"prompt": rec["metadata"]["prompt"], "completion":
                                            rec["metadata"]["completion"], "source": rec["id"]},
                                           ensure_ascii=False) + "\n")

    reports = out / "reports"
    quality = None
    if recipe.quality.enabled and (work / "quality.pkl").is_file():
        model = QualityModel.load(work / "quality.pkl")
        scored = sum(per[n].get("quality_scored", 0) for n in names)
        kept = sum(per[n].get("quality_kept", 0) for n in names)
        quality = {"documents": scored, "kept": kept, "kept_fraction": kept / scored if scored else 0.0, **model.summary}
        atomic_write_text(reports / "quality.json", json.dumps(quality, indent=1))
    dd = cluster_report(work / "minhash" / "remove", work / "minhash" / "sigs")
    atomic_write_text(reports / "dedup.json", json.dumps({**dd, "threshold": recipe.dedup.threshold}, indent=1))
    matches = [m for p in sorted((work / "matches").glob("*.json")) for m in json.loads(p.read_text())]
    doc_matches = [m for m in matches if m["kind"] == "document"]
    ex_matches = [m for m in matches if m["kind"] == "exercise"]
    from phitrain.data.decontam import Decontaminator

    too_short = Decontaminator.from_config(recipe.decontam).too_short if recipe.decontam.enabled else []
    atomic_write_text(reports / "decontamination.json", json.dumps({
        "benchmarks": [b.name for b in recipe.decontam.benchmarks] if recipe.decontam.enabled else [],
        "ngram": recipe.decontam.ngram, "ast_threshold": recipe.decontam.ast_threshold,
        "benchmark_functions_too_short_for_ast": too_short, "documents": doc_matches, "exercises": ex_matches},
        indent=1))
    examples = drop_examples(work / "dropped") if (work / "dropped").is_dir() else {}
    atomic_write_text(reports / "drops.json", json.dumps(examples, indent=1))

    for name in names:
        per[name]["dropped_clean"] = sum(v for r, v in drops[name].items() if r != "utf8_replaced")
    stats = {
        "sources": {n: {**per[n], "drops": dict(sorted(drops.get(n, {}).items()))} for n in names},
        "quality": quality,
        "dedup": {"exact_clusters": len(dd["exact_clusters"]), "near_clusters": len(dd["near_clusters"]),
                  "exact_dropped": sum(len(c) - 1 for c in dd["exact_clusters"]),
                  "near_dropped": sum(len(c) - 1 for c in dd["near_clusters"])},
        "decontamination": {"document_matches": len(doc_matches), "exercise_matches": len(ex_matches),
                            "task_ids": sorted({m["task_id"] for m in matches})},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "fingerprint": tokenizer.fingerprint, "dtype": dtype.name},
        "executor": recipe.executor.model_dump(),
    }
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1))
    if not any(per[n].get("train_docs", 0) + per[n].get("val_docs", 0) for n in names):
        raise PhitrainError(f"prepare: no documents left after filtering; see the drop counts in {out / STATS_FILE}")
    return stats
