"""Quality filter (phi-1 §2.1): annotate a sample for educational value, learn a classifier, score all.

phi-1 had GPT-4 label ~100k files for "educational value for a student whose goal is to learn basic
coding concepts", trained a random forest on a pretrained code model's embeddings to predict the label,
and kept what it scored highly (~6B of 35B tokens). Here:
- annotators: `LLMAnnotator` (any OpenAI-compatible /chat/completions endpoint, how phi-1 labelled) or
  `heuristic_label` (offline: documented, commented, readable, logic rather than data tables);
- features: hashed word/punctuation n-grams (`HashingVectorizer`, no vocabulary to store) or mean-pooled
  final hidden states of a phitrain checkpoint (the paper's embedding approach);
- classifier: scikit-learn `RandomForestClassifier`, as in the paper; held-out accuracy is reported.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from phitrain.config import QualityConfig
from phitrain.data.decontam import functions, parse_python
from phitrain.errors import PhitrainError

PROMPT = ("You label training data. Determine the educational value of the following file for a student "
          "whose goal is to learn basic coding concepts. Answer with one word: yes (it has educational "
          "value) or no (it does not).")
# a line that is only data: numbers, short quoted strings, brackets and commas (a table, not logic)
_LITERAL_LINE = re.compile(r"""[\s\d.,:xXa-fA-F_+\-\[\](){}]*(?:(?:'[^']*'|"[^"]*")[\s\d.,:\[\](){}]*)*""")


def heuristic_score(text: str, tree: ast.AST | None = None) -> float:
    """A 0–1 educational-value score from structure alone. For Python: share of documented functions,
    comment density, readable line lengths, real logic (functions/classes) rather than data tables. For
    other text: prose-like character mix and line lengths."""
    lines = text.splitlines()
    n = len(lines)
    if n == 0:
        return 0.0
    lengths = [len(ln) for ln in lines]
    mean_len = sum(lengths) / n
    readable = 1.0 if 8 <= mean_len <= 80 and max(lengths) <= 160 else 0.0
    tree = tree if tree is not None else parse_python(text)
    if tree is None:
        letters = sum(c.isalpha() or c.isspace() for c in text) / max(1, len(text))
        return 0.5 * readable + 0.5 * (1.0 if letters > 0.8 else 0.0)
    funcs = functions(tree)
    documented = sum(1 for f in funcs if ast.get_docstring(f, clean=False)) / len(funcs) if funcs else 0.0
    comments = sum(1 for ln in lines if ln.lstrip().startswith("#"))
    doc_ratio = (comments + sum(len((ast.get_docstring(f, clean=False) or "").splitlines()) for f in funcs)) / n
    literal = sum(1 for ln in lines if ln.strip() and _LITERAL_LINE.fullmatch(ln)) / n
    score = (0.35 * documented
             + 0.2 * (1.0 if 0.05 <= doc_ratio <= 0.6 else 0.0)
             + 0.2 * readable
             + 0.15 * (1.0 if funcs else 0.0)
             + 0.1 * (1.0 if literal < 0.2 else 0.0))
    if n < 5 or n > 5000:
        score *= 0.5
    return score


def heuristic_label(text: str, tree: ast.AST | None = None) -> int:
    return int(heuristic_score(text, tree) >= 0.6)


class LLMAnnotator:
    """Labels documents through an OpenAI-compatible `POST {base_url}/chat/completions`. A reply that is
    neither yes nor no gives None (counted as unlabelled, not guessed)."""

    def __init__(self, cfg: QualityConfig, max_chars: int = 6000):
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.model = cfg.model
        self.timeout = cfg.request_timeout_s
        self.max_chars = max_chars
        self.api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self.api_key:
            raise PhitrainError(f"quality.api_key_env: environment variable {cfg.api_key_env} is not set")

    def label(self, text: str) -> int | None:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 5, "messages": [
            {"role": "system", "content": PROMPT},
            {"role": "user", "content": text[:self.max_chars]}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise PhitrainError(f"quality annotator: {self.url} answered HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise PhitrainError(f"quality annotator: cannot reach {self.url}: {reason}") from None
        except json.JSONDecodeError:
            raise PhitrainError(f"quality annotator: {self.url} did not answer JSON") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise PhitrainError(f"quality annotator: {self.url} answered without choices[0].message.content") from None
        word = re.match(r"\W*(\w+)", content or "")
        answer = word.group(1).lower() if word else ""
        return 1 if answer == "yes" else 0 if answer == "no" else None

    def label_many(self, texts: list[str], threads: int = 8) -> list[int | None]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.label, texts))


def hashed_features(texts: list[str], n_features: int):
    """Sparse hashed counts of word/punctuation unigrams and bigrams (triple quotes and `#` are features too)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(n_features=n_features, token_pattern=r"\w+|[^\w\s]+", lowercase=False,
                            ngram_range=(1, 2), alternate_sign=False, norm="l2")
    return vec.transform(texts)


def embedding_features(texts: list[str], checkpoint: str, max_tokens: int = 512):
    """Mean-pooled final hidden states of a phitrain checkpoint, one row per text (phi-1 §2.1 used a
    pretrained code model's output embeddings)."""
    import numpy as np
    import torch

    from phitrain.checkpoint import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    if tok is None:
        raise PhitrainError(f"quality.checkpoint: {checkpoint} has no tokenizer/ directory")
    limit = min(max_tokens, model.config.max_position_embeddings)
    rows = []
    with torch.no_grad():
        for ids in tok.encode_batch(texts):
            ids = (ids or [tok.eos_id])[:limit]
            hidden = model(torch.tensor([ids]), return_hidden=True)
            rows.append(hidden[0].float().mean(0).numpy())
    return np.stack(rows)


@dataclass
class QualityResult:
    keep: list[bool]
    scores: list[float]
    annotated: int = 0
    unlabelled: int = 0
    positive: int = 0
    accuracy: float | None = None        # held-out accuracy of the classifier vs the annotator
    note: str = ""
    feature: str = "ngram"
    kept: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.kept = sum(self.keep)

    def summary(self) -> dict:
        n = len(self.keep)
        return {"documents": n, "kept": self.kept, "kept_fraction": self.kept / n if n else 0.0,
                "annotated": self.annotated, "unlabelled": self.unlabelled, "positive_labels": self.positive,
                "heldout_accuracy": self.accuracy, "features": self.feature, "note": self.note}


def quality_filter(texts: list[str], cfg: QualityConfig, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> QualityResult:
    """Annotate a random sample of `sample_size` documents, fit the forest on (1 - test_fraction) of it,
    report accuracy on the rest, then score every document and keep those with P(educational) ≥
    threshold."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    n = len(texts)
    if n == 0:
        return QualityResult(keep=[], scores=[])
    rng = random.Random(seed)
    sample = sorted(rng.sample(range(n), min(cfg.sample_size, n)))
    if cfg.annotator == "llm":
        labels = LLMAnnotator(cfg).label_many([texts[i] for i in sample])
    else:
        labels = [heuristic_label(texts[i]) for i in sample]
    pairs = [(i, y) for i, y in zip(sample, labels) if y is not None]
    unlabelled = len(sample) - len(pairs)
    positive = sum(y for _, y in pairs)
    base = dict(annotated=len(pairs), unlabelled=unlabelled, positive=positive, feature=cfg.classifier)
    if positive == 0 or positive == len(pairs) or len(pairs) < 10:
        # One class only: a classifier cannot learn a boundary; keep everything and say why.
        return QualityResult(keep=[True] * n, scores=[1.0] * n,
                             note=f"annotator gave {positive} positive of {len(pairs)} labels: nothing filtered",
                             **base)

    def features(idx: list[int]):
        chunk = [texts[i] for i in idx]
        if cfg.classifier == "embedding":
            return embedding_features(chunk, cfg.checkpoint or "")
        return hashed_features(chunk, cfg.n_features)

    idx = [i for i, _ in pairs]
    y = [lab for _, lab in pairs]
    stratify = y if min(positive, len(y) - positive) >= 2 else None
    tr_i, te_i, tr_y, te_y = train_test_split(idx, y, test_size=cfg.test_fraction, random_state=seed,
                                              stratify=stratify)
    clf = RandomForestClassifier(n_estimators=cfg.n_estimators, random_state=seed, n_jobs=-1)
    clf.fit(features(tr_i), tr_y)
    accuracy = float(clf.score(features(te_i), te_y))
    positive_col = list(clf.classes_).index(1)
    scores: list[float] = []
    step = 2000
    for start in range(0, n, step):
        block = list(range(start, min(n, start + step)))
        scores.extend(float(p) for p in clf.predict_proba(features(block))[:, positive_col])
        if progress:
            progress(len(block))
    return QualityResult(keep=[s >= cfg.threshold for s in scores], scores=scores, accuracy=accuracy, **base)
