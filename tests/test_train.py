"""The trainer on real prepared data: exact resume after SIGKILL (also mid-checkpoint-write), gradient
accumulation, fp16 with loss scaling, non-finite steps skipped, the midtrain stage's changes, best
checkpoint selection, and refusal of a changed recipe."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from phitrain.checkpoint import COMPLETE, complete_checkpoints, load_checkpoint
from phitrain.config import DataRecipe, RecipeConfig
from phitrain.data.pipeline import prepare
from phitrain.model.phi import PhiModel
from phitrain.train.metrics import read_metrics
from phitrain.train.recipe import resolve_tokenizer, run_recipe
from phitrain.train import parallel
from phitrain.train.trainer import model_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=512,
            max_position_embeddings=128, attn_pdrop=0.0, resid_pdrop=0.0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small real corpus (a few stdlib modules) prepared by the data pipeline, with a 512-id BPE."""
    import email
    import json as json_mod

    out = tmp_path_factory.mktemp("data")
    recipe = DataRecipe.model_validate({
        "sources": [{"name": "code", "kind": "files",
                     "paths": [str(Path(json_mod.__file__).parent), str(Path(email.__file__).parent)],
                     "include": ["*.py"]}],
        "quality": {"enabled": False},
        "decontam": {"enabled": False},
        "tokenizer": {"train": True, "vocab_size": 512},
        "shards": {"val_fraction": 0.1}, "executor": {"workers": 1},
    })
    prepare(recipe, out, progress=False)
    return out


def recipe_dict(data_dir: Path, **stage) -> dict:
    base = dict(name="pretrain", model="phi-1-tiny", model_overrides=TINY,
                data={"data_dir": str(data_dir), "sources": [{"path": "code", "weight": 1.0}]},
                seq_len=32, global_batch_size=8, micro_batch_size=4, max_steps=8, precision="fp32",
                eval_windows=8, optim={"lr": 3e-3, "warmup_steps": 2})
    base.update(stage)
    return {"name": "test", "device": "cpu", "stages": [base]}


def losses(stage_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(stage_dir / "metrics.jsonl")]


def _run_cli(recipe_path: Path, run_dir: Path, kill_when=None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phitrain", "train", str(recipe_path), "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_when is not None:
        while proc.poll() is None:
            if kill_when():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    return proc.returncode


def _metrics_step(stage_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r), default=0)
    except (json.JSONDecodeError, OSError):
        return 0


def test_sigkill_resume_gives_identical_losses(data_dir, tmp_path):
    recipe = recipe_dict(data_dir, max_steps=12, save_every=2, model_overrides={**TINY, "attn_pdrop": 0.1,
                                                                                "resid_pdrop": 0.1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert _run_cli(path, tmp_path / "full") == 0
    reference = losses(tmp_path / "full" / "pretrain")
    assert len([r for r in reference if r[1] is not None]) == 12

    # 1) killed at a random training step
    kill_at = random.Random(0).randint(3, 10)
    stage = tmp_path / "killed" / "pretrain"
    assert _run_cli(path, tmp_path / "killed", kill_when=lambda: _metrics_step(stage) >= kill_at) == -signal.SIGKILL
    # 2) killed while a checkpoint directory is being written (its temporary directory exists)
    ckpts = stage / "checkpoints"
    def writing() -> bool:
        return ckpts.is_dir() and any(p.name.startswith(".step-") for p in ckpts.iterdir())
    rc = _run_cli(path, tmp_path / "killed", kill_when=writing)
    for d in ckpts.iterdir():  # whatever the kill interrupted, no step-N directory is half-written
        assert d.name.startswith(".") or (d / COMPLETE).is_file(), d
    if rc == -signal.SIGKILL:
        assert _run_cli(path, tmp_path / "killed") == 0
    assert losses(stage) == reference
    assert not [d for d in ckpts.iterdir() if d.name.startswith(".")]


def test_gradient_accumulation_matches_large_micro_batch(data_dir, tmp_path):
    a = run_recipe(RecipeConfig.model_validate(recipe_dict(data_dir, micro_batch_size=2, max_steps=3)), tmp_path / "a")
    b = run_recipe(RecipeConfig.model_validate(recipe_dict(data_dir, micro_batch_size=8, max_steps=3)), tmp_path / "b")
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "pretrain" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa, _ = load_checkpoint(a[0].final_dir)
    wb, _ = load_checkpoint(b[0].final_dir)
    for (name, pa), pb in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.allclose(pa, pb, atol=2e-5), name


def test_fp16_with_loss_scaling_trains_finite(data_dir, tmp_path):
    (summary,) = run_recipe(RecipeConfig.model_validate(recipe_dict(data_dir, precision="fp16", max_steps=6)),
                            tmp_path / "run")
    model, _ = load_checkpoint(summary.final_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert summary.final_loss < summary.first_loss
    state = torch.load(Path(summary.final_dir).parent / "checkpoints" / "step-000006" / "trainer_state.pt",
                       weights_only=False)
    assert state["components"]["scaler"]["scale"] > 0  # the GradScaler is one of the checkpointed components


def test_nonfinite_batch_is_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = PhiModel.forward

    def poisoned(self, input_ids, targets=None, **kw):
        out = original(self, input_ids, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # step 3's first micro-batch (2 micro-batches per step)
                return out * float("nan")
        return out

    monkeypatch.setattr(PhiModel, "forward", poisoned)
    recipe = RecipeConfig.model_validate(recipe_dict(data_dir, max_steps=5))
    (summary,) = run_recipe(recipe, tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert summary.skipped_steps == 1
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    model, _ = load_checkpoint(summary.final_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_midtrain_changes_context_rope_and_lr_from_previous_weights(data_dir, tmp_path):
    recipe = recipe_dict(data_dir, max_steps=3)
    recipe["stages"].append(dict(
        name="midtrain", kind="midtrain", init_from="previous",
        model_overrides={"rope_theta": 40000.0, "max_position_embeddings": 256},
        data={"data_dir": str(data_dir), "sources": [{"path": "code", "weight": 1.0}]},
        seq_len=64, global_batch_size=8, micro_batch_size=4, max_steps=3, precision="fp32", eval_windows=4,
        optim={"lr": 3e-4, "warmup_steps": 1}))
    cfg = RecipeConfig.model_validate(recipe)
    pre, mid = run_recipe(cfg, tmp_path / "run")
    pre_model, _ = load_checkpoint(pre.final_dir)
    mid_model, _ = load_checkpoint(mid.final_dir)
    assert pre_model.config.rope_theta == 10000.0 and mid_model.config.rope_theta == 40000.0
    assert mid_model.config.max_position_embeddings == 256
    assert mid.tokens == 3 * 8 * 64                           # the longer windows were trained on
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "midtrain" / "metrics.jsonl") if "lr" in r]
    pre_lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl") if "lr" in r]
    assert max(lrs) == pytest.approx(max(pre_lrs) / 10)
    # the midtrain stage starts from the pretrain stage's final weights, with the new RoPE tables
    # (built the way the trainer builds it: on meta, materialised, then loaded tensor by tensor)
    with torch.device("meta"):
        start = PhiModel(model_config(cfg.stages[1], resolve_tokenizer(cfg), Path(pre.final_dir)))
    parallel.materialize(start, torch.device("cpu"))
    parallel.load_full_weights(start, Path(pre.final_dir) / "model.safetensors")
    for (name, a), b in zip(start.state_dict().items(), pre_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(start.rope.cos, pre_model.rope.cos)


def test_keep_best_exports_the_best_checkpoint(data_dir, tmp_path):
    # a learning rate far too high makes later checkpoints worse than an earlier one
    recipe = RecipeConfig.model_validate(recipe_dict(
        data_dir, max_steps=6, save_every=1, keep_best=True, keep_last=1,
        optim={"lr": 0.5, "warmup_steps": 0, "schedule": "wsd", "wsd_decay_fraction": 0.1}))
    (summary,) = run_recipe(recipe, tmp_path / "run")
    vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "run" / "pretrain" / "metrics.jsonl")
            if "val_loss" in r and r["step"] > 0}
    best_step = min(vals, key=vals.get)
    assert summary.best_step == best_step
    kept = [s for s, _ in complete_checkpoints(tmp_path / "run" / "pretrain" / "checkpoints")]
    assert best_step in kept and 6 in kept and len(kept) <= 2
    final, _ = load_checkpoint(summary.final_dir)
    best, _ = load_checkpoint(tmp_path / "run" / "pretrain" / "checkpoints" / f"step-{best_step:06d}")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), best.state_dict().values()))


def test_changed_recipe_is_refused_unless_forced(data_dir, tmp_path, capsys):
    from phitrain.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(data_dir, max_steps=2)))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 0  # finished stage is skipped
    assert "already finished" in capsys.readouterr().out
    argv = ["train", str(path), "--run-dir", str(tmp_path / "run"), "--set", "stages.0.optim.lr=0.01"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stages.0.optim.lr: 0.003 -> 0.01" in err and "--force" in err and "Traceback" not in err
    assert main(argv + ["--force"]) == 0


def test_activation_checkpointing_gives_the_same_losses(data_dir, tmp_path):
    plain = run_recipe(RecipeConfig.model_validate(recipe_dict(data_dir, max_steps=3)), tmp_path / "plain")
    ckpt = run_recipe(RecipeConfig.model_validate(recipe_dict(data_dir, max_steps=3, activation_checkpointing=True)),
                      tmp_path / "ckpt")
    la = [r["loss"] for r in read_metrics(tmp_path / "plain" / "pretrain" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "ckpt" / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-6)
    a, _ = load_checkpoint(plain[0].final_dir)
    b, _ = load_checkpoint(ckpt[0].final_dir)
    assert list(a.state_dict()) == list(b.state_dict())  # parameter names (the checkpoint format) unchanged


def test_compile_auto_stays_eager_when_the_run_is_too_short_to_pay(data_dir, tmp_path, capsys):
    (summary,) = run_recipe(RecipeConfig.model_validate(recipe_dict(data_dir, max_steps=5)), tmp_path / "run")
    assert summary.compiled_at_step is None
    assert "compile auto: stays eager" in capsys.readouterr().out


def test_compile_auto_compiles_when_it_pays_and_a_resume_compiles_again(data_dir, tmp_path, monkeypatch, capsys):
    """With compiling assumed free, auto compiles the blocks after step 3, records what the compile cost,
    trains to the eager run's losses, and a run resumed after that step compiles again before its first
    step (so its losses are the uninterrupted compiled run's)."""
    from phitrain import compile_cache
    from phitrain.train import trainer

    monkeypatch.setitem(trainer.DEFAULT_COMPILE_S, "cpu", 0.0)
    monkeypatch.setenv("PHITRAIN_CACHE_DIR", str(tmp_path / "cache"))
    recipe = RecipeConfig.model_validate(recipe_dict(data_dir, max_steps=6, save_every=4))
    (summary,) = run_recipe(recipe, tmp_path / "run")
    assert summary.compiled_at_step == 3
    assert "compile auto: compiling the blocks" in capsys.readouterr().out
    (seconds,) = json.loads((tmp_path / "cache" / compile_cache.TIMES_FILE).read_text()).values()
    assert seconds >= 0
    def train_losses(stage_dir):
        return [loss for _, loss, _ in losses(stage_dir) if loss is not None]

    compiled = train_losses(tmp_path / "run" / "pretrain")
    assert len(compiled) == 6

    eager = RecipeConfig.model_validate(recipe_dict(data_dir, max_steps=6, save_every=4, compile=False))
    run_recipe(eager, tmp_path / "eager")
    assert compiled == pytest.approx(train_losses(tmp_path / "eager" / "pretrain"), rel=1e-4)

    stage = tmp_path / "run" / "pretrain"   # back to the step-4 checkpoint, as if killed after it
    for gone in (stage / "checkpoints" / "step-000006", stage / trainer.FINAL_DIR):
        shutil.rmtree(gone)
    (stage / trainer.SUMMARY_FILE).unlink()
    capsys.readouterr()
    (resumed,) = run_recipe(recipe, tmp_path / "run")
    assert "compiling the blocks again (the run compiled them after step 3)" in capsys.readouterr().out
    assert resumed.compiled_at_step == 3
    assert train_losses(stage) == pytest.approx(compiled, rel=1e-6)


def test_datasheet_peaks_match_whole_gpu_names():
    from phitrain.train.metrics import datasheet_tflops

    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert datasheet_tflops("NVIDIA H100 PCIe", "bf16") == 756.0     # not the SXM part
    assert datasheet_tflops("NVIDIA L40S", "bf16") == 362.0          # not an L4
    assert datasheet_tflops("NVIDIA L4", "fp32") == 30.3
    assert datasheet_tflops("Tesla T4", "bf16") is None              # unlisted: the trainer measures instead
