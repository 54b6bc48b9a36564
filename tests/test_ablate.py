"""`phitrain ablate` (issue 14): every arm trained for the same tokens, seeds recorded, one report; the
verdict's comparison against the seed spread; bad ablation files give one `error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from phitrain.ablate import AblationConfig, compare, verdict
from phitrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _ablation_file(tmp_path: Path, **extra) -> Path:
    cfg = {
        "name": "test-ablation", "data": str(ROOT / "recipes" / "data-stdlib.yaml"),
        "data_overrides": ["sources.0.max_files=40", "shards.val_fraction=0.1", "tokenizer.vocab_size=1024",
                           "quality.sample_size=60", "executor.tasks=1"],
        "arms": ["raw", "filtered", "exercises"], "seeds": [0, 1], "steps": 5,
        "model_overrides": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                            "rotary_dim": 8},
        "seq_len": 64, "global_batch_size": 4, "micro_batch_size": 4, "precision": "fp32", "eval_windows": 4,
        "humaneval_limit": 2, "max_new_tokens": 16, **extra}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ablate_reports_every_arm_with_equal_tokens(tmp_path, capsys):
    path = _ablation_file(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["ablate", str(path), "--run-dir", str(run_dir)]) == 0
    out = json.loads((run_dir / "results.json").read_text())
    runs = out["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        (a, s) for a in ("raw", "filtered", "exercises") for s in (0, 1))
    assert {r["tokens"] for r in runs} == {5 * 4 * 64} == {out["tokens_per_run"]}
    assert out["seeds"] == [0, 1]
    stages = yaml.safe_load((run_dir / "runs" / "exercises-seed0" / "config.yaml").read_text())["stages"]
    assert [s["max_steps"] for s in stages] == [4, 1] and stages[1]["data"]["sources"][0]["path"] == "exercises"
    raw_stats = json.loads((run_dir / "data" / "raw" / "stats.json").read_text())
    filtered_stats = json.loads((run_dir / "data" / "filtered" / "stats.json").read_text())
    assert "quality_scored" not in raw_stats["sources"]["stdlib"]
    assert raw_stats["sources"]["stdlib"]["train_docs"] > filtered_stats["sources"]["stdlib"]["train_docs"]
    for r in runs:
        assert r["heldout_loss"] > 0 and r["canonical_bits_per_byte"] > 0
        assert 0 <= r["parse_rate"] <= 1 and 0 <= r["run_rate"] <= r["parse_rate"] and r["pass@1"] <= r["run_rate"]
    report = (run_dir / "report.md").read_text()
    for label in ("raw code (no quality filter, no dedup)", "filtered code", "filtered code, then exercises"):
        assert f"| {label} |" in report
    assert "## Verdict" in report and "seed range" in report and (run_dir / "loss.png").stat().st_size > 1000
    # the two seeds really are different runs
    assert len({r["heldout_loss"] for r in runs if r["arm"] == "raw"}) == 2

    # a re-run trains nothing: every run is finished
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("runs/*/*/summary.json")}
    capsys.readouterr()
    assert main(["ablate", str(path), "--run-dir", str(run_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("runs/*/*/summary.json")} == before
    assert json.loads((run_dir / "results.json").read_text())["summary"] == out["summary"]
    assert len(list(run_dir.glob("runs/*/ablation.json"))) == 6          # evaluations kept, not redone


def _rows(arm: str, values: list[float]) -> list[dict]:
    return [{"arm": arm, "seed": s, "heldout_loss": v, "canonical_bits_per_byte": v, "parse_rate": 1 - v / 10,
             "run_rate": 0.0, "pass@1": 0.0} for s, v in enumerate(values)]


def test_compare_against_the_seed_spread():
    clear = _rows("raw", [3.0, 3.1]) + _rows("filtered", [2.5, 2.6])
    c = compare(clear, "raw", "filtered", "canonical_bits_per_byte")
    assert c["outcome"] == "better" and c["diff"] == pytest.approx(-0.5) and c["noise"] == pytest.approx(0.1)
    assert compare(clear, "raw", "filtered", "parse_rate")["outcome"] == "better"      # higher is better there
    assert compare(clear, "filtered", "raw", "canonical_bits_per_byte")["outcome"] == "worse"
    noisy = _rows("raw", [3.0, 2.0]) + _rows("filtered", [2.6, 2.5])
    assert compare(noisy, "raw", "filtered", "canonical_bits_per_byte")["outcome"] == "within noise"
    lines = verdict(noisy, ["raw", "filtered"])
    assert any("not distinguishable" in line for line in lines)
    assert any("As phi-1 found" in line for line in verdict(clear, ["raw", "filtered"]))
    one_seed = _rows("raw", [3.0]) + _rows("filtered", [2.9])
    assert any("Only one seed" in line for line in verdict(one_seed, ["raw", "filtered"]))


@pytest.mark.parametrize("extra, message", [
    ({"minutes": 5}, "exactly one of steps"),
    ({"arms": []}, "arms must be a non-empty list"),
    ({"arms": ["raw", "synthetic"]}, "the synthetic arm needs"),
    ({"seeds": [1, 1]}, "seeds must be a non-empty list without repeats"),
    ({"colour": "red"}, "colour"),
])
def test_bad_ablation_files(tmp_path, capsys, extra, message):
    path = _ablation_file(tmp_path, **extra)
    assert main(["ablate", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "runs").exists()


def test_synthetic_source_must_exist(tmp_path, capsys):
    path = _ablation_file(tmp_path, arms=["filtered", "synthetic"], synthetic="textbooks")
    assert main(["ablate", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "`synthetic: textbooks` must name a source of kind synth" in capsys.readouterr().err


def test_config_defaults_are_the_papers_finetuning_ratios():
    cfg = AblationConfig(steps=10)
    assert cfg.finetune_lr == cfg.lr / 10 and cfg.finetune_weight_decay == 0.01


def test_quickstart_ablation_uses_the_packaged_recipe(tmp_path):
    from phitrain.ablate import data_recipes
    from phitrain.quickstart import ablation_config

    cfg, base = ablation_config(7.5, humaneval_limit=3, max_files=20)
    assert cfg.minutes == 7.5 and cfg.steps is None and cfg.humaneval_limit == 3 and cfg.seeds == [0, 1]
    assert cfg.arms == ["raw", "filtered", "exercises"]
    filtered, raw = data_recipes(cfg, base, tmp_path / "filtered")
    assert filtered.sources[0].max_files == 20 and filtered.shards.val_fraction == 0.1
    assert filtered.quality.enabled and not raw.quality.enabled and not raw.dedup.near and not raw.dedup.exact
    assert raw.tokenizer.spec == str(tmp_path / "filtered" / "tokenizer") and not raw.tokenizer.train
    assert raw.decontam.enabled       # no arm sees HumanEval's solutions
