"""Dedup, decontamination, exercises and the quality filter (heuristic, LLM endpoint, embeddings)."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phitrain.config import DataRecipe, DecontamConfig, DedupConfig, ExercisesConfig, QualityConfig, validate
from phitrain.data import prepare
from phitrain.data.decontam import Decontaminator
from phitrain.data.exercises import extract_exercises
from phitrain.data.quality import LLMAnnotator, QualityModel, heuristic_label
from phitrain.errors import PhitrainError

# HumanEval/0's canonical solution with every identifier renamed, annotations and docstring dropped,
# a comment added and the layout changed.
PLANTED_RENAMED = '''import math


def any_near(values, limit):
    # compare all pairs
    for a, x in enumerate( values ):
        for b, y in enumerate(values):
            if a != b:
                d = abs(x - y)
                if d < limit: return True
    return False
'''
# HumanEval/12's prompt text pasted into a module (a 13-gram overlap)
PLANTED_VERBATIM = '''def pick(strings):
    """ Out of list of strings, return the longest one. Return the first one in case of multiple
    strings of the same length. Return None in case the input list is empty.
    """
    return max(strings, key=len) if strings else None
'''
# HumanEval/26 solution (remove_duplicates), reformatted with black-like wrapping and renamed
PLANTED_REFORMATTED = '''import collections


def dedupe_keep_unique(
    items,
):
    counter = collections.Counter(
        items
    )
    return [
        item
        for item in items
        if counter[item] <= 1
    ]
'''
CLEAN = '''def mean(xs):
    """Arithmetic mean of a non-empty list."""
    total = 0.0
    for x in xs:
        total += x
    return total / len(xs)
'''


def _code(rng: random.Random, n_funcs: int) -> str:
    out = []
    for i in range(n_funcs):
        name = "".join(rng.choice("abcdefghij") for _ in range(8))
        out.append(f"def {name}_{i}(x, y):\n    \"\"\"Combine {name} values.\"\"\"\n"
                   f"    z = x * {rng.randint(1, 99)} + y\n    return z - {rng.randint(1, 99)}\n")
    return "\n\n".join(out)


def test_decontamination_catches_planted_humaneval_solutions():
    deco = Decontaminator.from_config(DecontamConfig())
    m = deco.check("renamed.py", PLANTED_RENAMED)
    assert [(x.task_id, x.method) for x in m] == [("HumanEval/0", "ast")] and m[0].score == 1.0
    m = deco.check("verbatim.py", PLANTED_VERBATIM)
    assert ("HumanEval/12", "ngram") in [(x.task_id, x.method) for x in m]
    m = deco.check("reformatted.py", PLANTED_REFORMATTED)
    assert ("HumanEval/26", "ast") in [(x.task_id, x.method) for x in m]
    assert deco.check("clean.py", CLEAN) == []


def test_decontamination_against_a_jsonl_benchmark(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "T1", "q": CLEAN, "a": ""}) + "\n")
    cfg = DecontamConfig(benchmarks=[{"name": "mine", "kind": "jsonl", "path": str(bench), "fields": ["q", "a"],
                                      "id_field": "id"}])
    hits = Decontaminator.from_config(cfg).check("copy.py", CLEAN.replace("total", "acc").replace("xs", "values"))
    assert {(h.benchmark, h.task_id) for h in hits} == {("mine", "T1")}
    bench.write_text('{"id": "T1", "q": 1}\n')
    with pytest.raises(PhitrainError, match="missing text field"):
        Decontaminator.from_config(cfg)


def test_dedup_catches_planted_near_duplicates(tmp_path):
    """DataTrove's MinHash stages with phitrain's cluster step: the first copy in input order is kept, the
    exact copy and the lightly edited one are dropped and reported as exact and near."""
    rng = random.Random(0)
    base = _code(rng, 40)
    src = tmp_path / "src"
    src.mkdir()
    texts = {"a_base.py": base, "b_other.py": _code(random.Random(1), 40),
             "c_near.py": base.replace("Combine", "Merge", 2) + "\n# vendored copy\n", "d_exact.py": base + "\n"}
    for name, text in texts.items():
        (src / name).write_text(text)
    recipe = validate(DataRecipe, {"sources": [{"name": "code", "kind": "files", "paths": [str(src)]}],
                                   "quality": {"enabled": False}, "decontam": {"enabled": False},
                                   "exercises": {"enabled": False}, "tokenizer": {"vocab_size": 320},
                                   "shards": {"val_fraction": 0.0}, "executor": {"tasks": 2, "workers": 1}}, "test")
    assert DedupConfig().threshold == pytest.approx((1 / 14) ** (1 / 8))
    stats = prepare(recipe, tmp_path / "out", progress=False)
    assert stats["sources"]["code"]["exact_dupes"] == 1 and stats["sources"]["code"]["near_dupes"] == 1
    assert stats["sources"]["code"]["train_docs"] == 2
    report = json.loads((tmp_path / "out" / "reports" / "dedup.json").read_text())
    assert report["exact_clusters"] == [[str(src / "a_base.py"), str(src / "d_exact.py")]]
    assert report["near_clusters"] == [[str(src / "a_base.py"), str(src / "c_near.py")]]


def test_exercises_extracted_from_documented_functions():
    text = CLEAN + "\n\ndef undocumented(x):\n    return x\n\n\nclass K:\n    def m(self):\n        \"\"\"doc\"\"\"\n        return 1\n"
    ex = extract_exercises("m.py", text, ExercisesConfig())
    assert ex == [{"prompt": 'def mean(xs):\n    """Arithmetic mean of a non-empty list."""\n',
                   "completion": "    total = 0.0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
                   "source": "m.py:mean"}]
    assert extract_exercises("x.txt", "not python (", ExercisesConfig()) == []


def test_pipeline_removes_contaminated_documents_and_exercises(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in (("renamed.py", PLANTED_RENAMED), ("verbatim.py", PLANTED_VERBATIM),
                       ("clean.py", CLEAN), ("more.py", _code(random.Random(2), 30))):
        (src / name).write_text(text)
    recipe = validate(DataRecipe, {
        "sources": [{"name": "code", "kind": "files", "paths": [str(src)], "include": ["*.py"]}],
        "quality": {"enabled": False}, "tokenizer": {"vocab_size": 320},
        "shards": {"val_fraction": 0.0}, "executor": {"workers": 1}}, "test")
    stats = prepare(recipe, tmp_path / "out", progress=False)
    assert stats["sources"]["code"]["contaminated"] == 2
    assert stats["decontamination"]["task_ids"] == ["HumanEval/0", "HumanEval/12"]
    report = json.loads((tmp_path / "out" / "reports" / "decontamination.json").read_text())
    assert {(m["doc_id"].split("/")[-1], m["task_id"]) for m in report["documents"]} == \
        {("renamed.py", "HumanEval/0"), ("verbatim.py", "HumanEval/12")}
    kept = "".join(p.read_text() for p in (tmp_path / "out" / "work" / "docs" / "code" / "train").glob("*.jsonl"))
    assert "any_near" not in kept and "def mean" in kept
    exercises = [json.loads(x) for x in (tmp_path / "out" / "exercises.jsonl").read_text().splitlines()]
    assert {e["source"].split("/")[-1] for e in exercises} >= {"clean.py:mean"}
    assert not any("pick" in e["source"] for e in exercises)


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    good = [f"def f{i}(x):\n    \"\"\"Return x scaled.\n\n    Used by the tutorial.\"\"\"\n    # scale it\n"
            f"    y = x * {i}\n    return y + 1\n\n\ndef g{i}(a):\n    \"\"\"Square a.\"\"\"\n    return a * a\n"
            for i in range(n // 2)]
    bad = [", ".join(str(rng.randint(0, 10**6)) for _ in range(400)) + "\n" for _ in range(n - n // 2)]
    docs = good + bad
    rng.shuffle(docs)
    return docs


def _fit_and_keep(docs: list[str], cfg: QualityConfig) -> tuple[QualityModel, list[bool]]:
    """What the quality-fit and quality-filter stages do: annotate a sample, fit, score every document."""
    model = QualityModel(cfg, seed=0).fit(docs[:cfg.sample_size])
    return model, [s >= cfg.threshold for s in model.score(docs)]


def test_quality_filter_heuristic_reports_accuracy_and_kept_fraction(tmp_path):
    docs = _docs(120)
    model, keep = _fit_and_keep(docs, QualityConfig(sample_size=80, n_estimators=20))
    s = model.summary
    assert s["annotated"] == 80 and s["heldout_accuracy"] is not None and s["heldout_accuracy"] >= 0.9
    assert 0.4 <= sum(keep) / len(keep) <= 0.6
    assert all(k == bool(heuristic_label(d)) for k, d in zip(keep, docs))
    model.save(tmp_path / "q.pkl")      # what the scoring tasks load
    assert QualityModel.load(tmp_path / "q.pkl").score(docs) == model.score(docs)


class _Annotator(BaseHTTPRequestHandler):
    requests: list[dict] = []
    fail = False

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"body": body, "auth": self.headers.get("Authorization")})
        if type(self).fail:
            self.send_error(503, "overloaded")
            return
        text = body["messages"][-1]["content"]
        answer = "Yes." if "def " in text else "no"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def llm_server():
    _Annotator.requests, _Annotator.fail = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Annotator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_quality_filter_with_an_openai_compatible_annotator(llm_server, monkeypatch):
    monkeypatch.setenv("PHITRAIN_TEST_KEY", "sk-test")
    cfg = QualityConfig(annotator="llm", base_url=llm_server, model="judge", api_key_env="PHITRAIN_TEST_KEY",
                        sample_size=40, n_estimators=20)
    docs = _docs(60, seed=1)
    model, keep = _fit_and_keep(docs, cfg)
    assert len(_Annotator.requests) == 40 and model.summary["annotated"] == 40
    req = _Annotator.requests[0]
    assert req["body"]["model"] == "judge" and req["auth"] == "Bearer sk-test"
    assert "educational value" in req["body"]["messages"][0]["content"]
    assert model.summary["heldout_accuracy"] == 1.0 and sum(keep) == 30
    _Annotator.fail = True
    with pytest.raises(PhitrainError, match="HTTP 503"):
        LLMAnnotator(cfg).label("def f(): pass")


def test_llm_annotator_unreachable_is_one_clear_error():
    cfg = QualityConfig(annotator="llm", base_url="http://127.0.0.1:9/v1", request_timeout_s=2)
    with pytest.raises(PhitrainError, match="cannot reach"):
        LLMAnnotator(cfg).label("x")


def test_quality_filter_on_checkpoint_embeddings(tmp_path):
    from phitrain import checkpoint
    from phitrain.config import ModelConfig
    from phitrain.model.phi import PhiModel
    from phitrain.tokenizer import train_bpe

    docs = _docs(60, seed=2)
    tok = train_bpe(iter(docs), 320)
    cfg = ModelConfig(block="parallel", vocab_size=tok.padded_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, max_position_embeddings=128)
    checkpoint.save_checkpoint(tmp_path / "ckpt", PhiModel(cfg), tok)
    q = QualityConfig(classifier="embedding", checkpoint=str(tmp_path / "ckpt"), sample_size=40, n_estimators=20)
    model, keep = _fit_and_keep(docs, q)
    assert model.summary["features"] == "embedding" and model.summary["heldout_accuracy"] >= 0.75
    assert 0 < sum(keep) < len(docs)
