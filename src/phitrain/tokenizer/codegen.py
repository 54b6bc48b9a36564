"""Kind ``codegen``: CodeGen's tokenizer as phi-1 used it (phi-1 paper §2.3 takes codegen-350M-mono's
tokenizer): GPT-2 byte-level BPE (``<|endoftext|>`` = 50256) plus 38 added tokens for runs of 31..2
spaces and 9..2 tabs (ids 50257..50294). Indented code then costs one token per indent instead of one
per few spaces."""

from __future__ import annotations

import json
import os
from pathlib import Path

from phitrain.errors import PhitrainError
from phitrain.tokenizer.base import ENDOFTEXT, WHITESPACE_RUNS, _UNICODE_ALPHABET, Tokenizer, unicode_to_bytes
from phitrain.tokenizer.tiktoken_backend import TiktokenBackedTokenizer, _read_ranks_file, parse_ranks, ranks_to_text

#: GPT-2's pre-tokenizer regex (the one HF's ByteLevel pre-tokenizer uses, hence CodeGen's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _ranks_from_vocab_merges(vocab_path: Path, merges_path: Path) -> dict[bytes, int]:
    """GPT-2's vocab.json + merges.txt as tiktoken ranks: the ids are the ranks, and merges.txt must
    list its merges in id order (which is what makes ids usable as ranks)."""
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise PhitrainError(f"{p}: no such file")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PhitrainError(f"{vocab_path}: not valid JSON ({err})".splitlines()[0]) from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise PhitrainError(f"{vocab_path}: expected a JSON object of token -> id")
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token == ENDOFTEXT:
            continue
        if not set(token) <= _UNICODE_ALPHABET:
            raise PhitrainError(f"{vocab_path}: token {token!r} is not in byte-level BPE spelling")
        ranks[unicode_to_bytes(token)] = i
    last = -1
    for n, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or (parts[0] + parts[1]) not in vocab:
            raise PhitrainError(f"{merges_path}: line {n}: {line[:60]!r} is not a merge of two tokens "
                                f"whose concatenation is in {vocab_path.name}")
        rank = vocab[parts[0] + parts[1]]
        if rank < last:
            raise PhitrainError(f"{merges_path}: line {n}: merges are not in id order, so the ids of "
                                f"{vocab_path.name} cannot serve as ranks")
        last = rank
    return parse_ranks(ranks_to_text(ranks), str(vocab_path))


def codegen_tokenizer(ranks_or_vocab_path: str | os.PathLike,
                      merges_path: str | os.PathLike | None = None) -> Tokenizer:
    """Kind ``codegen``: GPT-2's BPE + CodeGen's 38 whitespace-run tokens, as phi-1 used it.

    Give GPT-2's ranks (a ``gpt2.tiktoken`` file) or its ``vocab.json`` with ``merges_path``.
    ``<|endoftext|>`` follows the ranks (50256 for GPT-2) and the runs of 31..2 spaces and 9..2 tabs
    take the next 38 ids (50257..50294), giving phi-1's 50,295 ids (padded to 51,200 in the model).
    """
    path = Path(ranks_or_vocab_path)
    if merges_path is not None:
        ranks = _ranks_from_vocab_merges(path, Path(merges_path))
    else:
        ranks = _read_ranks_file(path)
    eos = max(ranks.values()) + 1
    whitespace = {w: eos + 1 + k for k, w in enumerate(WHITESPACE_RUNS)}
    return TiktokenBackedTokenizer("codegen", ranks, GPT2_PATTERN, {ENDOFTEXT: eos}, whitespace)
