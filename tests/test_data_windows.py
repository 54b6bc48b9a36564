"""Shards, windows and mixtures: round trip, mixture shares, exact resume, disjoint ranks, re-run skip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from phitrain.config import DataRecipe, MixtureConfig, validate
from phitrain.data import prepare
from phitrain.data.shards import TokenStream
from phitrain.data.windows import WindowLoader, load_validation_windows
from phitrain.errors import PhitrainError
from phitrain.tokenizer import load_tokenizer

EOT = "<|endoftext|>"


def _words(rng: random.Random, alphabet: str, n: int) -> str:
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(n))


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _recipe(sources: list[dict], **over) -> DataRecipe:
    data = {"sources": sources, "dedup": {"exact": False, "near": False}, "quality": {"enabled": False},
            "decontam": {"enabled": False}, "exercises": {"enabled": False},
            "tokenizer": {"train": True, "vocab_size": 400},
            "shards": {"val_fraction": 0.0}, "executor": {"tasks": 3, "workers": 1}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return validate(DataRecipe, data, "test recipe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three sources with disjoint alphabets, so every window reveals which source it came from; each in
    three files, so that 3 tasks make 3 shards per source (windows then cross shard boundaries)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = {name: [_words(rng, alpha, rng.randint(5, 60)) + "\n" for _ in range(n)]
            for name, alpha, n in (("a", "abcdefg", 120), ("b", "hijklmn", 60), ("c", "opqrstu", 40))}
    sources = [{"name": n, "kind": "jsonl",
                "paths": [str(_write_jsonl(root / f"{n}{k}.jsonl", d[k * len(d) // 3:(k + 1) * len(d) // 3]))
                          for k in range(3)]}
               for n, d in docs.items()]
    out = root / "data"
    stats = prepare(_recipe(sources), out, progress=False)
    return {"root": root, "out": out, "docs": docs, "stats": stats, "sources": sources}


def _mixture(out: Path, weights: dict[str, float], **kw) -> MixtureConfig:
    return MixtureConfig(data_dir=str(out), sources=[{"path": p, "weight": w} for p, w in weights.items()], **kw)


def test_windows_round_trip_reproduces_documents(corpus):
    tok = load_tokenizer(corpus["out"] / "tokenizer")
    seq = 32
    loader = WindowLoader(_mixture(corpus["out"], {"a": 1.0}), seq_len=seq, micro_batch_size=4)
    n = int(loader.n_windows[0])
    stream = [loader.window(0, 0)] + [loader.window(0, i)[1:] for i in range(1, n)]
    tokens = np.concatenate(stream).tolist()
    expected = "".join(d + EOT for d in corpus["docs"]["a"])
    assert tok.decode(tokens) == expected[:len(tok.decode(tokens))]
    total = corpus["stats"]["sources"]["a"]["train_tokens"]
    assert 0 <= total - len(tokens) < seq            # only the tail shorter than one window is left out
    full = TokenStream(corpus["out"] / "a", "train").read(0, total)
    assert tok.decode(full.tolist()) == expected       # the whole stream is the documents joined by EOS
    # one epoch of batches is exactly the set of windows, shuffled
    seen = []
    for _ in range(n // 4):
        x, y = next(loader)
        assert x.dtype == torch.long and x.shape == (4, seq) and torch.equal(x[:, 1:], y[:, :-1])
        seen += [tuple(r) + (int(t),) for r, t in zip(x.tolist(), y[:, -1])]
    all_windows = {tuple(loader.window(0, i).tolist()) for i in range(n)}
    assert len(all_windows) == n              # random words: windows are distinct
    assert len(set(seen)) == len(seen) == (n // 4) * 4 and set(seen) <= all_windows


def test_mixture_shares_and_epochs(corpus):
    tok = load_tokenizer(corpus["out"] / "tokenizer")
    mix = _mixture(corpus["out"], {"a": 0.6, "b": 0.3, "c": 0.1}, seed=3)
    seq = 8
    loader = WindowLoader(mix, seq_len=seq, micro_batch_size=50)
    counts = {"a": 0, "b": 0, "c": 0}
    alphabets = {"a": set("abcdefg"), "b": set("hijklmn"), "c": set("opqrstu")}
    for _ in range(200):                      # 10,000 windows
        x, y = next(loader)
        for row in torch.cat([x, y[:, -1:]], 1).tolist():
            letters = set(tok.decode(row).replace(EOT, "")) - set(" \n")
            owner = [s for s, al in alphabets.items() if letters and letters <= al]
            assert len(owner) == 1, letters
            counts[owner[0]] += 1
    total = sum(counts.values())
    assert total == 10_000
    for s, w in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(counts[s] / total - w) <= 0.02
    budget = 1_000_000
    rows = {r["source"]: r for r in loader.report(budget)}
    per_epoch = loader.epoch_tokens()
    for s, w in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert per_epoch[s] == ((corpus["stats"]["sources"][s]["train_tokens"] - 1) // seq) * seq
        assert rows[s]["share"] == pytest.approx(w)
        assert rows[s]["unique_tokens"] == corpus["stats"]["sources"][s]["train_tokens"]
        assert rows[s]["epochs"] == pytest.approx(w * budget / per_epoch[s])


def test_resume_is_exact_across_epochs(corpus):
    mix = _mixture(corpus["out"], {"a": 0.5, "b": 0.3, "c": 0.2}, seed=7)
    ref = WindowLoader(mix, seq_len=16, micro_batch_size=8)
    epoch_c = int(ref.n_windows[2])
    steps = int(3 * epoch_c / (8 * 0.2)) + 2   # long enough for source c to wrap into later epochs
    first = [next(ref) for _ in range(steps // 2)]
    state = json.loads(json.dumps(ref.state_dict()))       # survives serialisation
    rest = [next(ref) for _ in range(steps // 2)]
    assert ref.state_dict()["taken"][2] > 2 * epoch_c
    resumed = WindowLoader(mix, seq_len=16, micro_batch_size=8)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, (next(resumed) for _ in rest)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = WindowLoader(mix, seq_len=16, micro_batch_size=8)
    assert all(torch.equal(a[0], next(again)[0]) for a in first)        # deterministic from the start
    with pytest.raises(PhitrainError, match="seq_len"):
        WindowLoader(mix, seq_len=12, micro_batch_size=8).load_state_dict(state)
    other_epochs = [torch.equal(a[0], b[0]) for a, b in zip(first, rest)]
    assert not all(other_epochs)


def test_ranks_get_disjoint_windows_covering_the_epoch(corpus):
    mix = _mixture(corpus["out"], {"b": 1.0}, seed=1)
    seq, B, W = 16, 3, 2
    loaders = [WindowLoader(mix, seq_len=seq, micro_batch_size=B, rank=r, world_size=W) for r in range(W)]
    n = int(loaders[0].n_windows[0])
    index = {tuple(loaders[0].window(0, i).tolist()): i for i in range(n)}
    assert len(index) == n                    # random words: every window is distinct
    steps = n // (B * W)
    seen = []
    for r, ld in enumerate(loaders):
        mine = set()
        for _ in range(steps):
            x, y = next(ld)
            for row in torch.cat([x, y[:, -1:]], 1).tolist():
                mine.add(index[tuple(row)])
        assert len(mine) == steps * B
        seen.append(mine)
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == steps * B * W and n - steps * B * W < B * W
    assert loaders[0].state_dict() == loaders[1].state_dict()   # one position for the checkpoint


def test_min_doc_tokens_selects_long_documents(corpus):
    out = corpus["out"]
    full = TokenStream(out / "a", "train")
    long_ = TokenStream(out / "a", "train", min_doc_tokens=60)
    ends = np.concatenate([np.load(out / "a" / "train" / r["index"]) + off for r, off in
                           zip(full.manifest["splits"]["train"]["shards"],
                               np.cumsum([0] + [r["tokens"] for r in full.manifest["splits"]["train"]["shards"]]))])
    lengths = np.diff(np.concatenate([[0], ends])) - 1
    assert 0 < long_.docs == int((lengths >= 60).sum()) < full.docs
    assert len(long_) == int((lengths[lengths >= 60] + 1).sum())
    tok = load_tokenizer(out / "tokenizer")
    docs = tok.decode(long_.read(0, len(long_)).tolist()).split(EOT)[:-1]
    assert all(len(tok.encode(d)) >= 60 for d in docs)
    mix = MixtureConfig(data_dir=str(out), sources=[{"path": "a", "weight": 0.5},
                                                    {"path": "a", "weight": 0.5, "min_doc_tokens": 60}])
    ld = WindowLoader(mix, seq_len=16, micro_batch_size=2)
    assert ld.keys == ["a", "a@60"]           # the same source up-weighted for its long documents
    next(ld)


def test_validation_split_and_rerun_skips_shards(tmp_path, corpus):
    sources = [dict(s) for s in corpus["sources"]]
    recipe = _recipe(sources, shards={"val_fraction": 0.2})
    out = tmp_path / "d"
    stats = prepare(recipe, out, progress=False)
    for s in ("a", "b", "c"):
        st = stats["sources"][s]
        assert st["val_docs"] > 0 and st["train_docs"] + st["val_docs"] == len(corpus["docs"][s])
    mix = _mixture(out, {"a": 0.6, "b": 0.3, "c": 0.1})
    val = load_validation_windows(mix, seq_len=16, max_windows=10)
    assert val.shape == (10, 17) and val.dtype == torch.long
    assert torch.equal(val, load_validation_windows(mix, seq_len=16, max_windows=10))
    with pytest.raises(PhitrainError, match="val split"):
        load_validation_windows(mix, seq_len=100_000, max_windows=10)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.bin")}
    again = prepare(recipe, out, progress=False)
    assert all(t["ran"] == 0 for t in again["tasks"].values())     # every DataTrove task was done
    assert len(before) > 9 and again["tokenizer"] == stats["tokenizer"]   # 3 sources x 3 tasks x 2 splits
    assert {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.bin")} == before


def test_parallel_tokenisation_is_deterministic(tmp_path, corpus):
    sources = [dict(s) for s in corpus["sources"]]
    out = tmp_path / "p"
    prepare(_recipe(sources, executor={"workers": 2}), out, progress=False)
    for s in ("a", "b", "c"):
        one = TokenStream(corpus["out"] / s, "train")
        two = TokenStream(out / s, "train")
        assert one.manifest["dtype"] == "uint16"
        assert np.array_equal(one.read(0, len(one)), two.read(0, len(two)))
        for shard in (corpus["out"] / s / "train").glob("shard-*.bin"):
            assert shard.read_bytes() == (out / s / "train" / shard.name).read_bytes()
        meta = json.loads((out / s / "manifest.json").read_text())
        assert meta["tokenizer"]["fingerprint"] == one.manifest["tokenizer"]["fingerprint"]


def test_loader_errors_are_clear(tmp_path, corpus):
    with pytest.raises(PhitrainError, match="not a prepared source"):
        WindowLoader(_mixture(tmp_path, {"nope": 1.0}), seq_len=8, micro_batch_size=1)
    with pytest.raises(PhitrainError, match="fewer than seq_len"):
        WindowLoader(_mixture(corpus["out"], {"c": 1.0}), seq_len=10**7, micro_batch_size=1)
    with pytest.raises(PhitrainError, match="rank"):
        WindowLoader(_mixture(corpus["out"], {"c": 1.0}), seq_len=8, micro_batch_size=1, rank=2, world_size=2)
