"""Tokenise-and-shard throughput: phitrain's sharder vs HF `datasets.map` with the same tokenizer.

Corpus: the installed Python standard library (small: without its test suites; large: with them, ~3x
the bytes), written as JSONL the way `phitrain data prepare` stores cleaned documents. Tokenizers, each
used by both sides: "bpe" (phi-1 style byte-level BPE trained here with train_bpe, vocab 8192, HF
`tokenizers` backend) and "cl100k" (phi-4's tiktoken cl100k_base).
- phitrain: `tokenize_splits` — byte ranges of the JSONL tokenised by a process pool (spawn, one worker
  per core, each tokenizer single-threaded) straight into memory-mapped uint16 shards.
- baseline: `datasets.load_dataset("json")` → `.map(batched=True, num_proc=<cores>)` with the same
  `encode_batch`, then the ids concatenated into one uint16 file in 1,024-row batches (the common
  nanoGPT-style prepare script), with a fresh cache directory.
The tokenizer's own speed bounds both sides; the difference is the pipeline around it.
Each run is a separate process; a sampler thread reads /proc every 50 ms and records the peak memory of
the run's whole process tree (sum of PSS, so pages shared by forked workers count once; ru_maxrss is not
used because Linux carries it over from the forking parent). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/data_speed.py [--sizes small,large] [--tokenizers bpe,cl100k] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _write_corpus(path: Path, include_tests: bool) -> int:
    from phitrain.config import CleanConfig, DataSourceConfig
    from phitrain.data.clean import clean_document
    from phitrain.data.sources import Drops, iter_source

    n = 0
    with path.open("w", encoding="utf-8") as f:
        for doc_id, payload in iter_source(DataSourceConfig(name="stdlib", kind="stdlib",
                                                            include_tests=include_tests), Drops()):
            text, _ = clean_document(payload, CleanConfig())
            if text is not None:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                n += 1
    return n


def _run_phitrain(docs: Path, out: Path, tok_spec: str, workers: int) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from phitrain.data.shards import init_worker, tokenize_splits
    from phitrain.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_spec)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=init_worker, initargs=(tok,)) as pool:
        res = tokenize_splits([(docs, out)], tok, 2_000_000, pool)
    return {"seconds": time.perf_counter() - t0, "tokens": res[out]["tokens"]}


def _run_baseline(docs: Path, out: Path, tok_spec: str, workers: int) -> dict:
    import numpy as np
    from datasets import disable_progress_bars, load_dataset

    from phitrain.data.shards import token_dtype
    from phitrain.tokenizer import load_tokenizer

    disable_progress_bars()
    tok = load_tokenizer(tok_spec)
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_id
    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=str(docs), split="train", cache_dir=str(out / "hf-cache"))

    def encode(batch):
        return {"ids": [ids + [eos] for ids in tok.encode_batch(batch["text"])]}

    ds = ds.map(encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    total = 0
    with (out / "tokens.bin").open("wb") as f:
        for batch in ds.iter(batch_size=1024):
            arr = np.concatenate([np.asarray(x, dtype=dtype) for x in batch["ids"]])
            arr.tofile(f)
            total += len(arr)
    return {"seconds": time.perf_counter() - t0, "tokens": total}


def _tree_memory_mb(root: int) -> tuple[float, float]:
    """(PSS of `root`, PSS of all its descendants) in MB, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = set(), {root}
    while frontier:
        tree |= frontier
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in tree}

    def pss(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    return pss(root), sum(pss(p) for p in tree - {root})


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop, self.peak_self, self.peak_children, self.peak_total = threading.Event(), 0.0, 0.0, 0.0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            own, kids = _tree_memory_mb(os.getpid())
            self.peak_self = max(self.peak_self, own)
            self.peak_children = max(self.peak_children, kids)
            self.peak_total = max(self.peak_total, own + kids)


def _child(args: argparse.Namespace) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # both sides parallelise with processes
    fn = _run_phitrain if args.run == "phitrain" else _run_baseline
    sampler = _PeakSampler()
    sampler.start()
    result = fn(Path(args.docs), Path(args.out), args.tokenizer, args.workers)
    sampler.stop.set()
    sampler.join()
    result.update(peak_self_mb=sampler.peak_self, peak_children_mb=sampler.peak_children,
                  peak_total_mb=sampler.peak_total)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--tokenizers", default="bpe,cl100k")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--run", choices=["phitrain", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--docs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        _child(args)
        return

    from rich.console import Console
    from rich.table import Table

    from phitrain.tokenizer import train_bpe

    rows = []
    with tempfile.TemporaryDirectory(prefix="phitrain-bench-") as tmp:
        tmp = Path(tmp)
        corpora = {}
        for size in args.sizes.split(","):
            path = tmp / f"{size}.jsonl"
            n = _write_corpus(path, include_tests=(size == "large"))
            corpora[size] = (path, n)
        specs = {}
        for name in args.tokenizers.split(","):
            if name == "bpe":
                small = corpora[next(iter(corpora))][0]
                train_bpe((json.loads(line)["text"] for line in small.open(encoding="utf-8")), 8192,
                          out_dir=tmp / "bpe")
                specs[name] = str(tmp / "bpe")
            elif name == "cl100k":
                specs[name] = "cl100k_base"
            else:
                sys.exit(f"--tokenizers: unknown {name!r} (bpe, cl100k)")
        for tok_name, spec in specs.items():
            for size, (path, n) in corpora.items():
                mb = path.stat().st_size / 1e6
                for run in ("phitrain", "baseline"):
                    out = tmp / f"out-{tok_name}-{size}-{run}"
                    out.mkdir()
                    proc = subprocess.run([sys.executable, __file__, "--run", run, "--docs", str(path), "--out", str(out),
                                           "--tokenizer", spec, "--workers", str(args.workers)],
                                          capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"{run} on {size} failed:\n{proc.stderr[-3000:]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append({"tokenizer": tok_name, "corpus": size, "docs": n, "mb": round(mb, 2), "impl": run,
                                 "seconds": round(r["seconds"], 2), "mb_per_s": round(mb / r["seconds"], 2),
                                 "tokens": r["tokens"], "peak_mb": round(r["peak_total_mb"], 1),
                                 "peak_main_mb": round(r["peak_self_mb"], 1),
                                 "peak_workers_mb": round(r["peak_children_mb"], 1)})
    table = Table(title=f"tokenise + shard the stdlib ({args.workers} workers)")
    for col in ("tokenizer", "corpus", "docs", "MB", "impl", "seconds", "MB/s", "tokens", "peak MB (all)", "main MB", "workers MB"):
        table.add_column(col, justify="left" if col in ("tokenizer", "corpus", "impl") else "right")
    for r in rows:
        table.add_row(r["tokenizer"], r["corpus"], f"{r['docs']:,}", f"{r['mb']}", r["impl"], f"{r['seconds']}", f"{r['mb_per_s']}",
                      f"{r['tokens']:,}", f"{r['peak_mb']}", f"{r['peak_main_mb']}", f"{r['peak_workers_mb']}")
    Console(width=140).print(table)
    speedup = {}
    for tok_name in specs:
        for size in corpora:
            pick = [r for r in rows if r["corpus"] == size and r["tokenizer"] == tok_name]
            ours = next(r for r in pick if r["impl"] == "phitrain")
            base = next(r for r in pick if r["impl"] == "baseline")
            if ours["tokens"] != base["tokens"]:
                sys.exit(f"token counts differ ({tok_name}, {size}): phitrain {ours['tokens']} vs {base['tokens']}")
            speedup[f"{tok_name}/{size}"] = round(ours["mb_per_s"] / base["mb_per_s"], 2)
    print(json.dumps({"benchmark": "data_speed", "workers": args.workers, "speedup": speedup, "rows": rows}))


if __name__ == "__main__":
    main()
