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
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
import hashlib
import heapq
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from phitrain.config import QualityConfig
from phitrain.data.accounting import Accounting
from phitrain.data.decontam import functions, parse_python
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_bytes

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


class QualityModel:
    """An annotated sample and the random forest fitted to it (phi-1 §2.1), saved with the data so that
    every scoring task uses the same classifier. `note` explains a degenerate fit (one class only):
    then every document is kept."""

    def __init__(self, cfg: QualityConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.clf = None
        self.summary: dict = {}

    def features(self, texts: list[str]):
        if self.cfg.classifier == "embedding":
            return embedding_features(texts, self.cfg.checkpoint or "")
        return hashed_features(texts, self.cfg.n_features)

    def fit(self, texts: list[str]) -> "QualityModel":
        """Annotate `texts` (the sample), fit the forest on (1 - test_fraction) of the labelled ones and
        measure its accuracy against the annotator on the rest."""
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.model_selection import train_test_split

        cfg = self.cfg
        labels = LLMAnnotator(cfg).label_many(texts) if cfg.annotator == "llm" else [heuristic_label(t) for t in texts]
        pairs = [(t, y) for t, y in zip(texts, labels) if y is not None]
        positive = sum(y for _, y in pairs)
        self.summary = {"annotated": len(pairs), "unlabelled": len(texts) - len(pairs), "positive_labels": positive,
                        "heldout_accuracy": None, "features": cfg.classifier, "note": ""}
        if positive == 0 or positive == len(pairs) or len(pairs) < 10:
            # One class only: a classifier cannot learn a boundary; keep everything and say why.
            self.summary["note"] = f"annotator gave {positive} positive of {len(pairs)} labels: nothing filtered"
            return self
        x = [t for t, _ in pairs]
        y = [lab for _, lab in pairs]
        stratify = y if min(positive, len(y) - positive) >= 2 else None
        tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=cfg.test_fraction, random_state=self.seed,
                                                  stratify=stratify)
        # fitting is one task (all cores); scoring runs inside the filter stage's parallel tasks (one core)
        self.clf = RandomForestClassifier(n_estimators=cfg.n_estimators, random_state=self.seed, n_jobs=-1)
        self.clf.fit(self.features(tr_x), tr_y)
        self.clf.set_params(n_jobs=1)
        self.summary["heldout_accuracy"] = float(self.clf.score(self.features(te_x), te_y))
        return self

    def score(self, texts: list[str]) -> list[float]:
        """P(educational) per text (1.0 for every text when the fit was degenerate)."""
        if self.clf is None:
            return [1.0] * len(texts)
        positive_col = list(self.clf.classes_).index(1)
        return [float(p) for p in self.clf.predict_proba(self.features(texts))[:, positive_col]]

    def save(self, path: Path) -> None:
        import pickle

        atomic_write_bytes(path, pickle.dumps({"cfg": self.cfg.model_dump(), "seed": self.seed, "clf": self.clf,
                                               "summary": self.summary}))

    @classmethod
    def load(cls, path: Path) -> "QualityModel":
        import pickle

        state = pickle.loads(path.read_bytes())
        model = cls(QualityConfig(**state["cfg"]), state["seed"])
        model.clf, model.summary = state["clf"], state["summary"]
        return model


def sample_key(text: str, seed: int) -> int:
    """A document's place in the annotation sample's order: the `sample_size` documents with the
    smallest keys are annotated. Depends only on content and seed, so the sample is the same whatever
    the task count, and a bounded heap finds it in one streaming pass."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8,
                                          salt=seed.to_bytes(8, "little")).digest(), "big")


class QualityFit(PipelineStep):
    """Stage `quality-fit` (one task): stream the deduplicated documents of the sources in scope, keep
    the `sample_size` with the smallest `sample_key`, annotate them and fit the classifier."""

    name = "🎓 quality fit"
    type = "phitrain"

    def __init__(self, cfg: QualityConfig, seed: int, scope: list[str], docs_dir: str, model_path: str):
        super().__init__()
        self.cfg, self.seed, self.scope = cfg, seed, set(scope)
        self.docs_dir, self.model_path = docs_dir, model_path

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        heap: list[tuple[int, str]] = []   # max-heap of the smallest keys, as (-key, text)
        for path in sorted(Path(self.docs_dir).glob("*.jsonl")):
            with path.open(encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    if rec["metadata"]["source"] not in self.scope:
                        continue
                    item = (-sample_key(rec["text"], self.seed), rec["text"])
                    if len(heap) < self.cfg.sample_size:
                        heapq.heappush(heap, item)
                    elif item[0] > heap[0][0]:
                        heapq.heapreplace(heap, item)
        sample = [t for _, t in sorted(heap, reverse=True)]
        QualityModel(self.cfg, self.seed).fit(sample).save(Path(self.model_path))
        return
        yield  # a generator step that yields nothing


class QualityFilter(Accounting, PipelineStep):
    """Score every document of the sources in scope with the fitted classifier and drop those below
    `threshold` (reason `quality`)."""

    name = "🎓 quality filter"
    type = "phitrain"
    log_name = "quality"

    def __init__(self, cfg: QualityConfig, scope: list[str], model_path: str, drop_dir: str, batch: int = 256):
        super().__init__()
        self.cfg, self.scope, self.model_path, self.drop_dir, self.batch = cfg, set(scope), model_path, drop_dir, batch

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.begin(rank)
        model = QualityModel.load(Path(self.model_path))
        pending: list = []

        def flush():
            for doc, score in zip(pending, model.score([d.text for d in pending])):
                source = doc.metadata["source"]
                self.count(source, "quality_scored")
                doc.metadata["quality_score"] = round(score, 4)
                if score >= self.cfg.threshold:
                    self.count(source, "quality_kept")
                    yield doc
                else:
                    self.drop(source, "quality", doc.id)
            pending.clear()

        for doc in data:
            if doc.metadata["source"] not in self.scope:
                yield from flush()
                yield doc
                continue
            pending.append(doc)
            if len(pending) >= self.batch:
                yield from flush()
        yield from flush()
        self.end()
