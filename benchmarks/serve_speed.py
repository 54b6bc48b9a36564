"""`phitrain serve` throughput: generated tokens/s with 1, 4 and 16 concurrent clients.

Starts the real server (`python -m phitrain serve`, a subprocess on 127.0.0.1) on a random-init
checkpoint of `phi-1-tiny`'s shape (6 parallel blocks, hidden 256, vocab 4096; the tokenizer is a BPE
trained on a few standard-library modules). Each of N client threads sends `--requests` completion
requests one after another, each a distinct `--prompt-tokens`-token prompt (token ids) asking for
`--max-tokens` tokens, greedy, with `ignore_eos` so every request generates exactly that many tokens and
the counts compare across client numbers. Throughput is all completion tokens / wall time of the
measurement; the server's /stats gives the mean batch size it ran. Goal: 16 clients >= 3x 1 client,
which only continuous batching delivers (one client's decode steps are latency-bound, not compute-bound).

Prints a table, then one JSON line. Sections are functions over a running server
(`running_server(checkpoint, args)` yields a `Server` with the OpenAI base URL), so further measurements
against the same server can be added as functions next to `bench_throughput`.

    python benchmarks/serve_speed.py                       # 1, 4, 16 clients x 4 requests x 96 tokens
    python benchmarks/serve_speed.py --clients 1 16 --requests 2 --max-tokens 64 --threads 1
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per measurement")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=96, help="new tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", help="the server's --device")
    p.add_argument("--seed", type=int, default=0)
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
           "--max-batch-size", str(args.max_batch_size), "--model-name", "bench"]
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


def bench_throughput(server: Server, prompts: list[list[int]], clients: int, args) -> dict:
    """`clients` threads, each sending `args.requests` requests in turn; tokens/s over the whole run."""
    before = server.stats()
    barrier = threading.Barrier(clients + 1)
    results: list[tuple[int, float]] = []  # (completion tokens, seconds) per request
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=600) as http:
                barrier.wait()
                for r in range(args.requests):
                    prompt = prompts[(index * args.requests + r) % len(prompts)]
                    start = time.perf_counter()
                    resp = http.post("/completions", json={
                        "model": server.model, "prompt": prompt, "max_tokens": args.max_tokens,
                        "temperature": 0, "ignore_eos": True})
                    resp.raise_for_status()
                    results.append((resp.json()["usage"]["completion_tokens"], time.perf_counter() - start))
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    tokens = sum(n for n, _ in results)
    assert tokens == clients * args.requests * args.max_tokens, "a request ended early despite ignore_eos"
    after = server.stats()
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "mean_latency_s": round(sum(s for _, s in results) / len(results), 3),
            "mean_batch_size": round((after["batch_rows"] - before["batch_rows"]) / batches, 2) if batches else 0}


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
            warm = argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 8})
            bench_throughput(server, prompts, 1, warm)
            rows = []
            for clients in args.clients:
                console.print(f"{clients} client(s) ...")
                rows.append(bench_throughput(server, prompts, clients, args))

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
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
