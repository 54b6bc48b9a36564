"""phitrain.tokenizer: the four kinds behind one interface, their HF exports, and bad input."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from phitrain.cli import main as cli_main
from phitrain.errors import PhitrainError
from phitrain.tokenizer import (
    ENDOFTEXT,
    META_FILE,
    WHITESPACE_RUNS,
    Tokenizer,
    cl100k_tokenizer,
    codegen_tokenizer,
    hf_tokenizer,
    load_tokenizer,
    train_bpe,
)

STDLIB = Path(os.__file__).parent
GPT2_CACHE = Path.home() / ".cache" / "phitrain-test" / "gpt2.tiktoken"

# Real source plus the hard cases: tabs, space runs longer than 31, non-ASCII, CRLF, trailing blanks.
HARD_TEXT = (
    "def f(x):\n\tif x:\n\t\t\treturn 'tab'\n" + " " * 40 + "deep = 1\n" + " " * 32 + "odd\n"
    "\t" * 12 + "tabs\n# Grüße, naïve café — 日本語 🎉 \u00a0nbsp\r\n\r\nemoji = '🐍🐍'   \n"
    "x = 1234567 + 3.14159  # I'LL don't we've\n   \t \t  mixed \t\n\n\n   "
)


def real_texts() -> list[str]:
    import json.decoder

    return [
        Path(os.__file__).read_text(encoding="utf-8"),
        inspect.getsource(json.decoder),
        inspect.getsource(inspect.getmodule(tempfile)),
        HARD_TEXT,
        "",
        ENDOFTEXT + " literal " + ENDOFTEXT,
    ]


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_corpus() -> list[Path]:
    # ~300 KB of stdlib source; os.py / json / tempfile (the round-trip texts) stay out of it.
    files = [STDLIB / name for name in ("argparse.py", "textwrap.py", "string.py", "shlex.py",
                                        "configparser.py", "dataclasses.py")]
    assert sum(f.stat().st_size for f in files) > 200_000
    return files


@pytest.fixture(scope="module")
def bpe(bpe_corpus, tmp_path_factory) -> Tokenizer:
    return train_bpe(bpe_corpus, 1024, tmp_path_factory.mktemp("bpe") / "tok")


@pytest.fixture(scope="module")
def cl100k() -> Tokenizer:
    return cl100k_tokenizer()


@pytest.fixture(scope="module")
def gpt2_ranks() -> Path:
    """GPT-2's ranks from openai-whisper's sdist (whisper/assets/gpt2.tiktoken), fetched once."""
    if GPT2_CACHE.is_file():
        return GPT2_CACHE
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--quiet", "--retries", "1", "--timeout", "20", "openai-whisper", "-d", tmp],
                           check=True, timeout=300, capture_output=True)
            sdist = next(Path(tmp).glob("openai[-_]whisper-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
                data = tar.extractfile(member).read()
        except subprocess.CalledProcessError as err:
            last = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"cannot fetch openai-whisper's gpt2.tiktoken: pip download failed: {last[0][:200]}")
        except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError) as err:
            pytest.skip(f"cannot fetch openai-whisper's gpt2.tiktoken: {type(err).__name__}: {err}"[:300])
    GPT2_CACHE.parent.mkdir(parents=True, exist_ok=True)
    part = GPT2_CACHE.with_suffix(f".part{os.getpid()}")
    part.write_bytes(data)
    os.replace(part, GPT2_CACHE)
    return GPT2_CACHE


@pytest.fixture(scope="module")
def codegen(gpt2_ranks) -> Tokenizer:
    return codegen_tokenizer(gpt2_ranks)


@pytest.fixture(scope="module")
def hf(bpe, tmp_path_factory) -> Tokenizer:
    # Any HF tokenizer.json: here a bare copy of the trained one, without phitrain's metadata.
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    path.write_text(bpe.to_hf_json(), encoding="utf-8")
    return hf_tokenizer(path)


KINDS = ["bpe", "tiktoken", "hf", "codegen"]


@pytest.fixture(params=KINDS)
def tok(request) -> Tokenizer:
    return request.getfixturevalue({"tiktoken": "cl100k"}.get(request.param, request.param))


# ---- behaviour common to every kind -----------------------------------------------------------------

def test_round_trip_real_source(tok):
    for text in real_texts():
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(real_texts()) == [tok.encode(t) for t in real_texts()]


def test_endoftext_is_one_special_id_never_produced_by_text(tok):
    assert tok.decode([tok.eos_id]) == ENDOFTEXT
    ids = tok.encode("a" + ENDOFTEXT + "b")
    assert tok.eos_id not in ids and len(ids) > 3
    assert tok.decode(ids) == "a" + ENDOFTEXT + "b"


def test_decode_drops_padding_rows(tok):
    ids = tok.encode("x = 1")
    padded = tok.padded_vocab_size()
    assert padded % 64 == 0 and tok.vocab_size <= padded < tok.vocab_size + 64
    assert tok.decode(ids + [tok.vocab_size, tok.padded_vocab_size(1024) + 63]) == "x = 1"


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    tok.save(tmp_path / "t")  # saving over an existing directory replaces it
    loaded = load_tokenizer(tmp_path / "t")
    assert (loaded.kind, loaded.eos_id, loaded.vocab_size) == (tok.kind, tok.eos_id, tok.vocab_size)
    assert loaded.fingerprint == tok.fingerprint
    for text in real_texts():
        assert loaded.encode(text) == tok.encode(text)
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no temporary directories left behind


def test_pickle_and_multiprocessing_pool(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.kind == tok.kind
    texts = real_texts()[1:4]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.starmap(_encode_in_worker, [(tok, t) for t in texts])
    assert got == [tok.encode(t) for t in texts]


def _encode_in_worker(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text)


def test_auto_tokenizer_loads_saved_dir_and_agrees(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "t")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert auto.eos_token == ENDOFTEXT and auto.eos_token_id == tok.eos_id
    for text in real_texts()[:4]:
        ids = auto.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        assert auto.decode(ids) == text


@pytest.mark.parametrize("kind", ["cl100k", "codegen"])
def test_hf_export_encodes_like_tiktoken_on_stdlib(kind, request):
    """The exported tokenizer.json (converted merges + regex) equals the tiktoken original on real source."""
    from tokenizers import Tokenizer as HF

    tok = request.getfixturevalue(kind)

    hf_tok = HF.from_str(tok.to_hf_json())
    files = sorted(STDLIB.glob("*.py"))[:40]
    # Without literal "<|endoftext|>": HF (like transformers) reads it as the special token.
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files] + real_texts()[:-1]
    exported = [e.ids for e in hf_tok.encode_batch_fast(texts, add_special_tokens=False)]
    assert exported == tok.encode_batch(texts)


# ---- kind specific -------------------------------------------------------------------------------

def test_cl100k_known_ids_and_phi4_specials(cl100k):
    assert cl100k.kind == "tiktoken"
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert cl100k.eos_id == 100257 and cl100k.vocab_size == 100277
    assert cl100k.padded_vocab_size(1024) == 100352  # phi-4's embedding rows
    assert [cl100k.decode([i]) for i in (100258, 100259, 100260, 100276)] == [
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"]
    assert cl100k.decode([100256, 100300]) == ""  # unassigned ids inside and beyond the vocabulary


def test_codegen_is_gpt2_plus_whitespace_runs(codegen):
    assert codegen.kind == "codegen"
    assert codegen.encode("hello world") == [31373, 995]  # GPT-2's well-known ids
    assert codegen.eos_id == 50256 and codegen.vocab_size == 50295
    assert codegen.padded_vocab_size(1024) == 51200  # phi-1's embedding rows
    assert [codegen.encode(w) for w in WHITESPACE_RUNS] == [[i] for i in range(50257, 50295)]
    assert codegen.encode(" " * 4 + "return") == [50284, 7783]  # 4 spaces, then "return" without its space
    assert codegen.encode(" " * 40) == [50257, 50279]  # leftmost-longest: 31 + 9


def test_bpe_whitespace_runs_are_single_tokens(bpe):
    run_ids = [bpe.encode(w) for w in WHITESPACE_RUNS]
    assert all(len(ids) == 1 for ids in run_ids)
    assert [ids[0] for ids in run_ids] == list(range(bpe.vocab_size - 38, bpe.vocab_size))
    indented = bpe.encode("\n        return")
    assert run_ids[31 - 8][0] in indented  # the 8-space run


def test_train_bpe_vocab_size_and_inputs(bpe, bpe_corpus, tmp_path):
    assert bpe.kind == "bpe" and bpe.vocab_size == 1024 and bpe.eos_id == 0
    # The trainer spent no merges on space runs: no learned token is only spaces.
    from tokenizers import Tokenizer as HF

    vocab = HF.from_str(bpe.to_hf_json()).get_vocab(with_added_tokens=False)
    assert not any(set(t) == {"Ġ"} and len(t) > 1 for t in vocab)
    # A directory (searched recursively) and an iterator of strings train the same tokenizer.
    corpus = tmp_path / "corpus" / "sub"
    corpus.mkdir(parents=True)
    for f in bpe_corpus:
        shutil.copy(f, corpus / f.name)
    (corpus / "binary.py").write_bytes(b"\xff\xfe\x00 not utf-8")
    (corpus / "ignored.bin").write_bytes(b"ignored")
    from_dir = train_bpe([tmp_path / "corpus"], 1024)
    from_texts = train_bpe(iter([f.read_text(encoding="utf-8") for f in bpe_corpus]), 1024)
    assert from_dir.fingerprint == from_texts.fingerprint
    assert from_dir.fingerprint != train_bpe(bpe_corpus, 512).fingerprint


def test_codegen_from_vocab_and_merges(codegen, tmp_path):
    model = json.loads(codegen.to_hf_json())["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i <= codegen.eos_id}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]),
                                         encoding="utf-8")
    from_files = load_tokenizer(tmp_path)
    assert from_files.kind == "codegen" and from_files.fingerprint == codegen.fingerprint
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1], lines[-1] = lines[-1], lines[1]
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(PhitrainError, match="merges.txt: line 3: merges are not in id order"):
        codegen_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_hf_kind_eos_from_tokenizer_config(bpe, tmp_path):
    definition = json.loads(bpe.to_hf_json())
    for t in definition["added_tokens"]:
        if t["content"] == ENDOFTEXT:
            t["content"] = "</s>"
    definition["model"]["vocab"]["</s>"] = definition["model"]["vocab"].pop(ENDOFTEXT)
    (tmp_path / "tokenizer.json").write_text(json.dumps(definition), encoding="utf-8")
    with pytest.raises(PhitrainError, match="has no '<\\|endoftext\\|>' token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "hf" and tok.eos_id == 0 and tok.decode([0]) == "</s>"
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").eos_id == 0


# ---- bad input -----------------------------------------------------------------------------------

def test_missing_paths_name_the_file(tmp_path):
    missing = tmp_path / "nope"
    for call in (lambda: load_tokenizer(missing), lambda: codegen_tokenizer(missing),
                 lambda: hf_tokenizer(missing), lambda: train_bpe([missing], 512)):
        with pytest.raises(PhitrainError, match=str(missing)):
            call()


def test_corrupt_files_name_the_file(bpe, tmp_path):
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(PhitrainError, match=f"{bad_json}: not a valid HF tokenizer.json"):
        load_tokenizer(bad_json)
    bad_ranks = tmp_path / "bad.tiktoken"
    bad_ranks.write_text("IQ== 0\nnot-a-line\n", encoding="ascii")
    with pytest.raises(PhitrainError, match=f"{bad_ranks}: line 2"):
        load_tokenizer(bad_ranks)
    saved = tmp_path / "saved"
    bpe.save(saved)
    (saved / META_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(PhitrainError, match="corrupt phitrain tokenizer metadata"):
        load_tokenizer(saved)
    bpe.save(saved)
    definition = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    definition["model"]["merges"] = definition["model"]["merges"][:-1]
    (saved / "tokenizer.json").write_text(json.dumps(definition), encoding="utf-8")
    with pytest.raises(PhitrainError, match="do not match the fingerprint"):
        load_tokenizer(saved)


def test_train_bpe_bad_input(tmp_path):
    with pytest.raises(PhitrainError, match="vocab_size 294 is too small"):
        train_bpe(iter(["some text"]), 294)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(PhitrainError, match="no training text"):
        train_bpe([tmp_path / "empty.txt"], 512)


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_train_and_encode(bpe_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "train", "--input", *map(str, bpe_corpus[:2]), "--vocab-size", "600",
                     "--out", str(out)]) == 0
    assert "600 ids" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert cli_main(["tokenizer", "encode", str(out), "--text", "    return x"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("    return x")]
    assert cli_main(["tokenizer", "encode", "cl100k_base", "--text", "hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15339", "1917"]
    assert cli_main(["tokenizer", "train", "--input", str(tmp_path / "missing"), "--vocab-size", "600",
                     "--out", str(out)]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
