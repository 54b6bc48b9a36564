"""Deduplication: exact (content hash) and near-duplicate (MinHash LSH, datasketch).

phi-1 §2.1 starts from the *deduplicated* Python subset of The Stack; near-duplicates (a vendored copy
with a changed header, a file forked and lightly edited) inflate some content's effective epochs and
leak between train and validation. Documents are compared on word shingles (runs of `shingle_size`
tokens), so whitespace and formatting changes do not hide a copy. The first document of each cluster (in
input order) is kept; the rest are dropped and every cluster is reported.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from phitrain.config import DedupConfig

_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class DedupResult:
    keep: list[bool]
    exact_clusters: list[list[str]] = field(default_factory=list)   # [kept id, dropped ids...]
    near_clusters: list[list[str]] = field(default_factory=list)

    @property
    def exact_dropped(self) -> int:
        return sum(len(c) - 1 for c in self.exact_clusters)

    @property
    def near_dropped(self) -> int:
        return sum(len(c) - 1 for c in self.near_clusters)


def shingles(text: str, size: int) -> set[bytes]:
    words = _WORD.findall(text)
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def _hash32(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=4).digest(), "little")


def minhash(text: str, cfg: DedupConfig):
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=1, hashfunc=_hash32)
    m.update_batch(list(shingles(text, cfg.shingle_size)))
    return m


def deduplicate(ids: list[str], texts: list[str], cfg: DedupConfig, progress=None) -> DedupResult:
    """Mark duplicates across all given documents (all sources together: a file present in two sources
    is still one file). `progress(n)` is called as documents are processed."""
    keep = [True] * len(texts)
    result = DedupResult(keep=keep)
    if cfg.exact:
        first: dict[bytes, int] = {}
        clusters: dict[int, list[str]] = {}
        for i, t in enumerate(texts):
            h = hashlib.sha256(t.strip().encode("utf-8", errors="replace")).digest()
            j = first.setdefault(h, i)
            if j != i:
                keep[i] = False
                clusters.setdefault(j, [ids[j]]).append(ids[i])
        result.exact_clusters = [clusters[j] for j in sorted(clusters)]
    if cfg.near:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        sigs: dict[int, object] = {}
        parent: dict[int, int] = {}
        for i, t in enumerate(texts):
            if progress:
                progress(1)
            if not keep[i]:
                continue
            m = minhash(t, cfg)
            hits = [j for j in lsh.query(m) if m.jaccard(sigs[j]) >= cfg.threshold]
            if hits:
                # attach to the earliest kept document it resembles; that one represents the cluster
                root = min(parent.get(j, j) for j in hits)
                parent[i] = root
                keep[i] = False
            else:
                sigs[i] = m
                lsh.insert(i, m)
        groups: dict[int, list[str]] = {}
        for i in sorted(parent):
            groups.setdefault(parent[i], [ids[parent[i]]]).append(ids[i])
        result.near_clusters = [groups[r] for r in sorted(groups)]
    elif progress:
        progress(len(texts))
    return result
