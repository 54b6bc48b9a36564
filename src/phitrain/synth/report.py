"""The diversity report every `phitrain synth` run writes (`diversity.json` + `report.md`).

Synthetic data fails quietly by repeating itself: Cosmopedia found that prompts differing in one word
still gave near-duplicates, and phi-1 §2.2 stresses that diversity had to be engineered through
constraints. So each generator's kept texts are measured for
- distinct-n (n = 1..4): distinct word n-grams / all word n-grams (lexical variety, Li et al. 2016);
- MinHash near-duplicate rate: the share of texts whose estimated Jaccard similarity (datasketch MinHash
  over word 5-gram shingles, as the data pipeline's dedup compares documents) to an earlier text reaches
  the threshold;
- the most repeated openings (first words), where template echoes show first;
- coverage of the topic × audience × style grid: how many cells the plan used and how many kept items
  cover;
- pass rates of the verified kinds, requests sent vs answered from the cache, and tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from phitrain.files import atomic_write_text
from phitrain.synth.config import ReportConfig

_WORD = re.compile(r"\w+")
PER_DOCUMENT_AXES = ("template", "seed", "code")


def distinct_n(texts: list[str], n: int) -> float | None:
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = _WORD.findall(text.lower())
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return round(len(set(grams)) / len(grams), 4) if grams else None


def near_duplicates(ids: list[str], texts: list[str], cfg: ReportConfig) -> tuple[float | None, list[list[str]]]:
    """(share of texts with an earlier near-duplicate, up to 10 [id, earlier id] pairs)."""
    if not texts:
        return None, []
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.num_perm)
    sigs = {}
    pairs = []
    for doc_id, text in zip(ids, texts):
        m = MinHash(num_perm=cfg.num_perm, seed=1, hashfunc=_hash32)
        m.update_batch(shingles(text, cfg.shingle_size))
        hits = sorted(j for j in lsh.query(m) if m.jaccard(sigs[j]) >= cfg.minhash_threshold)
        if hits:
            pairs.append([doc_id, hits[0]])
        sigs[doc_id] = m
        lsh.insert(doc_id, m)
    return round(len(pairs) / len(texts), 4), pairs[:10]


def shingles(text: str, size: int) -> list[bytes]:
    """Word `size`-grams of the lower-cased text (the whole text when it is shorter)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return [" ".join(words).encode()]
    return list({" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)})


def _hash32(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=4).digest(), "little")


def openings(texts: list[str], words: int, top: int) -> list[dict[str, Any]]:
    counts = Counter(" ".join(_WORD.findall(t.lower())[:words]) for t in texts)
    return [{"opening": o, "count": c} for o, c in counts.most_common(top)]


def coverage(axes: dict[str, list[str]], planned: list[dict[str, str]], kept: list[dict[str, str]]) -> dict[str, Any]:
    """Cells of the generator's grid — topic × audience × style for textbooks, topic × function name for
    exercises, seed × format for rewrites — used by the plan and covered by kept items. Seed passages and
    code items are left out of the grid when other axes exist (one value per document: their coverage
    is the share of documents used, shown per axis)."""
    names = [a for a in axes if a not in PER_DOCUMENT_AXES] or [a for a in axes if a != "template"]
    if not names:
        return {}
    grid = math.prod(len(axes[a]) for a in names)
    planned_cells = {tuple(v[a] for a in names) for v in planned}
    kept_cells = {tuple(v[a] for a in names) for v in kept}
    return {"axes": names, "grid": grid, "planned_cells": len(planned_cells), "kept_cells": len(kept_cells),
            "kept_fraction": round(len(kept_cells) / grid, 4),
            "values": {a: {"size": len(axes[a]), "kept_used": len({v[a] for v in kept})}
                       for a in axes if a != "template"}}


def generator_report(name: str, kind: str, requested: int, kept: list[dict[str, Any]], rejected: list[dict[str, Any]],
                     verified: tuple[int, int] | None, axes: dict[str, list[str]], planned: list[dict[str, str]],
                     counters: dict[str, int], cfg: ReportConfig) -> dict[str, Any]:
    texts = [r["text"] for r in kept]
    dup_rate, dup_pairs = near_duplicates([r["id"] for r in kept], texts, cfg)
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    return {
        "kind": kind, "requested": requested, "kept": len(kept), "rejected": len(rejected),
        "rejections": dict(reasons.most_common()),
        "verification": ({"checked": verified[0], "passed": verified[1],
                          "pass_rate": round(verified[1] / verified[0], 4) if verified[0] else None}
                         if verified is not None else None),
        "distinct_n": {str(n): distinct_n(texts, n) for n in range(1, 5)},
        "minhash_duplicate_rate": dup_rate, "near_duplicate_pairs": dup_pairs,
        "top_openings": openings(texts, cfg.opening_words, cfg.top_openings),
        "coverage": coverage(axes, planned, [r["variables"] for r in kept]),
        "chars": sum(len(t) for t in texts),
        "truncated": sum(1 for r in kept if r["truncated"]),
        "requests": counters,
    }


def write_report(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out / "diversity.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(summary))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_markdown(summary: dict[str, Any]) -> str:
    t = summary["totals"]
    lines = [f"# Synthetic data: {summary['recipe']}", "",
             f"Model `{summary['model']}` at `{summary['endpoint']}` ({summary['api']} API); "
             f"{summary['seconds']:.1f} s.", "",
             "| generator | kind | requested | kept | rejected | pass rate | distinct-2 | near-dup rate | "
             "grid coverage | requests sent | cache hits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, g in summary["generators"].items():
        cov = g["coverage"]
        cov_s = f"{cov['kept_cells']}/{cov['grid']}" if cov else "–"
        pr = g["verification"]["pass_rate"] if g["verification"] else None
        lines.append(f"| {name} | {g['kind']} | {g['requested']} | {g['kept']} | {g['rejected']} | {_fmt(pr)} | "
                     f"{_fmt(g['distinct_n']['2'])} | {_fmt(g['minhash_duplicate_rate'])} | {cov_s} | "
                     f"{g['requests']['sent']} | {g['requests']['cache_hits']} |")
    lines += ["", "## Requests and tokens", "",
              "| | requests | prompt tokens | completion tokens |", "|---|---|---|---|",
              f"| sent to the endpoint | {t['sent']:,} | {t['prompt_tokens']:,} | {t['completion_tokens']:,} |",
              f"| answered from the cache | {t['cache_hits']:,} | {t['cached_prompt_tokens']:,} | "
              f"{t['cached_completion_tokens']:,} |", "",
              f"HTTP attempts {t['attempts']:,}, retries {t['retries']:,}; answers without `usage` "
              f"{t['usage_missing']:,}. Cache: `{summary['cache']}`."]
    for name, g in summary["generators"].items():
        lines += ["", f"## {name} ({g['kind']})", "",
                  f"Kept {g['kept']} of {g['requested']} ({g['chars']:,} characters; {g['truncated']} with an "
                  "answer cut short by max_tokens)."]
        if g["rejections"]:
            lines.append("Rejected: " + ", ".join(f"{r} {c}" for r, c in g["rejections"].items()) + ".")
        if g["verification"]:
            v = g["verification"]
            lines.append(f"Verification: {v['passed']} of {v['checked']} passed.")
        d = g["distinct_n"]
        lines.append("Distinct-n: " + ", ".join(f"{n}: {_fmt(d[n])}" for n in d) +
                     f"; MinHash near-duplicate rate {_fmt(g['minhash_duplicate_rate'])}.")
        cov = g["coverage"]
        if cov:
            per = ", ".join(f"{a} {c['kept_used']}/{c['size']}" for a, c in cov["values"].items())
            lines.append(f"Coverage of {' × '.join(cov['axes'])}: {cov['kept_cells']} of {cov['grid']} cells kept "
                         f"({cov['planned_cells']} planned); values used: {per}.")
        if g["top_openings"]:
            lines += ["", "| opening | count |", "|---|---|"]
            lines += [f"| {o['opening'] or '(empty)'} | {o['count']} |" for o in g["top_openings"]]
    return "\n".join(lines) + "\n"
