"""`phitrain serve` throughput: generated tokens/s with 1, 4 and 16 concurrent clients.

Starts the real server (`python -m phitrain serve`, a subprocess on 127.0.0.1) on a random-init
checkpoint of `phi-1-tiny`'s shape (6 parallel blocks, hidden 256, vocab 4096; the tokenizer is a BPE
trained on a few standard-library modules). Each of N client threads sends `--requests` completion
requests one after another, each a distinct `--prompt-tokens`-token prompt (token ids) asking for
`--max-tokens` tokens, greedy, with `ignore_eos` so every request generates exactly that many tokens and
the counts compare across client numbers. Throughput is all completion tokens / wall time of the
measurement; the server's /stats gives the mean batch size it ran. Goal: 16 clients >= 3x 1 client,
which only continuous batching delivers (one client's decode steps are latency-bound, not compute-bound).

Then `synth` client overhead (issue 10's goal: items/s through `synth` >= 0.9x raw requests/s against
the same server). `phitrain synth` runs as a subprocess (what users run) on a recipe of one `textbook`
generator without `revise` (one request per item): `--synth-items` items, `--synth-max-tokens` tokens,
temperature 0, `--synth-concurrency` workers, a fresh output directory and cache each time. Its items/s
is items / the wall time of the generation phase (`phitrain.synth.run.generate`, timed by a wrapper the
subprocess installs before calling the CLI: the worker pool, cache look-ups and commits, HTTP). Two wider
rates are reported beside it: over the run's own `seconds` (diversity.json; adds writing the Parquet file
and the diversity statistics, including their one-time lazy imports of pyarrow and datasketch) and over
the whole process (adds the interpreter start, imports, recipe parsing and planning). The raw side POSTs
exactly the same request bodies -- built beforehand by synth's own planning and prompt code (`build_job` +
`run_item` through an `LLMClient` whose send only records), and checked afterwards to have the same cache
keys as the requests the synth run stored -- with httpx from as many threads, taking requests from one
shared queue as synth's pool takes items; requests/s = requests / wall time. Raw and synth alternate
(raw, synth, raw, synth; `--synth-repeats`); medians are reported. Decoding is greedy, so both sides
should generate the same tokens: the completion token totals (and how many answer texts equal the cached
ones) are printed as the check.

Prints a table, then one JSON line. Sections are functions over a running server
(`running_server(checkpoint, args)` yields a `Server` with the OpenAI base URL), so further measurements
against the same server can be added as functions next to `bench_throughput`.

    python benchmarks/serve_speed.py                       # 1, 4, 16 clients x 4 requests x 96 tokens
    python benchmarks/serve_speed.py --clients 1 16 --requests 2 --max-tokens 64 --threads 1
    python benchmarks/serve_speed.py --synth-items 0        # throughput only, no synth section
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

GOAL = 3.0  # 16-client throughput over 1-client throughput
SYNTH_GOAL = 0.9  # synth items/s over raw requests/s (one request per item)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per measurement")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=96, help="new tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", help="the server's --device")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="the server's --compile (its default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synth-items", type=int, default=32, help="items (= requests) per synth/raw run; 0 skips "
                                                                "the synth overhead section")
    p.add_argument("--synth-max-tokens", type=int, default=48, help="max_tokens of each synth request")
    p.add_argument("--synth-concurrency", type=int, default=8, help="synth's endpoint.concurrency and the "
                                                                    "raw side's threads")
    p.add_argument("--synth-repeats", type=int, default=2, help="raw/synth pairs, alternated; medians reported")
    return p.parse_args(argv)


def build_checkpoint(directory: Path, seed: int) -> tuple[Path, list[list[int]]]:
    """A phi-1-tiny-shaped random-init checkpoint with a BPE tokenizer, and prompt material: the
    tokenized text of the modules the tokenizer was trained on."""
    import argparse as argparse_module
    import json as json_module
    import textwrap

    import torch

    from phitrain.checkpoint import save_checkpoint
    from phitrain.model.phi import PhiModel
    from phitrain.model.presets import get_preset
    from phitrain.tokenizer import train_bpe

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (argparse_module, json_module.decoder,
                                                                     textwrap, contextlib, threading)]
    tokenizer = train_bpe(iter(texts), vocab_size=4096, out_dir=directory / "tokenizer")
    cfg = get_preset("phi-1-tiny", vocab_size=max(4096, tokenizer.padded_vocab_size()))
    torch.manual_seed(seed)
    checkpoint = save_checkpoint(directory / "checkpoint", PhiModel(cfg).eval(), tokenizer)
    return checkpoint, [tokenizer.encode(t) for t in texts]


@dataclass
class Server:
    base_url: str  # what an OpenAI client takes as base_url (ends in /v1)
    model: str

    def stats(self) -> dict:
        return httpx.get(self.base_url.removesuffix("/v1") + "/stats").json()


@contextlib.contextmanager
def running_server(checkpoint: Path, args) -> Iterator[Server]:
    """`phitrain serve CHECKPOINT --port 0` as a subprocess; yields once it prints its URL, stops it after."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "phitrain", "serve", str(checkpoint), "--port", "0", "--device", args.device,
           "--max-batch-size", str(args.max_batch_size), "--model-name", "bench",
           "--compile" if args.compile else "--no-compile"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            match = re.search(r"http://\S+/v1", line)
            if match:
                break
        else:
            raise SystemExit(f"phitrain serve exited without serving (status {proc.wait()})")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        yield Server(match.group(0), "bench")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def timed_clients(server: "Server", n: int, work) -> float:
    """Run `work(index, http)` in `n` threads, each with its own HTTP client, released together; the wall
    seconds from release until the last one finishes. A thread's exception is raised here."""
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=600) as http:
                barrier.wait()
                work(index, http)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def bench_throughput(server: Server, prompts: list[list[int]], clients: int, args) -> dict:
    """`clients` threads, each sending `args.requests` requests in turn; tokens/s over the whole run."""
    before = server.stats()
    results: list[tuple[int, float]] = []  # (completion tokens, seconds) per request

    def client(index: int, http: httpx.Client) -> None:
        for r in range(args.requests):
            prompt = prompts[(index * args.requests + r) % len(prompts)]
            start = time.perf_counter()
            resp = http.post("/completions", json={
                "model": server.model, "prompt": prompt, "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True})
            resp.raise_for_status()
            results.append((resp.json()["usage"]["completion_tokens"], time.perf_counter() - start))

    seconds = timed_clients(server, clients, client)
    tokens = sum(n for n, _ in results)
    assert tokens == clients * args.requests * args.max_tokens, "a request ended early despite ignore_eos"
    after = server.stats()
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "mean_latency_s": round(sum(s for _, s in results) / len(results), 3),
            "mean_batch_size": round((after["batch_rows"] - before["batch_rows"]) / batches, 2) if batches else 0}


# ---- synth client overhead -----------------------------------------------------------------------

SYNTH_TOPICS = ["list comprehensions", "recursion", "hash tables", "binary search", "string formatting",
                "exceptions", "generators", "sorting algorithms"]


def synth_recipe(server: Server, args) -> dict:
    """One `textbook` generator, no `revise`: exactly one /completions request per item."""
    return {
        "name": "serve-speed-synth",
        "endpoint": {"base_url": server.base_url, "model": server.model, "api": "completions",
                     "concurrency": args.synth_concurrency, "max_retries": 0, "timeout_s": 600},
        "sampling": {"temperature": 0.0, "max_tokens": args.synth_max_tokens, "seed": args.seed},
        "generators": [{"kind": "textbook", "name": "textbook", "n": args.synth_items, "topics": SYNTH_TOPICS}],
    }


def synth_request_bodies(recipe_data: dict, scratch: Path) -> tuple[list[dict], list[str]]:
    """The request bodies (and cache keys) a synth run of the recipe sends, in item order, built by synth's
    own code: the plan (`build_job`), each item's prompts (`run_item`), the payload (`LLMClient.payload`).
    Only the send is replaced, by a recorder that answers with an empty text."""
    from phitrain.synth import SynthRecipe
    from phitrain.synth.client import Answer, LLMClient, RequestCache
    from phitrain.synth.generators import run_item
    from phitrain.synth.run import build_job

    recipe = SynthRecipe.model_validate(recipe_data)
    assert len(recipe.generators) == 1 and recipe.generators[0].revise is None
    job = build_job(recipe, 0)
    bodies: list[dict] = []

    class Recorder(LLMClient):
        def _send(self, body: dict) -> Answer:
            bodies.append(body)
            return Answer("", "length", 0, 0, cached=False)

    cache = RequestCache(scratch / "record.sqlite")
    client = Recorder(recipe.endpoint, cache)
    try:
        for item in job.items:
            before = len(bodies)
            run_item(job, item, client)
            assert len(bodies) == before + 1, f"item {item.index} made {len(bodies) - before} requests, not 1"
    finally:
        client.close()
        cache.close()
    return bodies, [client.key(b) for b in bodies]


def bench_raw_requests(server: Server, bodies: list[dict], concurrency: int) -> dict:
    """`bodies` POSTed to /completions by `concurrency` threads taking them from one shared queue."""
    lock = threading.Lock()
    todo = iter(enumerate(bodies))
    answers: list[dict | None] = [None] * len(bodies)

    def worker(_: int, http: httpx.Client) -> None:
        while True:
            with lock:
                nxt = next(todo, None)
            if nxt is None:
                return
            i, body = nxt
            resp = http.post("/completions", json=body)
            resp.raise_for_status()
            answers[i] = resp.json()

    seconds = timed_clients(server, concurrency, worker)
    return {"requests": len(bodies), "seconds": round(seconds, 3),
            "requests_per_s": round(len(bodies) / seconds, 3),
            "completion_tokens": sum(a["usage"]["completion_tokens"] for a in answers),
            "texts": [a["choices"][0]["text"] for a in answers]}


# `phitrain synth ...` as `python -m phitrain` runs it, with `generate` (the generation phase of each
# generator) wrapped in a timer whose spans go to the JSON file named by the first argument.
TIMED_SYNTH = """
import json, sys, time
import phitrain.synth.run as run
from phitrain.cli import main
spans, generate = [], run.generate
def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return generate(*args, **kwargs)
    finally:
        spans.append(time.perf_counter() - start)
run.generate = timed
status = main(sys.argv[2:])
open(sys.argv[1], "w").write(json.dumps(spans))
raise SystemExit(status)
"""


def bench_synth_run(server: Server, recipe_path: Path, out: Path) -> dict:
    """`phitrain synth RECIPE --out OUT --quiet` in a subprocess (fresh OUT, so a fresh cache): the
    generation phase's wall time, the run's own clock (diversity.json `seconds`) and the process's."""
    before = server.stats()["requests"].get("/v1/completions", 0)
    spans_path = out.with_name(out.name + "-generate.json")
    cmd = [sys.executable, "-c", TIMED_SYNTH, str(spans_path), "synth", str(recipe_path), "--out", str(out), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"phitrain synth failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
    served = server.stats()["requests"].get("/v1/completions", 0) - before
    summary = json.loads((out / "diversity.json").read_text())
    totals, gen = summary["totals"], summary["generators"]["textbook"]
    items = gen["kept"] + gen["rejected"]
    (generate_seconds,) = json.loads(spans_path.read_text())
    return {"items": items, "sent": totals["sent"], "served": served, "cache_hits": totals["cache_hits"],
            "retries": totals["retries"], "generate_seconds": round(generate_seconds, 3),
            "run_seconds": summary["seconds"], "process_seconds": round(wall, 3),
            "items_per_s": round(items / generate_seconds, 3), "run_items_per_s": round(items / summary["seconds"], 3),
            "process_items_per_s": round(items / wall, 3), "completion_tokens": totals["completion_tokens"]}


def bench_synth_overhead(server: Server, scratch: Path, args, say=print) -> dict:
    """Raw requests/s and synth items/s over the same requests, alternated `args.synth_repeats` times."""
    import sqlite3
    import statistics

    import yaml

    recipe_data = synth_recipe(server, args)
    recipe_path = scratch / "synth-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    bodies, keys = synth_request_bodies(recipe_data, scratch)
    raw_runs, synth_runs = [], []
    same_text = mismatched_keys = 0
    for r in range(args.synth_repeats):
        say(f"synth overhead {r + 1}/{args.synth_repeats}: raw {len(bodies)} requests x {args.synth_concurrency} "
            "threads ...")
        raw = bench_raw_requests(server, bodies, args.synth_concurrency)
        say(f"synth overhead {r + 1}/{args.synth_repeats}: phitrain synth {args.synth_items} items ...")
        out = scratch / f"synth-{r}"
        run = bench_synth_run(server, recipe_path, out)
        assert run["items"] == args.synth_items and run["sent"] == run["served"] == len(bodies), run
        assert run["cache_hits"] == 0 and run["retries"] == 0, run
        with sqlite3.connect(out / "cache.sqlite") as db:
            cached = dict(db.execute("SELECT key, text FROM answers"))
        mismatched_keys += len(set(cached) ^ set(keys))     # synth sent exactly the bodies replayed raw
        same_text += sum(cached.get(k) == t for k, t in zip(keys, raw.pop("texts")))
        raw_runs.append(raw)
        synth_runs.append(run)
    raw_rate = statistics.median(r["requests_per_s"] for r in raw_runs)
    synth_rate = statistics.median(r["items_per_s"] for r in synth_runs)
    run_rate = statistics.median(r["run_items_per_s"] for r in synth_runs)
    process_rate = statistics.median(r["process_items_per_s"] for r in synth_runs)
    return {"items": args.synth_items, "max_tokens": args.synth_max_tokens, "concurrency": args.synth_concurrency,
            "raw_runs": raw_runs, "synth_runs": synth_runs,
            "raw_requests_per_s": round(raw_rate, 3), "synth_items_per_s": round(synth_rate, 3),
            "synth_run_items_per_s": round(run_rate, 3), "synth_process_items_per_s": round(process_rate, 3),
            "synth_overhead_ratio": round(synth_rate / raw_rate, 3),
            "synth_run_ratio": round(run_rate / raw_rate, 3), "synth_process_ratio": round(process_rate / raw_rate, 3),
            "request_keys_mismatched": mismatched_keys,
            "same_text": f"{same_text}/{len(bodies) * args.synth_repeats}",
            "completion_tokens_raw": [r["completion_tokens"] for r in raw_runs],
            "completion_tokens_synth": [r["completion_tokens"] for r in synth_runs]}


def main(argv=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, texts = build_checkpoint(Path(tmp), args.seed)
        stream = [t for text in texts for t in text]
        n = args.prompt_tokens
        prompts = [stream[i:i + n] for i in range(0, len(stream) - n, n)]
        console.print(f"[bold]serve_speed[/]: phi-1-tiny shape, random init; {args.requests} requests x "
                      f"{args.max_tokens} tokens per client after {n}-token prompts; server on {args.device}, "
                      f"{args.threads} threads, max batch {args.max_batch_size}")
        with running_server(checkpoint, args) as server:
            # warm-up: the server compiles its decode step on first use, on CPU one graph per row count
            # it pads to (powers of two up to PADDED_ROWS_MAX, phitrain.model.generate) and one for
            # more rows, so every batch size a measurement passes through runs compiled code
            warm = argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 8})
            most = max(args.clients)
            for clients in sorted({1 << i for i in range(most.bit_length())} | {most}):
                bench_throughput(server, prompts, clients, warm)
            rows = []
            for clients in args.clients:
                console.print(f"{clients} client(s) ...")
                rows.append(bench_throughput(server, prompts, clients, args))
            synth = bench_synth_overhead(server, Path(tmp), args, console.print) if args.synth_items > 0 else None

    base = rows[0]["tokens_per_s"]
    table = Table(title="phitrain serve: generated tokens/s (higher is better)")
    for col in ("clients", "tokens/s", "vs first", "mean batch", "mean latency s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["clients"]), f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base:.2f}x",
                      f"{r['mean_batch_size']:.1f}", f"{r['mean_latency_s']:.2f}")
    console.print(table)
    record = {"config": vars(args), "throughput": rows}
    by_clients = {r["clients"]: r["tokens_per_s"] for r in rows}
    if 1 in by_clients and 16 in by_clients:
        ratio = by_clients[16] / by_clients[1]
        record["speedup_16_vs_1"] = round(ratio, 2)
        record["goal"] = GOAL
        record["meets_goal"] = ratio >= GOAL
        color = "green" if ratio >= GOAL else "red"
        console.print(f"16 clients / 1 client: [{color}]{ratio:.2f}x[/] (goal >= {GOAL:.0f}x)")
    if synth is not None:
        table = Table(title=f"synth client overhead: {synth['items']} items x {synth['max_tokens']} tokens, "
                            f"concurrency {synth['concurrency']} (higher is better)")
        for col in ("run", "raw req/s", "synth items/s", "+ writing", "whole process", "tokens raw/synth"):
            table.add_column(col, justify="right")
        for i, (raw, run) in enumerate(zip(synth["raw_runs"], synth["synth_runs"]), 1):
            table.add_row(str(i), f"{raw['requests_per_s']:.2f}", f"{run['items_per_s']:.2f}",
                          f"{run['run_items_per_s']:.2f}", f"{run['process_items_per_s']:.2f}",
                          f"{raw['completion_tokens']}/{run['completion_tokens']}")
        table.add_row("median", f"{synth['raw_requests_per_s']:.2f}", f"{synth['synth_items_per_s']:.2f}",
                      f"{synth['synth_run_items_per_s']:.2f}", f"{synth['synth_process_items_per_s']:.2f}", "")
        console.print(table)
        same = synth["completion_tokens_raw"] == synth["completion_tokens_synth"]
        console.print(f"same requests: {'yes' if synth['request_keys_mismatched'] == 0 else 'NO'} (cache keys); "
                      f"completion tokens {'equal' if same else '[red]DIFFER[/]'}; answer texts equal "
                      f"{synth['same_text']}")
        ratio = synth["synth_overhead_ratio"]
        color = "green" if ratio >= SYNTH_GOAL else "red"
        console.print(f"synth items/s (generation) / raw requests/s: [{color}]{ratio:.3f}[/] (goal >= {SYNTH_GOAL}); "
                      f"incl. writing outputs and statistics: {synth['synth_run_ratio']:.3f}; whole process: "
                      f"{synth['synth_process_ratio']:.3f}")
        record["synth_overhead"] = synth
        record.update(synth_items_per_s=synth["synth_items_per_s"], raw_requests_per_s=synth["raw_requests_per_s"],
                      synth_overhead_ratio=ratio, synth_goal=SYNTH_GOAL, synth_meets_goal=ratio >= SYNTH_GOAL)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
