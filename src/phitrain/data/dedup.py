"""Deduplication on DataTrove's MinHash pipeline, made independent of the task count.

phi-1 §2.1 starts from the *deduplicated* Python subset of The Stack; near-duplicates (a vendored copy
with a changed header, a file forked and lightly edited) inflate some content's effective epochs and
leak between train and validation. DataTrove's four MinHash stages do the work at any scale:
signatures per task → duplicate pairs per bucket → clusters (one task) → filter per task. phitrain keeps
stages 2 and 4 as they are and adapts two things:

- `Signatures` (stage 1): a document shorter than one shingle still gets one (its whole normalised
  text), so short exact copies are found too; and each document's content hash is written beside its
  signature so that stage 3 can tell exact copies from near ones for the report.
- `Clusters` (stage 3): DataTrove keeps the root of a union-by-size tree, which depends on the order
  pairs arrive in. Here the kept document of a cluster is always its *first in input order* — (task,
  index) is input order because sources are sharded into contiguous ranges — so 1, 2 or 4 tasks keep
  the same documents. Every cluster is reported with its document ids, split into exact and near.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupCluster, MinhashDedupSignature
from datatrove.utils.text import simplify_text

from phitrain.config import DedupConfig
from phitrain.data.accounting import Accounting
from phitrain.files import atomic_path, atomic_write_bytes, atomic_write_text

_WORD = re.compile(r"\w+|[^\w\s]")


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    return MinhashConfig(n_grams=cfg.shingle_size, num_buckets=cfg.num_buckets, hashes_per_bucket=cfg.hashes_per_bucket)


def content_hash(text: str) -> int:
    """64-bit hash of a document's stripped text: equal hashes = exact copies."""
    return int.from_bytes(hashlib.blake2b(text.strip().encode("utf-8", errors="replace"), digest_size=8).digest(),
                          "little")


class RegexWords:
    """Words and single punctuation marks: code's identifiers and operators, with no language model to
    load (DataTrove's English word tokenizer needs spaCy and is built for prose)."""

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)


class Signatures(MinhashDedupSignature):
    """MinHash stage 1 with a signature for every document (see the module docstring) and a
    `hashes/NNNNN.npy` file of content hashes in document order, plus the document ids (`ids/`)."""

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config=config)
        self.folder = Path(output_folder)
        self.word_tokenizer = RegexWords()

    def get_shingles(self, text: str) -> np.ndarray:
        shingles = super().get_shingles(text)
        if shingles.size == 0:
            whole = " ".join(self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config)))
            shingles = np.array([[self._hash_func(whole or text)]], dtype=np.uint64)
        return shingles

    def run(self, data, rank: int = 0, world_size: int = 1):
        hashes: list[int] = []
        ids: list[str] = []

        def tap():
            for doc in data:
                hashes.append(content_hash(doc.text))
                ids.append(doc.id)
                yield doc

        super().run(tap(), rank, world_size)   # DataTrove's stage 1 consumes the documents, yields none
        _save_npy(self.folder / "hashes" / f"{rank:05d}.npy", np.asarray(hashes, dtype=np.uint64))
        atomic_write_text(self.folder / "ids" / f"{rank:05d}.json", json.dumps(ids))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, arr)


class Clusters(MinhashDedupCluster):
    """MinHash stage 3: union the duplicate pairs, keep the first document (in input order) of each
    cluster, write DataTrove's `NNNNNN.remove` files for stage 4 and `clusters.json` for the report.
    With `near: false` only exact copies (equal content hashes) are joined; with `exact: false` exact
    copies are not removed."""

    def __init__(self, sigs_folder: str, dups_folder: str, output_folder: str, config: MinhashConfig,
                 cfg: DedupConfig):
        super().__init__(dups_folder, output_folder, config=config)
        self.sigs = Path(sigs_folder)
        self.out = Path(output_folder)
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.utils.binaryio import read_tuples_from_file

        hashes: dict[int, np.ndarray] = {}

        def chash(node: tuple[int, int]) -> int:
            if node[0] not in hashes:
                hashes[node[0]] = np.load(self.sigs / "hashes" / f"{node[0]:05d}.npy")
            return int(hashes[node[0]][node[1]])

        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def find(x):
            while parent.get(x, x) != x:
                parent[x] = parent.get(parent[x], parent[x])
                x = parent[x]
            return x

        for dup_file in self.input_folder.list_files(glob_pattern="*.dups"):
            with self.input_folder.open(dup_file, "rb") as f:
                for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=self.lines_to_buffer):
                    a, b = (f1, d1), (f2, d2)
                    exact = chash(a) == chash(b)
                    if (exact and not self.cfg.exact) or (not exact and not self.cfg.near):
                        continue
                    ra, rb = find(a), find(b)
                    if ra != rb:   # the smaller node (earlier in input order) becomes the root
                        parent[max(ra, rb)] = min(ra, rb)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for node in sorted(parent):
            root = find(node)
            if node != root:
                groups[root].append(node)
        removals: dict[int, list[int]] = defaultdict(list)
        clusters = []
        for root in sorted(groups):
            members = groups[root]
            for task, index in members:
                removals[task].append(index)
            clusters.append({"keep": list(root), "exact": [list(m) for m in members if chash(m) == chash(root)],
                             "near": [list(m) for m in members if chash(m) != chash(root)]})
        self.out.mkdir(parents=True, exist_ok=True)
        for task, indices in removals.items():
            atomic_write_bytes(self.out / f"{task:06d}.remove", b"".join(struct.pack("<I", i) for i in sorted(indices)))
        atomic_write_text(self.out / "clusters.json", json.dumps(clusters))
        self.stat_update("clusters", value=len(clusters))
        return
        yield


class CountDedup(Accounting, PipelineStep):
    """Stage 4's accounting: runs before DataTrove's `MinhashDedupFilter` (same document order) and counts
    the documents it is about to remove per source as exact or near duplicates."""

    name = "🫂 dedup accounting"
    type = "phitrain"
    log_name = "dedup"

    def __init__(self, clusters_folder: str, sigs_folder: str, drop_dir: str):
        super().__init__()
        self.clusters, self.sigs, self.drop_dir = Path(clusters_folder), Path(sigs_folder), drop_dir

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.begin(rank)
        path = self.clusters / f"{rank:06d}.remove"
        remove = set(struct.unpack(f"<{path.stat().st_size // 4}I", path.read_bytes())) if path.is_file() else set()
        exact = set()
        if remove:
            for c in json.loads((self.clusters / "clusters.json").read_text()):
                exact.update(i for t, i in c["exact"] if t == rank)
        for index, doc in enumerate(data):
            if index in remove:
                self.drop(doc.metadata["source"], "exact_dupe" if index in exact else "near_dupe", doc.id)
            yield doc
        self.end()


def cluster_report(clusters_folder: Path, sigs_folder: Path) -> dict:
    """`{"exact_clusters": [[kept id, dropped ids...]], "near_clusters": [...]}` with document ids."""
    ids: dict[int, list[str]] = {}

    def name(node) -> str:
        if node[0] not in ids:
            ids[node[0]] = json.loads((sigs_folder / "ids" / f"{node[0]:05d}.json").read_text())
        return ids[node[0]][node[1]]

    path = clusters_folder / "clusters.json"
    clusters = json.loads(path.read_text()) if path.is_file() else []
    return {"exact_clusters": [[name(c["keep"])] + [name(m) for m in c["exact"]] for c in clusters if c["exact"]],
            "near_clusters": [[name(c["keep"])] + [name(m) for m in c["near"]] for c in clusters if c["near"]]}
