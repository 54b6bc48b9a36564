"""`phitrain data prepare` at 1x, 4x, 16x a corpus of real code: wall time, peak memory, throughput; and
tokenise + shard throughput against HF `datasets.map` with the same tokenizer (issue 9, "Benchmarks").

Corpus: `.py` files nobody here wrote, in a fixed order — the standard library (as the `stdlib` source
lists it, then its test suites), then the installed torch and transformers, then every other installed
package — each file once. Scale k is the first k x `--base-mb` MB of that list, so the 16x corpus is 16x
*distinct* code (plain copies would all be removed by deduplication). Each scale is a directory of
symlinks read as a `files` source; the rest of the recipe is `--recipe` (default recipes/data-stdlib.yaml:
quality, dedup, decontamination and exercises all on), run with `--tasks` tasks as its own
`python -m phitrain data prepare` process, after a warm-up read of the files (page cache).

Memory of the whole process tree (the DataTrove workers and the multiprocess manager included) is
polled every 0.2 s with psutil: "tree peak" is the largest sum of RSS seen, "proc peak" the largest
single process seen; "rusage peak" is `getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper process
whose only child is the run (the largest process of the tree at its peak, exact but per process).
At 1x the run is repeated with each of `--workers` (1 and 2 by default); larger scales use the first.

Tokenise + shard: the 1x run's kept documents (reduced to {"text"} records, one file per task) through
phitrain's `shards` stage (DataTrove local executor, `--tok-workers` processes) and through
`datasets.load_dataset("json") → .map(encode_batch, num_proc=--tok-workers)` + one uint16 file (the
usual nanoGPT-style prepare script), both with the tokenizer the 1x run trained; token counts must agree.

Prints a table, then one JSON line. Small run: `--base-mb 2 --scales 1 4`.

    .venv/bin/python benchmarks/data_scale.py [--base-mb 8] [--scales 1 4 16] [--workers 1 2] [--tasks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Recorded before the DataTrove rewrite (`phitrain data prepare recipes/data-stdlib.yaml`, the old
# in-memory pipeline, all stages on, the whole standard library without tests, other jobs running).
OLD_PIPELINE = {"mb": 11.29, "seconds": 38.7, "mb_per_s": 0.292, "peak_rss_mb": 432,
                "note": "old in-memory pipeline, stdlib 1x, measured before the rewrite with other jobs running"}
GOALS = {"rss_16x_over_1x_max": 1.2, "vs_old_min": 1.0, "tokenize_vs_datasets_min": 1.5}


# ---- corpus ------------------------------------------------------------------------------------------

def corpus_files() -> list[Path]:
    """Every real `.py` file in the fixed order described in the module docstring, each once."""
    from phitrain.data.sources import _stdlib_files

    seen: set[Path] = set()
    out: list[Path] = []

    def add(paths) -> None:
        for p in paths:
            r = p.resolve()
            if r not in seen and r.is_file():
                seen.add(r)
                out.append(p)

    add(p for _, p in _stdlib_files(False))
    add(p for _, p in _stdlib_files(True))
    site = Path(sysconfig.get_paths()["purelib"])
    for pkg in ("torch", "transformers"):
        add(sorted((site / pkg).rglob("*.py")))
    others = sorted(d for d in site.iterdir() if d.is_dir() and d.name not in ("torch", "transformers")
                    and not d.name.endswith((".dist-info", ".egg-info")) and d.name != "__pycache__")
    for d in others:
        add(sorted(d.rglob("*.py")))
    return out


def build_scale(files: list[Path], mb: float, dest: Path) -> tuple[int, int]:
    """Symlinks to the first `mb` MB of `files` in `dest` (names keep the order); (files, bytes)."""
    dest.mkdir(parents=True)
    limit, size, n = mb * 1e6, 0, 0
    for p in files:
        if size >= limit:
            break
        (dest / f"{n:06d}-{p.name}").symlink_to(p.resolve())
        size += p.stat().st_size
        n += 1
    if size < limit * 0.95:
        sys.exit(f"only {size / 1e6:.1f} MB of .py files installed; lower --base-mb or --scales")
    return n, size


def warm(dest: Path) -> None:
    for p in sorted(dest.iterdir()):
        p.read_bytes()


# ---- measuring a process tree ---------------------------------------------------------------------------

class TreeSampler(threading.Thread):
    """Polls the RSS of every descendant of `root_pid` (not the root: the wrapper) every `interval` s."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.stop = threading.Event()
        self.peak_tree = self.peak_proc = 0
        self.max_procs = 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root)
        except psutil.Error:
            return
        while not self.stop.is_set():
            total, procs = 0, 0
            try:
                kids = root.children(recursive=True)
            except psutil.Error:
                break
            for p in kids:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                procs += 1
                self.peak_proc = max(self.peak_proc, rss)
            self.peak_tree = max(self.peak_tree, total)
            self.max_procs = max(self.max_procs, procs)
            self.stop.wait(self.interval)


def measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` under a wrapper process (this script, --wrap) and return seconds, peaks and status."""
    t0 = time.perf_counter()
    wrapper = subprocess.Popen([sys.executable, __file__, "--wrap", str(log), "--", *cmd], stdout=subprocess.PIPE,
                               text=True, env=env)
    sampler = TreeSampler(wrapper.pid)
    sampler.start()
    out, _ = wrapper.communicate()
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    res = json.loads(out.strip().splitlines()[-1])
    return {"seconds": seconds, "rc": res["rc"], "rusage_peak_mb": res["maxrss_kb"] / 1024,
            "tree_peak_mb": sampler.peak_tree / 2**20, "proc_peak_mb": sampler.peak_proc / 2**20,
            "processes": sampler.max_procs}


def _wrap(log: str, cmd: list[str]) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT).returncode
    print(json.dumps({"rc": rc, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


# ---- tokenise + shard ---------------------------------------------------------------------------------

def text_only_docs(docs: Path, dest: Path) -> tuple[int, list[str]]:
    """Copy the kept documents as {"text"} records, same file layout (one file per source/split/task)."""
    total, files = 0, []
    for p in sorted(docs.glob("*/*/*.jsonl")):
        q = dest / p.relative_to(docs)
        q.parent.mkdir(parents=True, exist_ok=True)
        with p.open(encoding="utf-8") as src, q.open("w", encoding="utf-8") as out:
            for line in src:
                text = json.loads(line)["text"]
                total += len(text.encode("utf-8"))
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        files.append(str(q))
    return total, files


def _tok_phitrain(docs: str, out: str, tok_dir: str, tasks: int, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor

    from phitrain.data.executors import _quiet_run_for_rank
    from phitrain.data.shards import ShardWriter

    cls = _quiet_run_for_rank(LocalPipelineExecutor)
    cls([ShardWriter(docs, out, tok_dir)], tasks=tasks, workers=min(workers, tasks), start_method="spawn",
        logging_dir=str(Path(out) / "logs")).run()
    tokens = sum(json.loads(p.read_text())["tokens"] for p in Path(out).glob("*/*/shard-*.json"))
    return {"tokens": tokens}


def _tok_datasets(files: list[str], out: str, tok_dir: str, workers: int) -> dict:
    import numpy as np
    from datasets import disable_progress_bars, load_dataset

    from phitrain.data.shards import token_dtype
    from phitrain.tokenizer import load_tokenizer

    disable_progress_bars()
    tok = load_tokenizer(tok_dir)
    dtype, eos = token_dtype(tok.vocab_size), tok.eos_id
    ds = load_dataset("json", data_files=files, split="train", cache_dir=str(Path(out) / "hf-cache"))

    def encode(batch):
        return {"ids": [ids + [eos] for ids in tok.encode_batch(batch["text"])]}

    ds = ds.map(encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    total = 0
    with (Path(out) / "tokens.bin").open("wb") as f:
        for batch in ds.iter(batch_size=1024):
            arr = np.concatenate([np.asarray(x, dtype=dtype) for x in batch["ids"]])
            arr.tofile(f)
            total += len(arr)
    return {"tokens": total}


def _tok_child(args: argparse.Namespace) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"    # both sides parallelise with processes
    spec = json.loads(args.tok_child)
    t0 = time.perf_counter()
    if spec["impl"] == "phitrain":
        res = _tok_phitrain(spec["docs"], spec["out"], spec["tok"], spec["tasks"], spec["workers"])
    else:
        res = _tok_datasets(spec["files"], spec["out"], spec["tok"], spec["workers"])
    print(json.dumps({**res, "inner_seconds": time.perf_counter() - t0}))


# ---- main -------------------------------------------------------------------------------------------------

def prepare_recipe(base: Path, corpus: Path, tasks: int, workers: int, dest: Path) -> Path:
    import yaml

    data = yaml.safe_load(base.read_text())
    data["sources"] = [{"name": "code", "kind": "files", "paths": [str(corpus)]}]
    for field in ("quality", "exercises"):
        if isinstance(data.get(field), dict):
            data[field].pop("sources", None)
    data["executor"] = {**data.get("executor", {}), "kind": "local", "tasks": tasks, "workers": workers}
    dest.write_text(json.dumps(data, indent=1))
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-mb", type=float, default=8.0, help="size of the 1x corpus (MB)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts tried at 1x")
    p.add_argument("--tasks", type=int, default=4, help="executor.tasks of every run")
    p.add_argument("--tok-workers", type=int, default=os.cpu_count() or 1, help="processes for tokenise + shard")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "data-stdlib.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to data prepare")
    p.add_argument("--keep", help="keep the corpora and outputs in this directory")
    p.add_argument("--wrap", help=argparse.SUPPRESS)
    p.add_argument("--tok-child", help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.wrap:
        _wrap(args.wrap, args.cmd)
        return
    if args.tok_child:
        _tok_child(args)
        return
    if 1 not in args.scales:
        sys.exit("--scales must include 1 (the reference for the ratios)")

    from rich.console import Console
    from rich.table import Table

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="phitrain-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, tok = [], {}
    try:
        files = corpus_files()
        runs = [(s, args.workers[0]) for s in sorted(args.scales)] + [(1, w) for w in args.workers[1:]]
        corpora: dict[int, tuple[Path, int, int]] = {}
        for scale, workers in runs:
            if scale not in corpora:
                dest = work / f"corpus-{scale}x"
                n, size = build_scale(files, args.base_mb * scale, dest)
                corpora[scale] = (dest, n, size)
            dest, n, size = corpora[scale]
            warm(dest)
            out = work / f"out-{scale}x-w{workers}"
            recipe = prepare_recipe(Path(args.recipe), dest, args.tasks, workers, work / f"recipe-{scale}x-w{workers}.yaml")
            cmd = [sys.executable, "-m", "phitrain", "data", "prepare", str(recipe), "--out", str(out)]
            cmd += [x for s in args.set for x in ("--set", s)]
            print(f"data prepare {scale}x ({size / 1e6:.1f} MB, {n} files), {workers} worker(s) ...",
                  file=sys.stderr, flush=True)
            m = measured(cmd, work / f"log-{scale}x-w{workers}.txt", env)
            if m["rc"]:
                sys.exit(f"data prepare failed at {scale}x:\n" + (work / f"log-{scale}x-w{workers}.txt").read_text()[-4000:])
            stats = json.loads((out / "stats.json").read_text())
            stages = {m.group(1): float(m.group(2)) for m in re.finditer(
                r"^\s+(\S+)\s+\d+ tasks \(\d+ already done\)\s+([\d.]+) s$",
                (work / f"log-{scale}x-w{workers}.txt").read_text(), re.MULTILINE)}
            src = stats["sources"]["code"]
            rows.append({"scale": scale, "workers": workers, "files": n, "mb": round(size / 1e6, 2),
                         "seconds": round(m["seconds"], 1), "mb_per_s": round(size / 1e6 / m["seconds"], 3),
                         "tree_peak_mb": round(m["tree_peak_mb"], 1), "proc_peak_mb": round(m["proc_peak_mb"], 1),
                         "rusage_peak_mb": round(m["rusage_peak_mb"], 1), "processes": m["processes"],
                         "kept_docs": src.get("train_docs", 0) + src.get("val_docs", 0),
                         "train_tokens": src.get("train_tokens", 0), "stage_seconds": stages})

        # tokenise + shard, on the 1x run's kept documents and tokenizer
        out1 = work / f"out-1x-w{args.workers[0]}"
        docs = work / "tok-docs"
        text_bytes, doc_files = text_only_docs(out1 / "work" / "docs", docs)
        for impl in ("phitrain", "datasets"):
            dest = work / f"tok-{impl}"
            dest.mkdir()
            spec = {"impl": impl, "docs": str(docs), "files": doc_files, "out": str(dest),
                    "tok": str(out1 / "tokenizer"), "tasks": args.tasks, "workers": args.tok_workers}
            m = measured([sys.executable, __file__, "--tok-child", json.dumps(spec)], work / f"log-tok-{impl}.txt", env)
            log = (work / f"log-tok-{impl}.txt").read_text()
            if m["rc"]:
                sys.exit(f"tokenise ({impl}) failed:\n{log[-4000:]}")
            res = json.loads(log.strip().splitlines()[-1])
            tok[impl] = {"seconds": round(m["seconds"], 2), "inner_seconds": round(res["inner_seconds"], 2),
                         "mb_per_s": round(text_bytes / 1e6 / m["seconds"], 2), "tokens": res["tokens"],
                         "tree_peak_mb": round(m["tree_peak_mb"], 1)}
        if tok["phitrain"]["tokens"] != tok["datasets"]["tokens"]:
            sys.exit(f"token counts differ: phitrain {tok['phitrain']['tokens']} vs datasets {tok['datasets']['tokens']}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # ---- report ----
    base = next(r for r in rows if r["scale"] == 1 and r["workers"] == args.workers[0])
    for r in rows:
        r["s_per_mb_vs_1x"] = round((r["seconds"] / r["mb"]) / (base["seconds"] / base["mb"]), 2)
        r["tree_peak_vs_1x"] = round(r["tree_peak_mb"] / base["tree_peak_mb"], 2)
    table = Table(title=f"phitrain data prepare, all stages on ({Path(args.recipe).name}, {args.tasks} tasks); "
                        f"1x = {base['mb']} MB of real .py files")
    cols = ("scale", "workers", "files", "MB", "seconds", "MB/s", "s/MB vs 1x", "tree peak MB", "vs 1x",
            "proc peak MB", "rusage peak MB", "procs", "kept docs", "train tokens")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(f"{r['scale']}x", str(r["workers"]), f"{r['files']:,}", f"{r['mb']}", f"{r['seconds']}",
                      f"{r['mb_per_s']}", f"{r['s_per_mb_vs_1x']}", f"{r['tree_peak_mb']}", f"{r['tree_peak_vs_1x']}",
                      f"{r['proc_peak_mb']}", f"{r['rusage_peak_mb']}", str(r["processes"]), f"{r['kept_docs']:,}",
                      f"{r['train_tokens']:,}")
    console = Console(width=170)
    console.print(table)
    t2 = Table(title=f"tokenise + shard the 1x kept documents ({text_bytes / 1e6:.2f} MB), {args.tok_workers} processes")
    for c in ("impl", "seconds", "MB/s", "tokens", "tree peak MB"):
        t2.add_column(c, justify="right")
    for impl, r in tok.items():
        t2.add_row(impl, f"{r['seconds']}", f"{r['mb_per_s']}", f"{r['tokens']:,}", f"{r['tree_peak_mb']}")
    console.print(t2)
    for r in rows:
        console.print(f"stages {r['scale']}x/{r['workers']}w (s): "
                      + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()))

    top = max(args.scales)
    biggest = next(r for r in rows if r["scale"] == top and r["workers"] == args.workers[0])
    best_1x = max((r for r in rows if r["scale"] == 1), key=lambda r: r["mb_per_s"])
    goals = {
        f"rss_{top}x_over_1x": biggest["tree_peak_vs_1x"],
        f"rss_{top}x_over_1x_ok": biggest["tree_peak_vs_1x"] <= GOALS["rss_16x_over_1x_max"],
        "s_per_mb_vs_1x": {f"{r['scale']}x": r["s_per_mb_vs_1x"] for r in rows if r["workers"] == args.workers[0]},
        "vs_old_pipeline": round(best_1x["mb_per_s"] / OLD_PIPELINE["mb_per_s"], 2),
        "vs_old_pipeline_ok": best_1x["mb_per_s"] / OLD_PIPELINE["mb_per_s"] >= GOALS["vs_old_min"],
        "tokenize_vs_datasets": round(tok["phitrain"]["mb_per_s"] / tok["datasets"]["mb_per_s"], 2),
        "tokenize_vs_datasets_ok": tok["phitrain"]["mb_per_s"] / tok["datasets"]["mb_per_s"]
        >= GOALS["tokenize_vs_datasets_min"],
    }
    console.print(f"recorded baseline: {OLD_PIPELINE['note']}: {OLD_PIPELINE['mb']} MB in {OLD_PIPELINE['seconds']} s "
                  f"= {OLD_PIPELINE['mb_per_s']} MB/s, peak RSS {OLD_PIPELINE['peak_rss_mb']} MB")
    console.print(f"goal peak RSS {top}x <= {GOALS['rss_16x_over_1x_max']} x 1x: {goals[f'rss_{top}x_over_1x']} "
                  f"({'met' if goals[f'rss_{top}x_over_1x_ok'] else 'NOT met'}); "
                  f"wall time linear: s/MB vs 1x {goals['s_per_mb_vs_1x']}")
    console.print(f"goal >= {GOALS['vs_old_min']}x the old pipeline: {goals['vs_old_pipeline']}x at "
                  f"{best_1x['workers']} worker(s) ({'met' if goals['vs_old_pipeline_ok'] else 'NOT met'}; "
                  f"1x here is {base['mb']} MB, the baseline's was {OLD_PIPELINE['mb']} MB)")
    console.print(f"goal tokenise + shard >= {GOALS['tokenize_vs_datasets_min']}x datasets.map: "
                  f"{goals['tokenize_vs_datasets']}x ({'met' if goals['tokenize_vs_datasets_ok'] else 'NOT met'})")
    print(json.dumps({"benchmark": "data_scale", "base_mb": args.base_mb, "tasks": args.tasks, "recipe": args.recipe,
                      "cpus": os.cpu_count(), "rows": rows, "tokenize": {**tok, "mb": round(text_bytes / 1e6, 2),
                                                                         "workers": args.tok_workers},
                      "baseline_old_pipeline": OLD_PIPELINE, "goals": goals}))


if __name__ == "__main__":
    main()
