"""`phitrain synth` against a scripted OpenAI-compatible endpoint on 127.0.0.1 (a stand-in for a paid API).

The endpoint answers from markers the test recipes put in their templates (TEXTBOOK, EXERCISE, SOLVE,
TESTS, REVERSE, REGENERATE, OUTLINE, SECTION, and the built-in revision prompts), returns known right or
wrong code for the verified kinds, counts every request, and can be told to fail: HTTP 500, malformed
JSON, or answers slower than the client's timeout. Every answer is a function of the request alone, so two
runs of one recipe get the same answers. Verification runs real programs in the sandbox; resume is shown
by killing a real `phitrain synth` process with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from phitrain.cli import main as cli_main
from phitrain.errors import PhitrainError
from phitrain.synth.client import Answer, LLMClient, RequestCache
from phitrain.synth.config import EndpointConfig, ReportConfig, SamplingConfig
from phitrain.synth.generators import outline_sections
from phitrain.synth.plan import plan
from phitrain.synth.report import distinct_n, near_duplicates, openings
from phitrain.synth.verify import ast_similarity, code_block

# --------------------------------------------------------------------------------------------------
# the scripted endpoint
# --------------------------------------------------------------------------------------------------

# Exercise semantics: name -> (correct body expression, wrong body expression or None if answered right)
EXERCISES = {
    "add_one": ("x + 1", None),
    "square": ("x * x", None),
    "double": ("2 * x", "x + 2"),        # answered wrong: fails check
    "negate": ("-x", "x"),               # answered wrong
}
MISSING = "nothing_here"                  # the exercise answer defines no function: "bad exercise"

# Code reversal originals: name -> (code, tests or None, regenerated answer)
CLAMP = "def clamp(v, lo, hi):\n    if v < lo:\n        return lo\n    if v > hi:\n        return hi\n    return v\n"
MID = "def mid(a, b):\n    return (a + b) / 2\n"
TOTAL = ("def total(items, start=0):\n    acc = start\n    for item in items:\n        if item > 0:\n"
         "            acc += item\n    return acc\n")
REVERSE_WORDS = "def reverse_words(s):\n    words = s.split()\n    words.reverse()\n    return ' '.join(words)\n"
REVERSAL = {
    "clamp": (CLAMP, "def check(candidate):\n    assert candidate(5, 0, 3) == 3\n    assert candidate(-1, 0, 3) == 0\n"
                     "    assert candidate(2, 0, 3) == 2\n",
              "def clamp(v, lo, hi):\n    return max(lo, min(v, hi))\n"),                 # passes the tests
    "mid": (MID, "def check(candidate):\n    assert candidate(2, 4) == 3\n    assert candidate(1, 2) == 1.5\n",
            "def mid(a, b):\n    return (a + b) // 2\n"),                               # fails 1.5
    "total": (TOTAL, None,                                                               # renamed: similar
              "def total(values, start=0):\n    s = start\n    for v in values:\n        if v > 0:\n"
              "            s += v\n    return s\n"),
    "reverse_words": (REVERSE_WORDS, None,                                               # different: rejected
                      "def reverse_words(text):\n    out = ''\n    i = len(text) - 1\n    while i >= 0:\n"
                      "        out += text[i]\n        i -= 1\n    return out.strip()\n"),
}

WORDS = ("function variable loop list dict string index value return call module class object method "
         "argument parameter recursion iteration sequence mapping tuple set generator closure scope").split()


def _words(key: str, n: int) -> str:
    """n pseudo-random words fixed by key (varied texts for the diversity metrics)."""
    out = []
    for i in range(n):
        h = hashlib.sha256(f"{key}:{i}".encode()).digest()
        out.append(WORDS[h[0] % len(WORDS)])
    return " ".join(out)


def answer(prompt: str) -> str:
    """The scripted answer to one prompt."""
    if "Review it against this rubric" in prompt:
        return "CRITIQUE: add an example."
    if "Rewrite the draft so that" in prompt:
        draft = prompt.split('"""\n', 1)[1].split('\n"""', 1)[0]
        return "REVISED " + draft
    m = re.search(r"TEXTBOOK topic=(.*?) audience=(.*?) style=(.*)", prompt)
    if m:
        return f"A lesson on {m[1]} for {m[2]} as {m[3]}. " + _words(prompt, 40)
    m = re.search(r"EXERCISE name=(\w+)", prompt)
    if m:
        name = m[1]
        if name == MISSING:
            return "I am not sure what to write."
        return f"Here it is:\n```python\ndef {name}(x):\n    \"\"\"Compute {name} of x.\"\"\"\n```\n"
    m = re.search(r"SOLVE (\w+)", prompt)
    if m:
        right, wrong = EXERCISES[m[1]]
        return f"```python\ndef {m[1]}(x):\n    \"\"\"Compute {m[1]} of x.\"\"\"\n    return {wrong or right}\n```"
    m = re.search(r"TESTS (\w+)", prompt)
    if m:
        right, _ = EXERCISES[m[1]]
        cases = "".join(f"    assert candidate({x}) == {eval(right, {'x': x})}\n" for x in (0, 3, -2))
        return f"```python\ndef check(candidate):\n{cases}```"
    m = re.search(r"REVERSE def (\w+)", prompt)
    if m:
        return f"INSTRUCTION: write `{m[1]}`. " + _words(prompt, 12)
    m = re.search(r"REGENERATE (\w+)", prompt)
    if m:
        return f"```python\n{REVERSAL[m[1]][2]}```"
    m = re.search(r"OUTLINE (.*)", prompt)
    if m:
        if m[1].strip() == "tiny":
            return "1. Only section"
        return "Plan:\n1. Beginnings\n2. **Middle part**\n- Details\n3. Ending\n4. Appendix"
    m = re.search(r"SECTION (\d+) (.*?) of (.*)", prompt)
    if m:
        return f"Section {m[1]} on {m[2]}. " + _words(prompt, 60)
    return "GENERIC " + _words(prompt, 20)


class ScriptedEndpoint:
    """`with ScriptedEndpoint() as ep:` serves on `ep.base_url`; `ep.count` requests so far.

    `fail` = None | "500" | "malformed" | "slow" applies to requests numbered > `fail_after` (all of them by
    default) and, when `fail_times` is set, only to that many of them (transient failures)."""

    def __init__(self, delay: float = 0.0, usage: bool = True) -> None:
        self.delay = delay
        self.usage = usage
        self.fail: str | None = None
        self.fail_after = 0
        self.fail_times: int | None = None
        self.slow_s = 2.0
        self.count = 0
        self.failed = 0
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedEndpoint":
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                except (ConnectionResetError, BrokenPipeError):
                    return                 # the client was killed while sending
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with endpoint.lock:
                    endpoint.count += 1
                    number = endpoint.count
                    failing = endpoint.fail is not None and number > endpoint.fail_after and (
                        endpoint.fail_times is None or endpoint.failed < endpoint.fail_times)
                    if failing:
                        endpoint.failed += 1
                    else:
                        endpoint.prompts.append(prompt)
                if endpoint.delay:
                    time.sleep(endpoint.delay)
                if failing and endpoint.fail == "500":
                    return self._send(500, b'{"error": "scripted failure"}')
                if failing and endpoint.fail == "malformed":
                    return self._send(200, b"this is not json {")
                if failing and endpoint.fail == "slow":
                    time.sleep(endpoint.slow_s)
                text = answer(prompt)
                choice = {"index": 0, "finish_reason": "stop"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                reply = {"id": f"r{number}", "object": "chat.completion" if chat else "text_completion",
                         "model": body["model"], "choices": [choice]}
                if endpoint.usage:
                    reply["usage"] = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                                      "total_tokens": len(prompt.split()) + len(text.split())}
                self._send(200, json.dumps(reply).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up (timeout) or was killed

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------------

PHITRAIN = [sys.executable, "-m", "phitrain"]


def write_inputs(tmp: Path) -> dict[str, Path]:
    """Seed documents for rewrite and code (with and without tests) for code reversal."""
    seeds = tmp / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "Lists keep items in order. Use append to add one at the end.",
        "A dictionary maps keys to values; looking a key up is fast on average.")))
    code = tmp / "code.jsonl"
    rows = []
    for name, (src, test, _) in REVERSAL.items():
        row = {"code": src, "entry_point": name}
        if test:
            row["test"] = test
        rows.append(row)
    code.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"seeds": seeds, "code": code}


def full_recipe(base_url: str, tmp: Path, **endpoint) -> dict:
    """Every kind, with templates carrying the markers the scripted endpoint answers."""
    inputs = write_inputs(tmp)
    return {
        "name": "synth-test",
        "endpoint": {"base_url": base_url, "model": "scripted", "api": "chat", "concurrency": 2,
                     "max_retries": 2, "timeout_s": 10, "backoff_s": 0.01, "backoff_max_s": 0.05, **endpoint},
        "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 11},
        "output": {"format": "parquet"},
        "sandbox": {"timeout": 30},       # generous: the machine may be busy; these programs take ms
        "generators": [
            {"kind": "textbook", "name": "book", "n": 6, "topics": ["loops", "recursion", "dictionaries"],
             "audiences": ["kids", "pros"], "styles": ["blog", "tutorial"],
             "templates": ["TEXTBOOK topic={topic} audience={audience} style={style}"], "revise": {}},
            {"kind": "exercises", "name": "exercises", "n": 5, "topics": ["arithmetic"],
             "function_names": [*EXERCISES, MISSING],
             "templates": ["EXERCISE name={function_name} topic={topic}"],
             "solve_template": "SOLVE {entry_point}\n{exercise}", "test_template": "TESTS {entry_point}\n{exercise}"},
            {"kind": "rewrite", "name": "rewrites", "n": 4, "seeds": {"paths": [str(inputs["seeds"])]},
             "formats": ["qa", "discussion"], "templates": ["REWRITE {format}: {seed} :: {instructions}"]},
            {"kind": "code_reversal", "name": "reversal", "n": 4, "code": {"paths": [str(inputs["code"])]},
             "templates": ["REVERSE {code}"], "regenerate_template": "REGENERATE {entry_point}\n{instruction}",
             "similarity_threshold": 0.9},
            {"kind": "long", "name": "long", "n": 3, "topics": ["tiny", "graphs", "sorting"],
             "templates": ["OUTLINE {topic}"], "min_tokens": 150,
             "section_template": "SECTION {number} {section} of {topic}\n{outline}\n{previous}"},
        ],
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(out: Path) -> dict[str, list[dict]]:
    """Every output and rejected file of a run directory, by relative path."""
    files = sorted(out.glob("*.parquet")) + sorted(out.glob("*.jsonl")) + sorted(out.glob("rejected/*.jsonl"))
    return {str(p.relative_to(out)): read_rows(p) for p in files}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cached_answers(out: Path) -> int:
    with sqlite3.connect(out / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


# --------------------------------------------------------------------------------------------------
# every kind, verification counts, metadata, report
# --------------------------------------------------------------------------------------------------


def test_every_kind_with_verification_and_report(tmp_path, capsys):
    with ScriptedEndpoint() as ep:
        recipe = write_recipe(tmp_path / "r.yaml", full_recipe(ep.base_url, tmp_path))
        code, stdout, err = run_cli(["synth", str(recipe), "--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert code == 0, err
        sent = ep.count
        prompts = list(ep.prompts)
    out = tmp_path / "out"
    rows = {p: read_rows(out / f"{p}.parquet") for p in ("book", "exercises", "rewrites", "reversal", "long")}
    rejected = {p.stem: read_rows(p) for p in (out / "rejected").glob("*.jsonl")}

    # textbook: every item kept, self-revised (critique then rewrite), variables from the grid
    book = rows["book"]
    assert len(book) == 6 and all(r["kind"] == "textbook" and r["generator"] == "book" for r in book)
    for r in book:
        v = r["variables"]
        assert set(v) == {"topic", "audience", "style"}
        assert r["text"].startswith(f"REVISED A lesson on {v['topic']} for {v['audience']} as {v['style']}.")
        assert r["critiques"] == ["CRITIQUE: add an example."] and r["requests"] == 3
        assert r["model"] == "scripted" and r["sampling"]["temperature"] == 0.7 and r["verification"] is None
        assert r["truncated"] == 0 and r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
    assert len({r["seed"] for r in book}) == 6
    assert len({(r["variables"]["topic"], r["variables"]["audience"], r["variables"]["style"]) for r in book}) == 6

    # exercises: kept exactly those the endpoint answered right; the rest rejected for the right reason
    ex = rows["exercises"]
    right = {n for n, (_, wrong) in EXERCISES.items() if wrong is None}
    assert {r["entry_point"] for r in ex} == right
    assert all(r["verification"] == "passed" and f"def {r['entry_point']}(x):" in r["text"] for r in ex)
    assert all("def check(candidate)" in r["tests"] for r in ex)
    reasons = {r["variables"]["function_name"]: r["reason"] for r in rejected["exercises"]}
    assert set(reasons) == (set(EXERCISES) - right) | {MISSING}
    assert reasons[MISSING].startswith("bad exercise: does not define function `nothing_here`")
    assert all(reasons[n].startswith("tests failed") for n in set(EXERCISES) - right)

    # code reversal: with tests, kept iff the regenerated code passes; without, by AST similarity
    rev = {r["entry_point"]: r for r in rows["reversal"]}
    assert set(rev) == {"clamp", "total"}
    assert rev["clamp"]["verification"] == "passed" and rev["clamp"]["similarity"] is None
    assert rev["total"]["similarity"] == 1.0 and rev["total"]["verification"].startswith("ast_similarity 1.000")
    assert rev["clamp"]["text"].startswith("INSTRUCTION: write `clamp`.") and CLAMP.rstrip() in rev["clamp"]["text"]
    rev_rejected = {r["entry_point"]: r["reason"] for r in rejected["reversal"]}
    assert rev_rejected["mid"].startswith("tests failed")
    assert rev_rejected["reverse_words"].startswith("not faithful: AST similarity")

    # rewrite: the format's instructions reached the prompt
    rw = rows["rewrites"]
    assert len(rw) == 4 and {r["variables"]["format"] for r in rw} == {"qa", "discussion"}
    assert any("REWRITE qa:" in p and "questions and answers" in p for p in prompts)

    # long: sections until min_tokens, then stop; the one-section outline is rejected as too short
    lg = rows["long"]
    assert {r["variables"]["topic"] for r in lg} == {"graphs", "sorting"}
    for r in lg:
        assert r["tokens"] >= 150 and 1 < r["sections"] < len(r["outline"])
        assert r["outline"] == ["Beginnings", "Middle part", "Details", "Ending", "Appendix"]
        assert r["text"].startswith("## Beginnings\n\nSection 1 on Beginnings")
        assert r["requests"] == 1 + r["sections"]
    assert rejected["long"][0]["reason"].startswith("too short: ")

    # report: counts, pass rates, coverage, token accounting from `usage`
    report = json.loads((out / "diversity.json").read_text())
    g = report["generators"]
    assert g["exercises"]["verification"] == {"checked": 4, "passed": 2, "pass_rate": 0.5}
    assert g["exercises"]["rejections"] == {"tests failed": 2, "bad exercise": 1}
    assert g["reversal"]["verification"]["passed"] == 2 and g["book"]["verification"] is None
    assert g["book"]["coverage"]["grid"] == 12 and g["book"]["coverage"]["kept_cells"] == 6
    for name in g:
        assert all(0 < g[name]["distinct_n"][n] <= 1 for n in "1234")
        assert 0 <= g[name]["minhash_duplicate_rate"] <= 1 and g[name]["top_openings"]
    t = report["totals"]
    assert t["sent"] == sent == len(prompts) and t["cache_hits"] == 0
    assert t["prompt_tokens"] == sum(len(p.split()) for p in prompts)
    assert t["completion_tokens"] == sum(len(answer(p).split()) for p in prompts)
    assert sum(gr["requests"]["sent"] for gr in g.values()) == sent
    md = (out / "report.md").read_text()
    assert "| exercises | exercises | 5 | 2 | 3 | 0.500 |" in md and "## Requests and tokens" in md
    assert "requests sent" in stdout


def test_near_duplicates_and_openings_are_reported(tmp_path):
    """Two texts that differ in one word are near-duplicates; a third, different one is not."""
    cfg = ReportConfig(minhash_threshold=0.7)
    base = " ".join(f"word{i}" for i in range(80))
    rate, pairs = near_duplicates(["a", "b", "c"], [base, base.replace("word40", "other"),
                                                    " ".join(f"x{i}" for i in range(80))], cfg)
    assert pairs == [["b", "a"]] and rate == round(1 / 3, 4)
    assert openings(["The cat sat", "The cat ran", "A dog"], 2, 5)[0] == {"opening": "the cat", "count": 2}
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == round(2 / 3, 4)


# --------------------------------------------------------------------------------------------------
# resume: kill -9 mid-run, re-run sends only what is missing and ends with the same output
# --------------------------------------------------------------------------------------------------


def test_killed_run_resumes_without_resending(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with ScriptedEndpoint(delay=0.04) as ep:
        recipe = full_recipe(ep.base_url, tmp_path)
        recipe["output"]["format"] = "jsonl"
        path = write_recipe(tmp_path / "r.yaml", recipe)
        a, b = tmp_path / "a", tmp_path / "b"
        proc = subprocess.Popen([*PHITRAIN, "synth", str(path), "--out", str(a), "--quiet"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while ep.count < 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.kill()                                  # SIGKILL: no cleanup of any kind
        proc.wait()
        proc.stderr.close()
        done, received = cached_answers(a), ep.count
        assert 10 <= done <= received, (done, received)

        before = ep.count
        rerun = subprocess.run([*PHITRAIN, "synth", str(path), "--out", str(a), "--quiet"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        resumed_sent = ep.count - before

        before = ep.count
        fresh = subprocess.run([*PHITRAIN, "synth", str(path), "--out", str(b), "--quiet"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert fresh.returncode == 0, fresh.stderr
        total = ep.count - before

        assert resumed_sent == total - done, (resumed_sent, total, done)   # nothing answered was sent again
        totals = json.loads((a / "diversity.json").read_text())["totals"]
        assert totals["sent"] == resumed_sent and totals["cache_hits"] == done, totals
        got, want = outputs(a), outputs(b)
        assert set(want) == {"book.jsonl", "exercises.jsonl", "rewrites.jsonl", "reversal.jsonl", "long.jsonl",
                             "rejected/exercises.jsonl", "rejected/reversal.jsonl", "rejected/long.jsonl"}
        assert got == want

        before = ep.count                             # a finished run re-runs from the cache alone
        again = subprocess.run([*PHITRAIN, "synth", str(path), "--out", str(a), "--quiet"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and ep.count == before
        assert outputs(a) == want


# --------------------------------------------------------------------------------------------------
# failures: retries, then one error line; what was answered stays in the cache
# --------------------------------------------------------------------------------------------------


def small_recipe(base_url: str, n: int = 6, **endpoint) -> dict:
    return {"endpoint": {"base_url": base_url, "model": "scripted", "concurrency": 1, "max_retries": 2,
                         "timeout_s": 5, "backoff_s": 0.01, "backoff_max_s": 0.02, **endpoint},
            "generators": [{"kind": "textbook", "name": "book", "n": n, "topics": ["a", "b", "c"],
                            "templates": ["TEXTBOOK topic={topic} audience={audience} style={style}"]}]}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_http_500_retries_then_error_and_keeps_answers(tmp_path, capsys):
    with ScriptedEndpoint() as ep:
        ep.fail, ep.fail_after = "500", 4
        recipe = write_recipe(tmp_path / "r.yaml", small_recipe(ep.base_url))
        out = tmp_path / "out"
        code, _, err = run_cli(["synth", str(recipe), "--out", str(out), "--quiet"], capsys)
        assert code == 2
        line = one_error_line(err)
        assert "HTTP 500" in line and "gave up after 3 attempts" in line and "4 answers are kept" in line
        assert ep.count == 4 + 3 and cached_answers(out) == 4
        assert not (out / "book.parquet").exists()

        ep.fail = None                                 # the endpoint recovers: only the rest is asked
        before = ep.count
        code, _, err = run_cli(["synth", str(recipe), "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
        assert ep.count - before == 2 and len(read_rows(out / "book.parquet")) == 6


def test_transient_failures_are_retried(tmp_path, capsys):
    with ScriptedEndpoint() as ep:
        ep.fail, ep.fail_times = "500", 2
        recipe = write_recipe(tmp_path / "r.yaml", small_recipe(ep.base_url, n=3))
        code, _, err = run_cli(["synth", str(recipe), "--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert code == 0, err
        totals = json.loads((tmp_path / "out" / "diversity.json").read_text())["totals"]
        assert totals["retries"] == 2 and totals["attempts"] == 5 and totals["sent"] == 3 == ep.count - 2


@pytest.mark.parametrize("mode, expected", [("malformed", "malformed answer, not JSON"),
                                            ("slow", "no answer within endpoint.timeout_s=0.3 s")])
def test_malformed_and_slow_answers(tmp_path, capsys, mode, expected):
    with ScriptedEndpoint() as ep:
        ep.fail, ep.slow_s = mode, 1.5
        recipe = write_recipe(tmp_path / "r.yaml", small_recipe(ep.base_url, timeout_s=0.3, max_retries=1))
        code, _, err = run_cli(["synth", str(recipe), "--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert code == 2
        assert expected in one_error_line(err) and "gave up after 2 attempts" in err
        assert ep.count == 2


def test_unreachable_endpoint(tmp_path, capsys):
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(f"http://127.0.0.1:{port}/v1"))
    code, _, err = run_cli(["synth", str(recipe), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"http://127.0.0.1:{port}/v1/chat/completions: cannot connect" in line and "3 attempts" in line


def test_client_errors_are_not_retried(tmp_path, capsys):
    """A 4xx other than 429 (wrong model, bad key) is a mistake retrying cannot fix."""
    class NotFound(BaseHTTPRequestHandler):
        calls = 0

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            NotFound.calls += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            payload = b'{"error": {"message": "model not found"}}'
            self.send_response(404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        recipe = write_recipe(tmp_path / "r.yaml", small_recipe(url))
        code, _, err = run_cli(["synth", str(recipe), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 2 and "HTTP 404" in one_error_line(err) and "model not found" in err
    assert NotFound.calls == 1


def test_rate_limit_and_completions_api(tmp_path, capsys):
    with ScriptedEndpoint() as ep:
        recipe = small_recipe(ep.base_url, n=4, api="completions", rate_limit=300, concurrency=4)
        recipe["generators"][0]["system"] = "SYSTEM TEXT"
        path = write_recipe(tmp_path / "r.yaml", recipe)
        start = time.monotonic()
        code, _, err = run_cli(["synth", str(path), "--out", str(tmp_path / "out"), "--quiet"], capsys)
        elapsed = time.monotonic() - start
        assert code == 0, err
        assert elapsed >= 3 * 60 / 300 and ep.count == 4
        assert all(p.startswith("SYSTEM TEXT\n\nTEXTBOOK topic=") for p in ep.prompts)


# --------------------------------------------------------------------------------------------------
# recipes: bad input is one error line before any request
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (lambda r: r["generators"][0].update(topcs=["x"]), "generators.0.textbook.topcs: Extra inputs are not permitted"),
    (lambda r: r["generators"][0].update(templates=["TEXTBOOK {topic} {audiance}"]),
     "unknown placeholder(s) ['audiance']"),
    (lambda r: r["generators"][0].update(kind="poem"), "does not match any of the expected tags"),
    (lambda r: r["generators"][0].update(variables={"mood": ["calm"]}), "['mood'] given but no template uses them"),
    (lambda r: r["endpoint"].update(api="responses"), "endpoint.api: Input should be 'chat' or 'completions'"),
    (lambda r: r["generators"].append(dict(r["generators"][0])), "generators: duplicate names ['book']"),
    (lambda r: r["generators"][0].update(topics=[], topics_file="/nonexistent/topics.txt"),
     "topics_file: no such file /nonexistent/topics.txt"),
])
def test_bad_recipes(tmp_path, capsys, change, message):
    with ScriptedEndpoint() as ep:
        recipe = small_recipe(ep.base_url)
        change(recipe)
        path = write_recipe(tmp_path / "r.yaml", recipe)
        code, _, err = run_cli(["synth", str(path), "--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert code == 2 and message in one_error_line(err) and ep.count == 0


def test_set_overrides_apply(tmp_path, capsys):
    with ScriptedEndpoint() as ep:
        path = write_recipe(tmp_path / "r.yaml", small_recipe(ep.base_url))
        code, _, err = run_cli(["synth", str(path), "--out", str(tmp_path / "out"), "--quiet",
                                "--set", "generators.0.n=2", "--set", "output.format=jsonl"], capsys)
        assert code == 0, err
        assert len(read_rows(tmp_path / "out" / "book.jsonl")) == 2 and ep.count == 2


# --------------------------------------------------------------------------------------------------
# planning and verification helpers
# --------------------------------------------------------------------------------------------------


def test_plan_is_deterministic_spread_and_prefix_stable():
    axes = {"template": 2, "topic": 5, "audience": 3}
    a = plan("g", 7, axes, 30)
    assert a == plan("g", 7, axes, 30) and a != plan("g", 8, axes, 30)
    assert len({i.cell for i in a}) == 30                  # one full pass: every cell exactly once
    longer = plan("g", 7, axes, 45)
    assert longer[:30] == a                                  # raising n keeps the first items
    assert len({i.cell for i in longer[30:]}) == 15          # the second pass starts over the grid
    assert len({i.seed for i in longer}) == 45
    first = a[:6]
    assert len({i.value_index("topic") for i in first}) >= 3  # shuffled, not the last axis only


def test_code_helpers():
    assert code_block("Sure:\n```python\nx = 1\n```\nand\n```\ny\n```") == "x = 1\n"
    assert code_block("```\nz = 2\n```") == "z = 2\n" and code_block("plain") == "plain\n"
    renamed = TOTAL.replace("items", "xs").replace("acc", "total_so_far")
    assert ast_similarity(TOTAL, renamed, "total") == 1.0
    assert ast_similarity(TOTAL, "def total(x):\n    return sum(x)\n", "total") < 0.6
    assert ast_similarity(TOTAL, "not python (", "total") == 0.0
    assert outline_sections("Plan\n1. A\n2) **B**\n- C\n## D\ntext") == ["A", "B", "C", "D"]


def test_cache_survives_reopen_and_keys_cover_sampling(tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")
    client = LLMClient(EndpointConfig(model="m", base_url="http://127.0.0.1:9/v1"), cache)
    s = SamplingConfig()
    k = client.key(client.payload("p", None, s, 1))
    assert k == client.key(client.payload("p", None, SamplingConfig(), 1))
    others = {client.key(client.payload("p", None, s, 2)), client.key(client.payload("q", None, s, 1)),
              client.key(client.payload("p", "sys", s, 1)),
              client.key(client.payload("p", None, SamplingConfig(temperature=0.1), 1))}
    assert k not in others and len(others) == 4
    cache.put(k, Answer("hello", "stop", 3, 1, cached=False))
    client.close()
    cache.close()
    reopened = RequestCache(tmp_path / "c.sqlite")
    assert reopened.get(k) == Answer("hello", "stop", 3, 1, cached=True) and len(reopened) == 1
    reopened.close()
    (tmp_path / "bad.sqlite").write_text("not a database" * 100)
    with pytest.raises(PhitrainError, match="not a usable request cache"):
        RequestCache(tmp_path / "bad.sqlite").get(k)
