"""The tiktoken backend of kinds ``tiktoken`` (cl100k) and ``codegen``: tiktoken ranks + special tokens
(+ CodeGen's whitespace-run tokens), encoding with tiktoken (fast, exact) and exporting the same
tokenizer as an HF BPE ``tokenizer.json``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from phitrain.errors import PhitrainError
from phitrain.tokenizer.base import (ENDOFTEXT, RANKS_FILE, _WHITESPACE_SPLIT, Tokenizer, _sha256_json,
                                     bytes_to_unicode)

def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """Ranks in tiktoken's file format (``base64(token) rank`` per line, by rank)."""
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(text: str, source: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file; a malformed line is an error naming the file and line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise PhitrainError(f"{source}: line {n} is not '<base64 token> <rank>': {line[:60]!r}") from None
    if not ranks:
        raise PhitrainError(f"{source}: no ranks in file")
    if len(set(ranks.values())) != len(ranks):
        raise PhitrainError(f"{source}: ranks are not unique")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise PhitrainError(f"{source}: not a byte-level BPE: {len(missing)} of the 256 single bytes have no rank")
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """HF BPE merges equivalent to tiktoken's ranks.

    tiktoken merges the adjacent pair whose *concatenation* has the lowest rank, so a token is
    reachable from every split into two tokens. Listing each such split at the token's rank
    (ordered by the parts' ranks within a token) gives HF's pair-ranked BPE the same choices.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, left, right))
    merges.sort()
    return [(bytes_to_unicode(a), bytes_to_unicode(b)) for _, _, _, a, b in merges]


def _onig_pattern(pat_str: str) -> str:
    """tiktoken's regex (Rust `fancy_regex`) rewritten for HF's Oniguruma with the same matches.

    Oniguruma's default (Ruby) syntax reads ``$`` as end of *line* and ``{1,3}+`` as "one or more
    runs of 1-3" rather than a possessive ``{1,3}``; ``\\z`` and a plain ``{1,3}`` mean what tiktoken
    means (a possessive quantifier at the end of an alternative cannot change the match).
    """
    pat = re.sub(r"(?<!\\)\$", r"\\z", pat_str)
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat)


class TiktokenBackedTokenizer(Tokenizer):
    """tiktoken ranks + special tokens (+ CodeGen's whitespace-run tokens for kind ``codegen``)."""

    def __init__(self, kind: str, ranks: dict[bytes, int], pat_str: str, specials: dict[str, int],
                 whitespace: dict[str, int] | None = None):
        self.kind = kind
        self._ranks = ranks
        self._pat_str = pat_str
        self._specials = dict(specials)
        self._whitespace = dict(whitespace or {})
        # The whitespace ids go into tiktoken's special table only so that `decode` knows them;
        # `encode_ordinary` never matches specials, the runs are split off in Python.
        self._enc = tiktoken.Encoding(f"phitrain-{kind}", pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens={**self._specials, **self._whitespace})
        self.eos_id = self._specials[ENDOFTEXT]
        self.vocab_size = self._enc.max_token_value + 1
        self._known = set(ranks.values()) | set(self._specials.values()) | set(self._whitespace.values())
        self._dense = len(self._known) == self.vocab_size
        self._fingerprint: str | None = None
        self._hf_json: str | None = None

    def encode(self, text: str) -> list[int]:
        if not self._whitespace:
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for i, piece in enumerate(_WHITESPACE_SPLIT.split(text)):
            if i % 2:
                ids.append(self._whitespace[piece])
            elif piece:
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self._whitespace:
            return self._enc.encode_ordinary_batch(list(texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        if self._dense:
            n = self.vocab_size
            kept = [i for i in ids if 0 <= i < n]
        else:
            kept = [i for i in ids if i in self._known]
        return self._enc.decode(kept)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _sha256_json({
                "backend": "tiktoken", "kind": self.kind, "pat_str": self._pat_str,
                "ranks_sha256": hashlib.sha256(ranks_to_text(self._ranks).encode()).hexdigest(),
                "specials": sorted(self._specials.items(), key=lambda kv: kv[1]),
                "whitespace": sorted(self._whitespace.items(), key=lambda kv: kv[1]),
            })
        return self._fingerprint

    def to_hf_json(self) -> str:
        """The same tokenizer as an HF BPE: vocab = ranks in GPT-2's byte-to-unicode spelling, merges
        recovered from the ranks, the same pre-tokenizer regex, and ``ignore_merges`` because tiktoken
        returns a pre-token that is itself a token without merging."""
        if self._hf_json is None:
            vocab = {bytes_to_unicode(tok): rank for tok, rank in self._ranks.items()}
            added = {**self._specials, **self._whitespace}
            # Added tokens are also placed in the model vocab: HF honours their ids only then.
            vocab.update(added)
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=_merges_from_ranks(self._ranks), ignore_merges=True))
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_onig_pattern(self._pat_str)), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
            tok.decoder = decoders.ByteLevel()
            definition = json.loads(tok.to_str())
            definition["added_tokens"] = [
                {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": content not in self._whitespace}
                for content, i in sorted(added.items(), key=lambda kv: kv[1])
            ]
            self._hf_json = json.dumps(definition, ensure_ascii=False)
        return self._hf_json

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "pat_str": self._pat_str, "ranks_file": RANKS_FILE,
                "special_tokens": self._specials, "whitespace_tokens": self._whitespace}

    def _extra_files(self) -> dict[str, str]:
        return {RANKS_FILE: ranks_to_text(self._ranks)}

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "ranks": self._ranks, "pat_str": self._pat_str,
                "specials": self._specials, "whitespace": self._whitespace}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["kind"], state["ranks"], state["pat_str"], state["specials"], state["whitespace"])


def _read_ranks_file(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise PhitrainError(f"{path}: not a tiktoken ranks file (not ASCII text)") from None
    return parse_ranks(text, str(path))
