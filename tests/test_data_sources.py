"""Sources and cleaning: every malformed input is counted and reported, or one clear error when strict;
the CLI (`phitrain data prepare` / `stats`) never shows a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phitrain.cli import main
from phitrain.config import CleanConfig, DataRecipe, DataSourceConfig, validate
from phitrain.data import prepare
from phitrain.data.clean import clean_document
from phitrain.data.sources import list_files, stdlib_dir
from phitrain.errors import PhitrainError

GOOD = "def f(x):\n    return x + 1\n"


@pytest.fixture
def messy(tmp_path) -> Path:
    d = tmp_path / "raw"
    (d / "files").mkdir(parents=True)
    (d / "files" / "good.py").write_text(GOOD)
    (d / "files" / "crlf.py").write_bytes(b"x = 1\r\ny = 2\r\n")
    (d / "files" / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (d / "files" / "empty.txt").write_text("  \n\n")
    (d / "files" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    lines = [json.dumps({"text": "first document\n"}), "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": 42}), "", json.dumps({"text": "second document\n"})]
    (d / "docs.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "bad \xff byte"}\n')
    pq.write_table(pa.table({"content": ["parquet one\n", None, "parquet two\n"]}), d / "t.parquet")
    return d


def _recipe(d: Path, **kw) -> DataRecipe:
    sources = [{"name": "files", "kind": "files", "paths": [str(d / "files")]},
               {"name": "jsonl", "kind": "jsonl", "paths": [str(d / "*.jsonl")]},
               {"name": "pq", "kind": "parquet", "paths": [str(d / "t.parquet")], "text_field": "content"}]
    for i, extra in kw.pop("source_over", {}).items():
        sources[i].update(extra)
    data = {"sources": sources, "quality": {"enabled": False}, "decontam": {"enabled": False},
            "exercises": {"enabled": False}, "tokenizer": {"vocab_size": 300},
            "shards": {"val_fraction": 0.0}, "executor": {"workers": 1}, **kw}
    return validate(DataRecipe, data, "test")


def test_malformed_inputs_are_counted_never_lost(messy, tmp_path):
    stats = prepare(_recipe(messy), tmp_path / "out", progress=False)
    s = stats["sources"]
    assert s["files"]["drops"] == {"binary": 1, "empty": 1, "invalid_utf8": 1}
    assert s["files"]["read"] == 5 and s["files"]["train_docs"] == 2
    assert s["jsonl"]["drops"] == {"malformed_json": 1, "missing_field": 1, "not_a_string": 1, "invalid_utf8": 1}
    assert s["jsonl"]["train_docs"] == 2
    assert s["pq"]["drops"] == {"missing_field": 1} and s["pq"]["train_docs"] == 2
    examples = json.loads((tmp_path / "out" / "reports" / "drops.json").read_text())
    assert examples["jsonl"]["examples"]["malformed_json"] == [f"{messy / 'docs.jsonl'}:2"]
    text = "".join(p.read_text() for p in (tmp_path / "out" / "work" / "docs" / "files" / "train").glob("*.jsonl"))
    assert "\\r" not in text and "x = 1\\ny = 2\\n" in text      # line endings normalised


def test_replace_policy_keeps_invalid_utf8_with_a_count(messy, tmp_path):
    stats = prepare(_recipe(messy, clean={"invalid_utf8": "replace"}), tmp_path / "out", progress=False)
    assert stats["sources"]["files"]["drops"] == {"binary": 1, "empty": 1, "utf8_replaced": 1}
    assert stats["sources"]["files"]["train_docs"] == 3
    assert stats["sources"]["jsonl"]["drops"].get("invalid_utf8") is None


@pytest.mark.parametrize("index, match", [(0, "binary"), (1, "malformed json"), (2, "missing field")])
def test_strict_sources_raise_one_clear_error(messy, tmp_path, index, match):
    with pytest.raises(PhitrainError, match=match) as err:
        prepare(_recipe(messy, source_over={index: {"strict": True}}), tmp_path / "out", progress=False)
    assert "strict" in str(err.value) and "\n" not in str(err.value)


def test_clean_document_reasons():
    cfg = CleanConfig(max_bytes=10, min_chars=3)
    assert clean_document(b"x" * 11, cfg) == (None, "too_large")
    assert clean_document("ab", cfg) == (None, "too_short")
    assert clean_document(b"\xef\xbb\xbfabc\r\n", cfg) == ("abc\n", "")


def test_sources_errors_and_limits(tmp_path):
    with pytest.raises(PhitrainError, match="matches no files"):
        list_files(DataSourceConfig(name="x", kind="files", paths=[str(tmp_path / "nope*")]))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    recipe = validate(DataRecipe, {"sources": [{"name": "x", "kind": "parquet", "paths": [str(tmp_path / "p.parquet")]}],
                                   "quality": {"enabled": False}, "decontam": {"enabled": False},
                                   "exercises": {"enabled": False}}, "test")
    with pytest.raises(PhitrainError, match="p.parquet: no column 'text'"):
        prepare(recipe, tmp_path / "out", progress=False)
    files = list_files(DataSourceConfig(name="s", kind="stdlib", max_files=5))
    assert len(files) == 5 and all(i.startswith("stdlib/") and Path(p).is_file() for i, p in files)
    assert stdlib_dir().is_dir()
    small = list_files(DataSourceConfig(name="s", kind="stdlib", max_bytes=50_000))
    assert sum(Path(p).stat().st_size for _, p in small[:-1]) < 50_000


def test_cli_prepare_and_stats(messy, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(_recipe(messy).model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["data", "prepare", str(recipe), "--out", str(out), "--quiet", "--set", "seed=1"]) == 0
    assert main(["data", "stats", str(out)]) == 0
    shown = capsys.readouterr().out
    for word in ("files", "jsonl", "pq", "malformed_json 1", "binary 1", "train tokens", "total"):
        assert word in shown
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert main(["data", "prepare", str(recipe), "--out", str(out), "--set", "shards.val_fraction=2"]) == 2
    err = capsys.readouterr().err
    assert "no stats.json" in err and "val_fraction" in err and "Traceback" not in err


def test_stdlib_recipe_end_to_end(tmp_path):
    """The quickstart's recipe on a 40-file subset, then the trainer's view of the result."""
    from phitrain.config import MixtureConfig, load_yaml
    from phitrain.data.windows import WindowLoader, load_validation_windows

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "data-stdlib.yaml"
    recipe = load_yaml(DataRecipe, recipe_path, ["sources.0.max_files=40", "tokenizer.vocab_size=1000",
                                                 "quality.sample_size=30", "shards.val_fraction=0.1"])
    out = tmp_path / "stdlib"
    stats = prepare(recipe, out, progress=False)
    assert stats["sources"]["stdlib"]["read"] == 40
    assert stats["quality"]["annotated"] == 30 and stats["quality"]["heldout_accuracy"] is not None
    assert stats["sources"]["exercises"]["train_docs"] > 0
    assert (out / "tokenizer").is_dir() and (out / "exercises.jsonl").is_file()
    mix = MixtureConfig(data_dir=str(out), sources=[{"path": "stdlib", "weight": 0.8}, {"path": "exercises", "weight": 0.2}])
    x, y = next(WindowLoader(mix, seq_len=64, micro_batch_size=2))
    assert x.shape == y.shape == (2, 64) and int(x.max()) < 1000
    assert load_validation_windows(mix, 64, 4).shape[1] == 65


def test_synth_output_is_a_data_source(tmp_path):
    """A `phitrain synth` output directory (one file per generator, written by synth's own writer) is read
    by `kind: synth`: every row counted, ids kept, reports and rejected/ ignored."""
    from phitrain.synth.run import write_records

    out = tmp_path / "synth"
    (out / "rejected").mkdir(parents=True)
    rows = [{"id": f"books-{i:06d}", "text": f"Chapter {i}: loops repeat work.\n", "kind": "textbook"} for i in range(5)]
    write_records(out / "books.parquet", rows, "parquet")
    write_records(out / "qa.jsonl", [{"id": "qa-000000", "text": "Q: what is a list?\nA: a sequence.\n"}], "jsonl")
    write_records(out / "rejected" / "qa.jsonl", [{"id": "bad", "text": "rejected\n"}], "jsonl")
    (out / "report.md").write_text("# report\n")
    recipe = validate(DataRecipe, {"sources": [{"name": "synthetic", "kind": "synth", "paths": [str(out)]}],
                                   "dedup": {"exact": False, "near": False},   # the chapters are near-copies
                                   "quality": {"enabled": False}, "decontam": {"enabled": False},
                                   "exercises": {"enabled": False}, "tokenizer": {"vocab_size": 300},
                                   "shards": {"val_fraction": 0.0}, "executor": {"workers": 1}}, "test")
    stats = prepare(recipe, tmp_path / "data", progress=False)
    s = stats["sources"]["synthetic"]
    assert s["read"] == 6 and s["train_docs"] == 6 and s["drops"] == {}
    kept = "".join(p.read_text() for p in (tmp_path / "data" / "work" / "docs" / "synthetic" / "train").glob("*.jsonl"))
    assert "books-000004" in kept and "qa-000000" in kept and "rejected" not in kept
    with pytest.raises(PhitrainError, match="holds no `phitrain synth` output"):
        list_files(DataSourceConfig(name="x", kind="synth", paths=[str(out / "rejected" / "none")]))
