"""Training windows and mixtures: what the trainer iterates (the only module here that needs torch).

phi-1 §2.3: training sequences are fixed-length slices of one concatenated token array in which files
are separated by <|endoftext|>. Window i of a source is `stream[i·T : i·T + T + 1]` (T = seq_len): inputs
are its first T tokens, targets its last T, so consecutive windows share one boundary token and every
token of the stream except the first is a target exactly once per epoch.

A mixture draws windows from several prepared sources in proportion to their weights (phi-4 Table 5).
The schedule is deterministic, not sampled: global window g goes to the source s maximising
`w_s·(g+1) − taken_s`, so after any number of windows each source's share is within one window of its
weight. Within a source, epoch e visits its windows in a permutation seeded by (seed, source, e), and a
source that runs out starts its next epoch while the others continue (it is repeated — the "epochs" of
Table 5). Data-parallel ranks all follow the same global schedule; of each global batch of
`world_size × micro_batch_size` windows rank r takes the r-th slice, so ranks never share a window and
together cover the schedule. The loader's state is a handful of counters, saved with the checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from phitrain.config import MixtureConfig
from phitrain.data.shards import TokenStream
from phitrain.errors import PhitrainError

STATE_VERSION = 1


def _source_dir(mixture: MixtureConfig, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(mixture.data_dir) / p


def _key(path: str, min_doc_tokens: int) -> str:
    return f"{path}@{min_doc_tokens}" if min_doc_tokens else path


def open_streams(mixture: MixtureConfig, split: str) -> list[tuple[str, float, TokenStream]]:
    """(key, weight, stream) for every mixture entry; all must share one tokenizer."""
    out = []
    fingerprints = {}
    for sw in mixture.sources:
        min_tokens = sw.min_doc_tokens if sw.min_doc_tokens is not None else mixture.min_doc_tokens
        stream = TokenStream(_source_dir(mixture, sw.path), split, min_tokens)
        fingerprints[sw.path] = stream.manifest["tokenizer"]["fingerprint"]
        out.append((_key(sw.path, min_tokens), sw.weight, stream))
    if len(set(fingerprints.values())) > 1:
        raise PhitrainError(f"mixture: sources were tokenised with different tokenizers: "
                            f"{ {k: v[:12] for k, v in fingerprints.items()} }; prepare them with one tokenizer")
    keys = [k for k, _, _ in out]
    if len(set(keys)) != len(keys):
        raise PhitrainError(f"mixture: a source is listed twice with the same min_doc_tokens: {keys}")
    return out


class WindowLoader:
    """Infinite iterator of (inputs [B, T], targets [B, T]) LongTensor batches for one rank."""

    def __init__(self, mixture: MixtureConfig, seq_len: int, micro_batch_size: int, *, split: str | None = None,
                 rank: int = 0, world_size: int = 1):
        """`split` defaults to `mixture.split` ("train"); "val" iterates the held-out windows instead."""
        if seq_len < 1 or micro_batch_size < 1:
            raise PhitrainError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be positive")
        if not 0 <= rank < world_size:
            raise PhitrainError(f"rank {rank} is not in [0, world_size={world_size})")
        self.mixture = mixture
        self.seq_len = seq_len
        self.batch = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.split = split = split or mixture.split
        entries = open_streams(mixture, split)
        self.keys = [k for k, _, _ in entries]
        self.streams = [s for _, _, s in entries]
        w = np.array([wt for _, wt, _ in entries], dtype=np.float64)
        self.weights = w / w.sum()
        self.n_windows = np.array([max(0, (len(s) - 1) // seq_len) for s in self.streams], dtype=np.int64)
        empty = [k for k, n in zip(self.keys, self.n_windows) if n == 0]
        if empty:
            raise PhitrainError(f"mixture: source(s) {empty} have fewer than seq_len+1={seq_len + 1} tokens in "
                                f"split {split!r} (after min_doc_tokens); lower seq_len or drop them")
        self.taken = np.zeros(len(self.keys), dtype=np.int64)   # windows consumed per source (all ranks)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ---- schedule -------------------------------------------------------------------------------
    def _next_source(self) -> int:
        g = int(self.taken.sum())
        s = int(np.argmax(self.weights * (g + 1) - self.taken))
        return s

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            salt = int.from_bytes(hashlib.sha256(self.keys[s].encode()).digest()[:4], "little")
            perm = np.random.default_rng([self.mixture.seed, salt, epoch]).permutation(int(self.n_windows[s]))
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != s}
            self._perm_cache[key] = perm
        return perm

    def window(self, source: int, index: int) -> np.ndarray:
        """Window `index` (in stream order) of the `source`-th mixture entry: seq_len+1 tokens."""
        return self.streams[source].read(index * self.seq_len, self.seq_len + 1)

    def next_assignments(self) -> list[tuple[int, int, int]]:
        """The next global batch as (source, epoch, window index) and advance the state; rank r's windows
        are entries [r·B, (r+1)·B)."""
        out = []
        for _ in range(self.world_size * self.batch):
            s = self._next_source()
            n = int(self.n_windows[s])
            epoch, pos = divmod(int(self.taken[s]), n)
            out.append((s, epoch, int(self._perm(s, epoch)[pos])))
            self.taken[s] += 1
        return out

    def __iter__(self) -> "WindowLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        mine = self.next_assignments()[self.rank * self.batch:(self.rank + 1) * self.batch]
        rows = np.stack([self.window(s, i) for s, _, i in mine])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "keys": list(self.keys), "taken": [int(x) for x in self.taken],
                "seq_len": self.seq_len, "seed": self.mixture.seed, "split": self.split,
                "n_windows": [int(x) for x in self.n_windows]}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state` was taken. The mixture, seq_len, seed and data must be the ones
        the state was saved with; anything else would silently change which windows come next."""
        if state.get("version") != STATE_VERSION:
            raise PhitrainError(f"data loader state: unknown version {state.get('version')!r}")
        for field, mine in (("keys", list(self.keys)), ("seq_len", self.seq_len), ("seed", self.mixture.seed),
                            ("split", self.split), ("n_windows", [int(x) for x in self.n_windows])):
            if state.get(field) != mine:
                raise PhitrainError(f"data loader state: {field} was {state.get(field)!r} when saved, now {mine!r}; "
                                    f"resume with the same mixture, seq_len and prepared data")
        self.taken = np.array(state["taken"], dtype=np.int64)

    # ---- reporting ------------------------------------------------------------------------------
    def epoch_tokens(self) -> dict[str, int]:
        """Trained tokens in one epoch of each source (windows × seq_len)."""
        return {k: int(n) * self.seq_len for k, n in zip(self.keys, self.n_windows)}

    def report(self, token_budget: int) -> list[dict]:
        """Per source: share of the budget's tokens, unique tokens, and epochs the budget implies (phi-4
        Table 5's columns)."""
        rows = []
        per_epoch = self.epoch_tokens()
        for k, w, stream in zip(self.keys, self.weights, self.streams):
            budget = float(w) * token_budget
            rows.append({"source": k, "weight": float(w), "share": float(w), "unique_tokens": len(stream),
                         "documents": stream.docs, "epoch_tokens": per_epoch[k],
                         "budget_tokens": int(round(budget)), "epochs": budget / per_epoch[k]})
        return rows


def load_validation_windows(mixture: MixtureConfig, seq_len: int, max_windows: int) -> torch.Tensor:
    """[N, seq_len+1] windows from the `val` split, at most `max_windows`, shared among sources by weight
    (in stream order, unshuffled, so every evaluation sees the same windows)."""
    if max_windows < 1:
        raise PhitrainError(f"max_windows must be positive, got {max_windows}")
    entries = open_streams(mixture, "val")
    keys = [k for k, _, _ in entries]
    avail = np.array([max(0, (len(s) - 1) // seq_len) for _, _, s in entries], dtype=np.int64)
    if avail.sum() == 0:
        raise PhitrainError(f"mixture: the val split of {keys} has fewer than seq_len+1={seq_len + 1} tokens; "
                            f"raise shards.val_fraction when preparing or lower seq_len")
    w = np.array([wt for _, wt, _ in entries], dtype=np.float64) * (avail > 0)
    w /= w.sum()
    taken = np.zeros(len(entries), dtype=np.int64)
    rows = []
    while len(rows) < max_windows:
        open_ = taken < avail
        if not open_.any():
            break
        g = int(taken.sum())
        s = int(np.argmax(np.where(open_, w * (g + 1) - taken, -np.inf)))
        rows.append(entries[s][2].read(int(taken[s]) * seq_len, seq_len + 1))
        taken[s] += 1
    return torch.from_numpy(np.stack(rows))
