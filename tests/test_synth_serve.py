"""`phitrain synth` against a real `phitrain serve` subprocess: the shipped synth-tiny recipe, every kind,
killed with SIGKILL mid-run and re-run. The server's own `/stats` counts what reached it, so "only the
missing requests were sent" is measured at the server, not trusted from the client.

The checkpoint is a random-weight tiny model (with the tiny tokenizer of conftest.py) and a context long
enough for the recipe's prompts; it writes noise, so verified kinds mostly reject — what matters here is
that every item is accounted for, with its metadata, and that resume is exact.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from conftest import random_phitrain_model, single_thread_env, tiny_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synth-tiny.yaml"
PHITRAIN = [sys.executable, "-m", "phitrain"]
N = {"textbook": 3, "exercises": 2, "rewrites": 2, "reversal": 2, "long": 1}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    """(base URL, stats URL) of `phitrain serve` on a tiny random checkpoint, stopped after the module."""
    from phitrain.checkpoint import save_checkpoint

    cfg = tiny_config("parallel-hd64", vocab_size=tiny_tokenizer.padded_vocab_size(), max_position_embeddings=4096)
    ckpt = tmp_path_factory.mktemp("serve") / "ckpt"
    save_checkpoint(ckpt, random_phitrain_model(cfg, seed=5), tiny_tokenizer)
    proc = subprocess.Popen([*PHITRAIN, "serve", str(ckpt), "--host", "127.0.0.1", "--port", "0",
                             "--model-name", "tiny", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=single_thread_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        url = m.group(1) if m else None
    try:
        assert url is not None, "phitrain serve did not print its URL:\n" + "".join(seen)
        yield f"{url}/v1", f"{url}/stats"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def completions_served(stats_url: str) -> int:
    return httpx.get(stats_url, timeout=10).json()["requests"].get("/v1/completions", 0)


def synth_argv(base_url: str, out: Path) -> list[str]:
    sets = [f"endpoint.base_url={base_url}", "endpoint.concurrency=1", "sampling.temperature=0",
            "sampling.max_tokens=12", "generators.0.revise.rounds=1"]
    sets += [f"generators.{i}.n={n}" for i, n in enumerate(N.values())]
    return [*PHITRAIN, "synth", str(RECIPE), "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]


def outputs(out: Path) -> dict[str, list[dict]]:
    rows = {p.name: pq.read_table(p).to_pylist() for p in sorted(out.glob("*.parquet"))}
    rows.update({f"rejected/{p.name}": [json.loads(x) for x in p.read_text().splitlines()]
                 for p in sorted(out.glob("rejected/*.jsonl"))})
    return rows


def test_synth_against_phitrain_serve_resumes_after_kill(served, tmp_path):
    base_url, stats_url = served
    env = {**single_thread_env(), "PYTHONUNBUFFERED": "1"}
    a, b = tmp_path / "a", tmp_path / "b"

    start = completions_served(stats_url)
    proc = subprocess.Popen(synth_argv(base_url, a), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while completions_served(stats_url) - start < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.kill()
    proc.wait()
    proc.stderr.close()
    with sqlite3.connect(a / "cache.sqlite") as db:
        done = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert done >= 4

    before = completions_served(stats_url)
    rerun = subprocess.run(synth_argv(base_url, a), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = completions_served(stats_url) - before

    before = completions_served(stats_url)
    fresh = subprocess.run(synth_argv(base_url, b), env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    total = completions_served(stats_url) - before

    assert resumed == total - done                  # counted at the server: nothing answered was re-sent
    assert outputs(a) == outputs(b)

    report = json.loads((b / "diversity.json").read_text())
    assert report["totals"]["sent"] == total and report["totals"]["prompt_tokens"] > 0
    for name, n in N.items():
        g = report["generators"][name]
        assert g["kept"] + g["rejected"] == n, (name, g)
        kept = pq.read_table(b / f"{name}.parquet").to_pylist()
        assert len(kept) == g["kept"]
        for row in kept:
            assert row["model"] == "tiny" and row["sampling"]["temperature"] == 0 and row["requests"] >= 1
            assert row["generator"] == name and row["id"].startswith(f"{name}-") and row["variables"]
    assert report["generators"]["rewrites"]["kept"] == N["rewrites"]
    rewrites = pq.read_table(b / "rewrites.parquet").to_pylist()
    assert sum(r["truncated"] for r in rewrites) > 0       # 12 tokens: the server reports finish_reason "length"
    assert all(len(r["critiques"]) == 1 for r in pq.read_table(b / "textbook.parquet").to_pylist())
    assert "| textbook | textbook |" in (b / "report.md").read_text()
    assert os.path.getsize(b / "cache.sqlite") > 0
