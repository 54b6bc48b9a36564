"""`phitrain data prepare` at scale (issue 9, "What the tests must show"): DataTrove stages that resume
after `kill -9` with byte-identical shards, task counts that do not change what is kept, bad input
counted by reason or stopped with one `error:` line, web pages (a WARC of pages Python's own `pydoc`
renders) turned into clean text, DataTrove's own tokenized output read by the trainer's loader, and the
same recipe on the Slurm (job scripts, executed locally) and Ray (a real local head) executors.

Everything runs for real: real files, real `python -m phitrain` subprocesses, real DataTrove executors.
Corpora are tiny (a few dozen standard-library files, vocab 300-1000) so the file runs in a few minutes
on two shared cores; the Ray test is `slow`.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from phitrain.cli import main as cli_main
from phitrain.config import DataRecipe, MixtureConfig, validate
from phitrain.data import prepare
from phitrain.data.accounting import merge_task_stats
from phitrain.errors import PhitrainError

PY = sys.executable
STDLIB = Path(sysconfig.get_paths()["stdlib"])
STAGES = ["read", "dedup-buckets", "dedup-cluster", "dedup", "filter", "tokenizer", "shards", "report"]
# An HTML tag (<p>, </td>, <a href=...>, <br/>): an element name HTML pages use. Text such as a traceback's
# `<module>` or a repr `<class 'X'>` (shown on the pages as &lt;...&gt;) is content, not a tag.
TAG = re.compile(r"</?(?:a|abbr|article|b|body|br|code|dd|div|dl|dt|em|font|form|h[1-6]|head|hr|html|i|img|input|"
                 r"li|link|meta|nav|ol|p|pre|script|section|span|strong|style|table|tbody|td|th|title|tr|tt|ul)"
                 r"(?:\s[^<>]*)?/?>", re.IGNORECASE)


# ---- helpers -----------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_dict(sources: list[dict], **over) -> dict:
    """A small recipe: quality, decontamination and exercises off unless `over` turns them on."""
    base = {"sources": sources, "quality": {"enabled": False}, "decontam": {"enabled": False},
            "exercises": {"enabled": False}, "tokenizer": {"vocab_size": 400},
            "shards": {"val_fraction": 0.0}, "executor": {"kind": "local", "tasks": 1, "workers": 1}}
    return _merge(base, over)


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))   # JSON is YAML
    return path


def as_recipe(data: dict) -> DataRecipe:
    return validate(DataRecipe, data, "test")


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return env


def prepare_cmd(recipe: Path, out: Path) -> list[str]:
    return [PY, "-m", "phitrain", "data", "prepare", str(recipe), "--out", str(out), "--quiet"]


def run_prepare(recipe: Path, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(prepare_cmd(recipe, out), check=False, capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)
    assert proc.returncode == 0, f"prepare failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr
    return proc


def outputs(out: Path) -> dict[str, bytes]:
    """Every file training reads, by path relative to DATA_DIR: token shards (`.bin`), document
    indexes (`.idx.npy`), shard records, manifests, the tokenizer and exercises.jsonl."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel.startswith("work/") or not p.is_file():
            continue
        if p.name.endswith((".bin", ".idx.npy")) or re.fullmatch(r"shard-\d+\.json", p.name) \
                or p.name in ("manifest.json", "exercises.jsonl") or rel.startswith("tokenizer/"):
            files[rel] = p.read_bytes()
    return files


def assert_same_outputs(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want), f"different files: only here {sorted(set(got) - set(want))}, " \
                                        f"only in the reference {sorted(set(want) - set(got))}"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"files differ from the reference run: {differ}"
    assert any(k.endswith(".bin") for k in want), "no token shards at all"


def completions(out: Path) -> dict[str, set[str]]:
    """Finished tasks per stage, from DataTrove's `work/logs/<stage>/completions/NNNNN` markers."""
    done: dict[str, set[str]] = {}
    for p in (out / "work" / "logs").glob("*/completions/*"):
        done.setdefault(p.parent.parent.name, set()).add(p.name)
    return done


def count_done(out: Path) -> int:
    return len(list((out / "work" / "logs").glob("*/completions/*")))


def kept_docs(out: Path) -> dict[str, set[tuple[str, str]]]:
    """`{source: {(document id, text)}}` of the documents the filter stage kept (both splits)."""
    kept: dict[str, set[tuple[str, str]]] = {}
    for p in (out / "work" / "docs").glob("*/*/*.jsonl"):
        for line in p.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            kept.setdefault(p.parent.parent.name, set()).add((rec["id"], rec["text"]))
    return kept


def decoded_docs(out: Path, source: str, split: str = "train") -> list[str]:
    """The documents of a prepared source's split, decoded from the token shards with the saved
    tokenizer (each document ends with EOS, which is cut off)."""
    from phitrain.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    manifest = json.loads((out / source / "manifest.json").read_text())
    docs = []
    for rec in manifest["splits"][split]["shards"]:
        tokens = np.fromfile(out / source / split / rec["file"], dtype=manifest["dtype"])
        ends = np.load(out / source / split / rec["index"])
        start = 0
        for end in ends.tolist():
            assert tokens[end - 1] == tok.eos_id
            docs.append(tok.decode(tokens[start:end - 1].tolist()))
            start = end
    return docs


def stream_tokens(out: Path, source: str, split: str) -> np.ndarray:
    """A split's token shards concatenated in shard order (what the trainer's TokenStream reads)."""
    manifest = json.loads((out / source / "manifest.json").read_text())
    parts = [np.fromfile(out / source / split / r["file"], dtype=manifest["dtype"])
             for r in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=manifest["dtype"])


def dropped_total(s: dict) -> int:
    """Everything a source lost: drops by reason (utf8_replaced is kept, not a drop), dupes, quality,
    contamination."""
    return (sum(v for r, v in s.get("drops", {}).items() if r != "utf8_replaced") + s.get("exact_dupes", 0)
            + s.get("near_dupes", 0) + s.get("quality_dropped", 0) + s.get("contaminated", 0))


def assert_accounted(stats: dict) -> None:
    for name, s in stats["sources"].items():
        if name == "exercises":
            continue   # mined from kept documents, not read
        kept = s.get("train_docs", 0) + s.get("val_docs", 0)
        assert s.get("read", 0) == kept + dropped_total(s), \
            f"source {name!r}: read {s.get('read')} != kept {kept} + dropped {dropped_total(s)}: {s}"


def stdlib_text(rel: str) -> str:
    return (STDLIB / rel).read_text(encoding="utf-8")


# ---- 1. kill -9 and resume -----------------------------------------------------------------------------

# Total finished tasks (all stages) at which each run is killed. With 4 tasks and 14 MinHash buckets the
# stages end at 4 (read), 18 (dedup-buckets), 19, 23 (dedup), 27 (filter), 28 (tokenizer), 32 (shards),
# 33 (report): the kills land inside read, dedup-buckets, dedup, filter and shards.
KILL_AT = (1, 3, 6, 21, 25, 30)


def test_kill9_at_several_points_then_resume_gives_identical_shards(tmp_path):
    """`kill -9` of the whole process group of `phitrain data prepare` (4 tasks, 1 worker, so tasks run
    in a fixed order) once 1, 3, 6, 21, 25 and 30 tasks have finished in total, each time re-running the
    same command into the same directory; then one last re-run to completion. Only unfinished tasks
    run again (stats.json `tasks` skipped = the completion markers present before the last run, and the
    per-task stats files of finished tasks are untouched), and every shard, index, shard record,
    manifest and the tokenizer equal those of an uninterrupted run byte for byte, with the same counts."""
    data = recipe_dict([{"name": "stdlib", "kind": "stdlib", "max_files": 40}],
                       exercises={"enabled": True}, shards={"val_fraction": 0.1},
                       executor={"tasks": 4, "workers": 1})
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_prepare(recipe, ref)
    total = sum(len(v) for v in completions(ref).values())
    assert total == 33, completions(ref)

    for k in KILL_AT:
        target = max(k, count_done(out) + 1)   # every killed run makes progress of its own
        proc = subprocess.Popen(prepare_cmd(recipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=subprocess_env(), start_new_session=True)
        deadline = time.time() + 240
        try:
            while proc.poll() is None and count_done(out) < target and time.time() < deadline:
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, \
            f"the run meant to be killed at {target} finished tasks ended by itself ({proc.returncode}):\n" \
            f"{err.decode(errors='replace')[-3000:]}"
        done = count_done(out)
        assert target <= done < total, (k, done)
        print(f"killed at {done} finished tasks: { {s: len(r) for s, r in sorted(completions(out).items())} }")

    before = completions(out)
    finished_stats = {(stage, rank): (out / "work" / "logs" / stage / "stats" / f"{rank}.json")
                      for stage, ranks in before.items() for rank in ranks}
    snapshot = {key: (p.stat().st_mtime_ns, p.read_bytes()) for key, p in finished_stats.items()}
    assert sum(len(v) for v in before.values()) >= KILL_AT[-1]

    run_prepare(recipe, out)
    stats = json.loads((out / "stats.json").read_text())
    ref_stats = json.loads((ref / "stats.json").read_text())
    assert set(stats["tasks"]) == set(STAGES)
    for stage, c in stats["tasks"].items():
        assert c["skipped"] == len(before.get(stage, ())), (stage, c, sorted(before.get(stage, ())))
        assert c["ran"] == c["tasks"] - c["skipped"], (stage, c)
    assert sum(c["skipped"] for c in stats["tasks"].values()) >= KILL_AT[-1]
    for key, p in finished_stats.items():
        assert (p.stat().st_mtime_ns, p.read_bytes()) == snapshot[key], f"finished task {key} ran again"

    assert_same_outputs(outputs(out), outputs(ref))
    assert stats["sources"] == ref_stats["sources"]      # nothing counted twice after the kills
    assert stats["sources"]["stdlib"]["train_docs"] > 0 and stats["sources"]["exercises"]["train_docs"] > 0
    assert_accounted(stats)


# ---- 2. task counts -------------------------------------------------------------------------------------

# Standard-library modules of a few KB each, distinct enough that none near-duplicates another.
MODULES = ["textwrap.py", "heapq.py", "shlex.py", "fractions.py", "glob.py", "fnmatch.py", "colorsys.py",
           "getopt.py", "sched.py", "queue.py", "numbers.py", "copy.py", "reprlib.py", "graphlib.py",
           "bisect.py", "tabnanny.py"]


def _change_one_line(text: str) -> str:
    lines = text.splitlines(keepends=True)
    i = next(i for i in range(len(lines) // 2, len(lines)) if lines[i].strip())
    lines[i] = lines[i].rstrip("\n") + "  # changed in this copy\n"
    return "".join(lines)


@pytest.fixture(scope="module")
def dup_corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]], dict[str, str]]:
    """16 distinct modules plus planted copies: 3 exact copies and 3 copies with one line changed, some
    named to sort before their original (so the copy is the one kept) and spread over the task ranges.
    Returns (directory, {"exact": [...], "near": [...]} groups' members, {file: original})."""
    d = tmp_path_factory.mktemp("dups") / "corpus"
    d.mkdir()
    for i, name in enumerate(MODULES):
        (d / f"m{i:02d}_{name}").write_text(stdlib_text(name), encoding="utf-8")
    planted = {  # copy file name -> (original module, kind)
        "a_exact_heapq.py": ("heapq.py", "exact"), "n_exact_glob.py": ("glob.py", "exact"),
        "z_exact_copy.py": ("copy.py", "exact"),
        "a_near_queue.py": ("queue.py", "near"), "n_near_fractions.py": ("fractions.py", "near"),
        "z_near_textwrap.py": ("textwrap.py", "near"),
    }
    origin = {}
    for copy_name, (module, kind) in planted.items():
        text = stdlib_text(module)
        (d / copy_name).write_text(text if kind == "exact" else _change_one_line(text), encoding="utf-8")
        origin[copy_name] = f"m{MODULES.index(module):02d}_{module}"
    groups = {"exact": [c for c, (_, k) in planted.items() if k == "exact"],
              "near": [c for c, (_, k) in planted.items() if k == "near"]}
    return d, groups, origin


def test_task_counts_1_2_4_keep_the_same_documents(dup_corpus, tmp_path):
    """The same corpus with 1, 2 and 4 tasks (real local DataTrove executors): the same exact and near
    duplicates are found and removed (3 each), the kept documents are the same (id, text) set — for each
    planted pair the one first in input order — and the train/val token streams are the same tokens."""
    d, groups, origin = dup_corpus
    results = {}
    for tasks in (1, 2, 4):
        data = recipe_dict([{"name": "code", "kind": "files", "paths": [str(d)]}],
                           shards={"val_fraction": 0.2}, executor={"tasks": tasks, "workers": 1})
        out = tmp_path / f"t{tasks}"
        stats = prepare(as_recipe(data), out, progress=False)
        results[tasks] = (stats, kept_docs(out)["code"], out)

    files = sorted(p.name for p in d.iterdir())
    removed = set()
    for copy_name, original in origin.items():
        removed.add(max(copy_name, original))   # the later one in input (= sorted path) order
    expected_kept = {str(d / f) for f in files if f not in removed}
    for tasks, (stats, kept, _) in results.items():
        s = stats["sources"]["code"]
        assert s["read"] == len(files)
        assert s.get("exact_dupes", 0) == len(groups["exact"]), (tasks, s)
        assert s.get("near_dupes", 0) == len(groups["near"]), (tasks, s)
        assert {i for i, _ in kept} == expected_kept, (tasks, sorted({i for i, _ in kept} ^ expected_kept))
        assert s["train_docs"] + s["val_docs"] == len(expected_kept)
        assert s["val_docs"] > 0
        assert_accounted(stats)
    assert results[1][1] == results[2][1] == results[4][1]
    for split in ("train", "val"):
        ref = stream_tokens(results[1][2], "code", split)
        for tasks in (2, 4):
            assert np.array_equal(stream_tokens(results[tasks][2], "code", split), ref), (split, tasks)


# ---- 3. bad input ---------------------------------------------------------------------------------------

def _jsonl_texts(n: int) -> list[str]:
    """n distinct real texts (docstrings of standard-library functions and classes), no two alike."""
    import inspect

    texts = []
    for mod in ("argparse", "calendar", "collections", "configparser", "dataclasses", "difflib", "email.message",
                "enum", "fractions", "functools", "inspect", "json", "logging", "pathlib", "shlex", "shutil",
                "statistics", "string", "subprocess", "tarfile", "textwrap", "typing", "urllib.parse", "zipfile"):
        m = importlib.import_module(mod)
        for name, obj in sorted(vars(m).items()):
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != m.__name__:
                continue
            doc = inspect.getdoc(obj) or ""
            if len(doc) > 300 and not any(doc in t for t in texts):
                texts.append(f"{mod}.{name}\n\n{doc}\n")
            if len(texts) == n:
                return texts
    raise AssertionError(f"only {len(texts)} docstrings found")


def _warc_bytes(pages: list[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """A gzipped WARC of HTTP responses (text/html); also each record's start offset."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    offsets = []
    for url, body in pages:
        offsets.append(buf.tell())
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))
    return buf.getvalue(), offsets


def _prose_page(title: str, paragraphs: list[str]) -> bytes:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f"<!DOCTYPE html><html><head><title>{title}</title></head><body><nav><a href='/'>Home</a></nav>"
            f"<article><h1>{title}</h1>\n{body}</article></body></html>").encode()


@pytest.fixture
def messy(tmp_path) -> Path:
    """One directory per source, each with a kind of bad input next to good input."""
    import zstandard

    root = tmp_path / "raw"
    texts = _jsonl_texts(80)
    # jsonl: good records, a malformed line, an invalid UTF-8 line, a missing and a non-string field
    (root / "jsonl").mkdir(parents=True)
    lines = [json.dumps({"text": t}).encode() for t in texts[:3]]
    lines += [b"{not json", b'{"text": "bad \xff byte"}', json.dumps({"body": "no text"}).encode(),
              json.dumps({"text": 42}).encode(), b""]
    (root / "jsonl" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "jsonl" / "b-empty.jsonl").write_bytes(b"")                       # an empty file: no records
    # files: good code, invalid UTF-8, a binary blob, whitespace only, zero bytes
    (root / "files").mkdir()
    (root / "files" / "good.py").write_text(stdlib_text("colorsys.py"))
    (root / "files" / "latin1.txt").write_bytes("caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (root / "files" / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "files" / "blank.txt").write_text("  \n\n\t\n")
    (root / "files" / "zero.py").write_bytes(b"")
    # gz / zst: JSONL compressed and then cut in half
    raw = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts[3:60])
    (root / "gz").mkdir()
    gz = gzip.compress(raw)
    (root / "gz" / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    (root / "zst").mkdir()
    zst = zstandard.ZstdCompressor().compress(raw)
    (root / "zst" / "cut.jsonl.zst").write_bytes(zst[:len(zst) // 2])
    # warc: four pages, cut in the middle of the third record's gzip member
    pages = [(f"http://example.test/{i}", _prose_page(f"Page {i}", texts[60 + i * 5:65 + i * 5])) for i in range(4)]
    warc, offsets = _warc_bytes(pages)
    (root / "warc").mkdir()
    (root / "warc" / "cut.warc.gz").write_bytes(warc[:(offsets[2] + offsets[3]) // 2])
    # parquet without the text column
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "pq").mkdir()
    pq.write_table(pa.table({"content": ["def f():\n    return 1\n"], "id": [1]}), root / "pq" / "t.parquet")
    return root


def _bad_input_recipe(root: Path, **over) -> dict:
    sources = [{"name": "jsonl", "kind": "jsonl", "paths": [str(root / "jsonl")]},
               {"name": "files", "kind": "files", "paths": [str(root / "files")]},
               {"name": "gz", "kind": "jsonl", "paths": [str(root / "gz" / "*.jsonl.gz")]},
               {"name": "zst", "kind": "jsonl", "paths": [str(root / "zst" / "*.jsonl.zst")]},
               {"name": "warc", "kind": "web", "paths": [str(root / "warc")]}]
    return recipe_dict(sources, tokenizer={"vocab_size": 300},   # web: extraction + language only
                       web={"gopher_quality": False, "gopher_repetition": False, "fineweb_quality": False}, **over)


def test_bad_input_is_counted_with_its_reason(messy, tmp_path, capfd):
    """Through the CLI: invalid JSON, invalid UTF-8 (a JSONL line and a file), a binary file,
    whitespace-only and zero-byte files, and gzip / zstd / WARC files cut in half are each counted
    under their reason — the truncated compressed files as `corrupt`, never as invalid UTF-8 — with no
    traceback, and for every source read = kept + dropped."""
    recipe = write_recipe(tmp_path / "r.yaml", _bad_input_recipe(messy))
    rc = cli_main(["data", "prepare", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in out + err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    s = stats["sources"]
    assert s["jsonl"]["drops"] == {"malformed_json": 1, "invalid_utf8": 1, "missing_field": 1, "not_a_string": 1}
    assert s["jsonl"]["train_docs"] == 3
    assert s["files"]["drops"] == {"invalid_utf8": 1, "binary": 1, "empty": 2}
    assert s["files"]["train_docs"] == 1
    for name in ("gz", "zst", "warc"):
        drops = s[name]["drops"]
        assert drops.get("corrupt") == 1, f"{name}: a file cut in half must count one corrupt unit: {drops}"
        assert "invalid_utf8" not in drops and "utf8_replaced" not in drops, (name, drops)
    assert s["gz"]["train_docs"] > 0       # the records before the cut are kept
    assert s["warc"]["read"] == 3           # two whole pages + the one cut short (as corrupt)
    assert_accounted(stats)
    examples = json.loads((tmp_path / "out" / "reports" / "drops.json").read_text())
    assert any(str(messy / "gz" / "cut.jsonl.gz") in x for x in examples["gz"]["examples"]["corrupt"])
    assert any(str(messy / "warc" / "cut.warc.gz") in x for x in examples["warc"]["examples"]["corrupt"])


def _one_error_line(err: str, must_name: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, f"expected one error: line, got:\n{err[-3000:]}"
    assert must_name in errors[0], errors[0]
    assert "Traceback" not in err
    return errors[0]


def test_parquet_without_text_column_stops_with_one_error_line(messy, tmp_path, capfd):
    """A Parquet source whose files lack the text column stops the run with exit status 2 and one
    `error:` line that names the file and the columns it has; no traceback."""
    data = recipe_dict([{"name": "pq", "kind": "parquet", "paths": [str(messy / "pq")]}])
    rc = cli_main(["data", "prepare", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(tmp_path / "o")])
    out, err = capfd.readouterr()
    assert rc == 2
    line = _one_error_line(err, str(messy / "pq" / "t.parquet"))
    assert "text" in line and "content" in line
    assert "Traceback" not in out


def test_missing_path_stops_with_one_error_line(tmp_path, capfd):
    """A source path that matches nothing stops the run before any task, exit status 2, one `error:`
    line naming the path."""
    missing = tmp_path / "nowhere" / "*.jsonl"
    data = recipe_dict([{"name": "gone", "kind": "jsonl", "paths": [str(missing)]}])
    rc = cli_main(["data", "prepare", str(write_recipe(tmp_path / "r.yaml", data)), "--out", str(tmp_path / "o")])
    out, err = capfd.readouterr()
    assert rc == 2
    _one_error_line(err, str(missing))
    assert "Traceback" not in out


# ---- 4. web: a WARC of pydoc pages ------------------------------------------------------------------------

PYDOC_MODULES = ["textwrap", "heapq", "shlex", "fractions", "json", "glob"]
PYDOC_TOPICS = ["try", "class", "def", "with", "import", "raise", "NAMESPACES", "BOOLEAN", "EXCEPTIONS", "for"]
JUNK = {
    "short": b"<html><head><title>Hi</title></head><body><p>Hello.</p></body></html>",
    "german": ("<html><body><article><p>Der schnelle braune Fuchs springt \xfcber den faulen Hund, und die Katze "
               "schl\xe4ft auf dem warmen Sofa neben dem Fenster, w\xe4hrend drau\xdfen der Regen f\xe4llt. Die Stadt "
               "ist im Winter sehr ruhig und die Menschen bleiben gerne zu Hause, trinken Tee und lesen B\xfccher "
               "\xfcber die Geschichte des Landes, seiner Berge, Fl\xfcsse und W\xe4lder. Im Sommer fahren viele "
               "Familien an das Meer oder in die Berge, um dort zu wandern und die frische Luft zu genie\xdfen."
               "</p></article></body></html>").encode(),
    "repetitive": ("<html><body><article>" + "".join(
        "<p>Buy cheap watches online now at the best price and save money today.</p>" for _ in range(60))
        + "</article></body></html>").encode(),
}


def pydoc_pages() -> list[tuple[str, bytes]]:
    """What `python -m pydoc -b` serves: module pages and help-topic pages, each with pydoc's navigation
    bar (Module Index : Topics : Keywords, Get/Search forms) and, on module pages, the index / source
    file / Module Reference link bar.

    Rendered in a child process, as pydoc's own server would: rendering a module page re-imports the
    module (`forceload`), and re-importing `json` inside the test process would leave its exception
    classes different from the ones already-imported code catches."""
    script = (
        "import json, pydoc, sys\n"
        "modules, topics = json.loads(sys.argv[1])\n"
        "pages = [(f'http://localhost:7464/{m}.html', pydoc._url_handler(f'{m}.html', 'text/html')) for m in modules]\n"
        "pages += [(f'http://localhost:7464/topic?key={t}', pydoc._url_handler(f'topic?key={t}', 'text/html'))\n"
        "          for t in topics]\n"
        "sys.stdout.write(json.dumps(pages))\n")
    out = subprocess.run([sys.executable, "-c", script, json.dumps([PYDOC_MODULES, PYDOC_TOPICS])],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return [(url, html.encode("utf-8")) for url, html in json.loads(out)]


@pytest.fixture(scope="module")
def pydoc_warc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "pydoc.warc.gz"
    pages = pydoc_pages() + [(f"http://junk.test/{k}", v) for k, v in JUNK.items()]
    path.write_bytes(_warc_bytes(pages)[0])
    return path


# Navigation the pages carry and clean text must not: pydoc's server bar, the platform line, the module
# pages' link bar (index, source path, "Module Reference") and link lists; plus table-layout residue.
BOILERPLATE = ["Module Index", "Topics : Keywords", "Module Reference", "Related help topics", str(STDLIB),
               sys.version.split()[0] + " [", "|  |"]


def _web_run(warc: Path, out: Path, web: dict) -> dict:
    data = recipe_dict([{"name": "web", "kind": "web", "paths": [str(warc)]}], web=web,
                       tokenizer={"vocab_size": 500})
    try:
        return prepare(as_recipe(data), out, progress=False)
    except PhitrainError as err:
        counts = merge_task_stats(out / "work" / "logs" / "read" / "stats")
        pytest.fail(f"prepare failed: {err}\nweb counters: {dict(counts)}")


def test_web_warc_of_pydoc_pages_gives_clean_text_and_drop_counts(pydoc_warc, tmp_path):
    """A `web` source over a WARC (warcio, HTTP responses, text/html) of 16 pydoc pages plus three junk
    pages (a one-word page, a German page, a repeated spam line). Web filters: language + Gopher
    repetition (Gopher quality and FineWeb's line rules are off here: they are prose rules and API
    reference pages fail them — see the next test). The junk is dropped and counted by reason; the
    shards decode to text with no HTML tags and none of pydoc's navigation; real content is there."""
    stats = _web_run(pydoc_warc, tmp_path / "out", {"gopher_quality": False, "fineweb_quality": False})
    s = stats["sources"]["web"]
    assert s["read"] == len(PYDOC_MODULES) + len(PYDOC_TOPICS) + len(JUNK)
    assert_accounted(stats)
    kept_ids = {i for i, _ in kept_docs(tmp_path / "out")["web"]}
    assert not {i for i in kept_ids if "junk.test" in i}, kept_ids
    drops = s["drops"]
    assert drops.get("language", 0) + drops.get("language_score", 0) >= 1, drops     # the German page
    repetition = {r: n for r, n in drops.items() if "dup" in r or "gram" in r}
    assert repetition, drops                                                          # the spam page
    assert len(kept_ids) >= 8, (kept_ids, drops)

    docs = decoded_docs(tmp_path / "out", "web")
    assert len(docs) == len(kept_ids)
    text = "\n".join(docs).replace("\xa0", " ")
    tags = sorted({m.group(0) for m in TAG.finditer(text)})
    assert not tags, f"HTML tags in the shards: {tags[:20]}"
    assert "&nbsp;" not in text and "&amp;" not in text
    left = {b: text.count(b) for b in BOILERPLATE if b in text}
    assert not left, f"navigation boilerplate in the shards: {left}"
    assert 'statement specifies exception handlers' in text         # the "try" topic's prose
    assert "Text wrapping and filling" in text or "textwrap" not in " ".join(kept_ids)


def test_web_default_filters_keep_pydoc_prose(pydoc_warc, tmp_path):
    """With the recipe's default web filters (language, Gopher repetition + quality, FineWeb lines) the
    pydoc WARC still yields text: the Language Reference topic pages are English prose written by the
    Python developers, so at least some must survive, and the junk pages must not."""
    stats = _web_run(pydoc_warc, tmp_path / "out", {})
    s = stats["sources"]["web"]
    assert_accounted(stats)
    kept_ids = {i for i, _ in kept_docs(tmp_path / "out")["web"]}
    assert not {i for i in kept_ids if "junk.test" in i}
    assert {i for i in kept_ids if "topic?key=" in i}, s["drops"]


# ---- 5. DataTrove tokenized output read by the mixture loader ----------------------------------------------

@pytest.mark.parametrize("kind, token_size", [("bpe", 2), ("cl100k", 4)])
def test_datatrove_tokenizer_output_trains_directly(tmp_path, kind, token_size):
    """DataTrove's own `DocumentTokenizer` (local executor, a `tokenizer.json` saved by phitrain's
    tokenizer: a trained BPE of vocab 1000 → uint16 files, phi-4's cl100k → uint32) writes `.ds`,
    `.ds.index` and `.ds.metadata`; a `MixtureConfig` pointing at that folder and the `WindowLoader`
    read windows whose tokens are exactly DataTrove's, and each document is phitrain's encoding of the
    text followed by <|endoftext|>."""
    import torch
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from phitrain.data.shards import TokenStream
    from phitrain.data.windows import WindowLoader
    from phitrain.tokenizer import load_tokenizer, train_bpe

    texts = [stdlib_text(m) for m in ("textwrap.py", "heapq.py", "shlex.py", "glob.py", "fnmatch.py",
                                      "colorsys.py", "bisect.py", "getopt.py")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok_dir = tmp_path / "tok"
    tok = train_bpe(iter(texts), 1000, out_dir=tok_dir) if kind == "bpe" else load_tokenizer("cl100k_base")
    if kind != "bpe":
        tok.save(tok_dir)
    out = tmp_path / "data" / "dt"
    step = DocumentTokenizer(output_folder=str(out), tokenizer_name_or_path=str(tok_dir / "tokenizer.json"),
                             eos_token="<|endoftext|>", seed=0)
    LocalPipelineExecutor([JsonlReader(str(tmp_path / "in")), step], tasks=1, workers=1,
                          logging_dir=str(tmp_path / "logs")).run()
    assert step.token_size == token_size

    ds_files = sorted(out.glob("*.ds"))
    assert ds_files and all(f.with_name(f.name + ".index").is_file() for f in ds_files)
    dtype = np.dtype("<u2" if token_size == 2 else "<u4")
    raw = np.concatenate([np.fromfile(f, dtype=dtype) for f in ds_files]).astype(np.int64)
    ends = np.concatenate([np.fromfile(f.with_name(f.name + ".index"), dtype="<u8") for f in ds_files])
    assert len(ends) == len(texts) and int(ends[-1]) == len(raw)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    got_docs = sorted(tuple(raw[s:e].tolist()) for s, e in zip(starts, ends.astype(np.int64)))
    want_docs = sorted(tuple(tok.encode(t) + [tok.eos_id]) for t in texts)
    assert got_docs == want_docs

    stream = TokenStream(out, "train")
    assert stream.dtype == np.dtype(np.uint16 if token_size == 2 else np.uint32)
    assert len(stream) == len(raw) and np.array_equal(stream.read(0, len(raw)), raw)
    mixture = MixtureConfig(data_dir=str(tmp_path / "data"), sources=[{"path": "dt", "weight": 1.0}])
    seq = 128
    loader = WindowLoader(mixture, seq_len=seq, micro_batch_size=4)
    n = int(loader.n_windows[0])
    assert n == (len(raw) - 1) // seq > 10
    for i in range(n):
        assert np.array_equal(loader.window(0, i), raw[i * seq:i * seq + seq + 1])
    twin = WindowLoader(mixture, seq_len=seq, micro_batch_size=4)
    for _ in range(3):
        inputs, targets = next(loader)
        picks = twin.next_assignments()
        for row, (_, _, index) in enumerate(picks):
            window = torch.from_numpy(raw[index * seq:index * seq + seq + 1])
            assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])


# ---- 6. Slurm ------------------------------------------------------------------------------------------------

FAKE_SBATCH = """#!/usr/bin/env python3
# Test double for Slurm's sbatch: records the arguments and the submitted script, answers like sbatch.
import pathlib, shutil, sys
rec = pathlib.Path({rec!r})
rec.mkdir(parents=True, exist_ok=True)
job = 1000 + len(list(rec.glob("*.args"))) + 1
(rec / f"{{job}}.args").write_text("\\n".join(sys.argv[1:-1]))
shutil.copy(sys.argv[-1], rec / f"{{job}}.sh")
print(f"Submitted batch job {{job}}")
"""
# `srun -l -n 1 CMD...` runs CMD; `scontrol show hostnames LIST` names this machine.
FAKE_SRUN = """#!/bin/bash
while [[ $# -gt 0 && $1 == -* ]]; do case $1 in -n|-N|-c) shift 2;; *) shift;; esac; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; exit 0; fi
echo "scontrol test double: $*" >&2; exit 1
"""


def _fake_slurm(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, rec = tmp_path / "slurm-bin", tmp_path / "sbatch-records"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH.format(rec=str(rec))), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir, rec


def _slurm_recipe() -> dict:
    return recipe_dict([{"name": "stdlib", "kind": "stdlib", "max_files": 12}],
                       dedup={"num_buckets": 2, "hashes_per_bucket": 4}, tokenizer={"vocab_size": 300},
                       executor={"kind": "slurm", "partition": "test", "tasks": 2, "workers": 0})


def _submissions(rec: Path) -> list[dict]:
    subs = []
    for args in sorted(rec.glob("*.args"), key=lambda p: int(p.stem)):
        script = args.with_suffix(".sh").read_text()
        subs.append({"job": args.stem, "args": [a for a in args.read_text().splitlines() if a],
                     "script": script, "path": args.with_suffix(".sh"),
                     "directives": dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE))})
    return subs


def test_slurm_submits_one_array_job_per_stage_with_dependencies(tmp_path, monkeypatch):
    """`executor: slurm` (partition test, 2 tasks) with a test-double `sbatch` first on PATH: one array
    job per stage, `--array=0-(tasks-1)`, each stage after the first submitted with
    `--dependency=afterok:<previous stage's job id>`, scripts that activate this environment and run
    `launch_pickled_pipeline` on the stage's pickled executor (plus DataTrove's merge_stats job per stage,
    after its stage). Then every recorded job script is executed here with bash, in order, one array
    task at a time (SLURM_ARRAY_TASK_ID, the RUN_OFFSET sbatch exports, test doubles for srun and
    scontrol): the shards equal a local-executor run of the same recipe byte for byte."""
    bin_dir, rec = _fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    data = _slurm_recipe()
    out = tmp_path / "out"
    assert prepare(as_recipe(data), out, progress=False) == {}

    subs = _submissions(rec)
    stage_jobs = [s for s in subs if "launch_pickled_pipeline" in s["script"]]
    merge_jobs = [s for s in subs if "merge_stats" in s["script"]]
    assert len(stage_jobs) == len(STAGES) and len(merge_jobs) == len(STAGES) and len(subs) == 2 * len(STAGES)
    tasks = {"read": 2, "dedup-buckets": 2, "dedup-cluster": 1, "dedup": 2, "filter": 2, "tokenizer": 1,
             "shards": 2, "report": 1}
    previous = None
    for stage, job in zip(STAGES, stage_jobs):
        d = job["directives"]
        pik = out / "work" / "logs" / stage / "executor.pik"
        assert f"launch_pickled_pipeline {pik}" in job["script"] and pik.is_file()
        assert d["array"] == f"0-{tasks[stage] - 1}", (stage, d)
        assert d["partition"] == "test" and d["job-name"] == f"phitrain-{stage}", d
        assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in job["script"]
        deps = [a for a in job["args"] if a.startswith("--dependency=")]
        assert deps == ([] if previous is None else [f"--dependency=afterok:{previous}"]), (stage, job["args"])
        assert "--export=ALL,RUN_OFFSET=0" in job["args"]
        previous = job["job"]
    for job, merge in zip(stage_jobs, merge_jobs):
        assert merge["directives"]["dependency"] == f"afterok:{job['job']}"
    assert not (out / "stdlib").exists()     # nothing ran on the submitting machine

    # run the jobs as Slurm would, in dependency order
    env = {**subprocess_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_NODELIST": "localhost", "RUN_OFFSET": "0"}
    for job in stage_jobs:
        first, last = map(int, job["directives"]["array"].split("-"))
        for i in range(first, last + 1):
            proc = subprocess.run(["bash", str(job["path"])], check=False, capture_output=True, text=True, timeout=300,
                                  env={**env, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_JOB_ID": job["job"],
                                       "SLURM_JOB_ID": job["job"]})
            assert proc.returncode == 0, f"job {job['job']} task {i}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert sum(len(v) for v in completions(out).values()) == sum(tasks.values())
    stats = json.loads((out / "stats.json").read_text())
    assert_accounted(stats)

    local = _merge(data, {"executor": {"kind": "local", "workers": 1}})
    prepare(as_recipe(local), tmp_path / "local", progress=False)
    assert_same_outputs(outputs(out), outputs(tmp_path / "local"))


def test_slurm_prepare_cli_reports_submission_without_traceback(tmp_path, monkeypatch, capfd):
    """`phitrain data prepare` on the Slurm executor only submits jobs: the CLI must say so and exit 0
    (there are no stats to print yet), not crash."""
    bin_dir, rec = _fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    recipe = write_recipe(tmp_path / "r.yaml", _slurm_recipe())
    rc = cli_main(["data", "prepare", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    out, err = capfd.readouterr()
    assert rc == 0 and "Traceback" not in out + err, (out[-2000:], err[-3000:])
    assert "Slurm" in out + err
    assert len(_submissions(rec)) == 2 * len(STAGES)


# ---- 7. Ray -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_executor_on_a_local_head_matches_local_shards(tmp_path):
    """A real Ray head started here (2 CPUs, no dashboard) and `executor: {kind: ray, ray_address: <its
    GCS address>}` in a `python -m phitrain data prepare` subprocess: phitrain connects to that cluster
    (its driver shows up in the cluster's job table; it must not start a Ray instance of its own) and
    the shards equal the local executor's byte for byte."""
    import ray
    from ray._private import state as ray_state

    data = recipe_dict([{"name": "stdlib", "kind": "stdlib", "max_files": 12}],
                       dedup={"exact": False, "near": False}, tokenizer={"vocab_size": 300},
                       executor={"tasks": 2, "workers": 1})
    prepare(as_recipe(data), tmp_path / "local", progress=False)

    ctx = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        address = ctx.address_info["gcs_address"]
        ray_recipe = write_recipe(tmp_path / "ray.yaml", _merge(data, {"executor": {
            "kind": "ray", "ray_address": address, "workers": 2, "mem_per_cpu_gb": 0.5}}))
        # An empty Ray temp dir for phitrain: Ray's own discovery (/tmp/ray/ray_current_cluster) cannot
        # find the head, so only `ray_address` leads phitrain to it.
        env = {**subprocess_env(), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt-", dir="/tmp")}
        proc = subprocess.Popen(prepare_cmd(ray_recipe, tmp_path / "ray-out"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = proc.communicate(timeout=900)
        finally:
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
        drivers = {j["DriverPid"] for j in ray_state.jobs()}
        assert proc.pid in drivers, \
            f"phitrain did not connect to the Ray cluster at {address} (drivers: {drivers}); its stderr:\n{err[-2000:]}"
        assert "Started a local Ray instance" not in err
    finally:
        ray.shutdown()
    assert_same_outputs(outputs(tmp_path / "ray-out"), outputs(tmp_path / "local"))


def test_tokenizer_sample_is_even_and_bounded(tmp_path):
    """Above `train_max_bytes` the BPE trains on an even sample (every source file contributes, about the
    budget in total, the same documents each time); at or below it on every document."""
    from phitrain.data.pipeline import TrainTokenizer

    docs = tmp_path / "docs"
    texts = {}
    for name in ("a", "b"):
        for task in range(2):
            path = docs / name / "train" / f"{task:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [f"def {name}{task}_{i}(x):\n    return x + {i}\n" * 20 for i in range(200)]
            texts[path] = rows
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    total = sum(p.stat().st_size for p in texts)

    def sample(budget):
        recipe = DataRecipe.model_validate({"sources": [{"name": "a", "kind": "stdlib"}],
                                            "tokenizer": {"train_max_bytes": budget}})
        return list(TrainTokenizer(recipe, ["a", "b"], str(docs), str(tmp_path / "tok")).texts())

    everything = [t for rows in texts.values() for t in rows]
    assert sample(None) == everything and sample(total) == everything
    part = sample(total // 4)
    assert part == sample(total // 4)                                    # deterministic
    share = sum(len(json.dumps({"text": t})) + 1 for t in part) / total
    assert 0.18 < share < 0.32, share
    for rows in texts.values():                                          # every file contributes
        assert 20 < sum(t in set(rows) for t in part) < 90
