"""`phitrain sweep` (Phi-4 report §3: hyperparameters from shorter-horizon runs, warm-up stress test):
the fitting code on synthetic loss tables with a known optimum, instability detection, a real tiny sweep
that is killed with SIGKILL and resumed (only the missing trials run, fits identical), the stress test on
real runs, and one-line errors for bad sweep files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phitrain.config import DataRecipe, RecipeConfig, apply_overrides
from phitrain.train.sweep_fit import (detect_instability, fit_loss_horizon, fit_lr_curve, fit_power_law,
                                      recommend_warmup, spearman)

TINY = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=512,
            max_position_embeddings=128, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
GRID_LRS = [3e-3, 1e-2, 3e-2, 1e-1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A few stdlib packages prepared by the data pipeline, with a 512-id BPE."""
    import email
    import json as json_mod

    from phitrain.data.pipeline import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(DataRecipe.model_validate({
        "sources": [{"name": "code", "kind": "files",
                     "paths": [str(Path(json_mod.__file__).parent), str(Path(email.__file__).parent)],
                     "include": ["*.py"]}],
        "quality": {"enabled": False}, "decontam": {"enabled": False},
        "tokenizer": {"train": True, "vocab_size": 512}, "shards": {"val_fraction": 0.1},
        "executor": {"workers": 1}}), out, progress=False)
    return out


def sweep_dict(data_dir: Path, **top) -> dict:
    stage = dict(name="pretrain", model="phi-1-tiny", model_overrides=TINY,
                 data={"data_dir": str(data_dir), "sources": [{"path": "code", "weight": 1.0}]},
                 seq_len=32, global_batch_size=8, micro_batch_size=8, max_steps=96, precision="fp32",
                 eval_windows=16, peak_tflops=1.0, optim={"lr": 1e-2, "warmup_steps": 2})
    sweep = {"name": "test-sweep", "base": {"device": "cpu", "inline": stage},
             "grid": {"lr": GRID_LRS}, "horizons": [3072, 12288],          # 12 and 48 steps; target 96
             "stress": {"lr": 0.01, "warmup_steps": [0, 8], "lr_multipliers": [1.0, 100.0]},
             "parallel_trials": 2, "seed": 0}
    sweep.update(top)
    return sweep


def _cli(argv: list[str], stdout=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "phitrain", *argv], env=env, stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


# ---- fitting on synthetic tables whose optimum is known ---------------------------------------------------

def synthetic_loss(tokens: float, lr: float) -> float:
    """A loss surface with a known optimum: lr_opt = 0.5 · T^-0.3 and L(T) = 2 + 40 · T^-0.4 at it."""
    lr_opt = 0.5 * tokens ** -0.3
    return 2.0 + 40.0 * tokens ** -0.4 + 0.08 * math.log(lr / lr_opt) ** 2


def test_fits_recover_a_known_optimum_moving_down_with_the_horizon():
    horizons = [1e5, 2e5, 4e5, 8e5, 1.6e6]
    lrs = [10 ** (-3 + 0.25 * i) for i in range(9)]            # 1e-3 … 1e-1
    opts, best = [], []
    for h in horizons:
        fit = fit_lr_curve(lrs, [synthetic_loss(h, lr) for lr in lrs])
        assert fit.method == "quadratic" and fit.inside
        assert lrs[0] < fit.lr_opt < lrs[-1]
        assert fit.lr_opt == pytest.approx(0.5 * h ** -0.3, rel=1e-6)     # a parabola in ln lr is exact here
        opts.append(fit.lr_opt)
        best.append(fit.loss_opt)
    assert opts == sorted(opts, reverse=True)                     # the documented direction: lower LR for longer runs
    target = 1.28e7
    trend = fit_power_law(horizons, opts, target)
    assert trend.exponent == pytest.approx(-0.3, abs=1e-6) and trend.exponent < 0
    assert trend.target == pytest.approx(0.5 * target ** -0.3, rel=1e-5)
    assert trend.lo <= trend.target <= trend.hi
    loss = fit_loss_horizon(horizons, best, target)
    assert loss.kind == "saturating"
    assert loss.exponent == pytest.approx(0.4, rel=1e-3) and loss.asymptote == pytest.approx(2.0, abs=1e-3)
    assert loss.target == pytest.approx(2.0 + 40.0 * target ** -0.4, rel=1e-4)
    # deterministic: the same numbers twice, bit for bit
    again = fit_power_law(horizons, [fit_lr_curve(lrs, [synthetic_loss(h, lr) for lr in lrs]).lr_opt
                                     for h in horizons], target)
    assert again == trend


def test_fits_say_when_they_have_too_few_points_or_the_optimum_is_off_the_grid():
    edge = fit_lr_curve([1e-3, 2e-3, 4e-3], [3.0, 2.5, 2.0])   # still falling at the largest LR
    assert not edge.inside and edge.lr_opt == 4e-3 and "grid" in edge.note
    two = fit_lr_curve([1e-3, 2e-3], [3.0, 2.5])
    assert two.method == "grid" and "too few points" in two.note
    assert fit_lr_curve([1e-3, 2e-3], [math.nan, math.inf]).method == "none"
    one = fit_power_law([1e5], [1e-2], 1e6)
    assert one.kind == "none" and "too few horizons" in one.note
    pair = fit_power_law([1e5, 2e5], [1e-2, 8e-3], 1e6)
    assert pair.kind == "power" and pair.lo is None and "no confidence band" in pair.note
    assert fit_loss_horizon([1e5, 2e5, 4e5], [3.0, 2.8, 2.7], 1e6).kind == "power"   # < 4 points: log-log line
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_instability_detection_and_warmup_recommendation():
    def records(losses, norms=None):
        norms = norms or [1.0] * len(losses)
        return [{"step": i + 1, "loss": l, "grad_norm": g} for i, (l, g) in enumerate(zip(losses, norms))]

    kw = dict(spike_factor=2.0, grad_factor=10.0, window=10)
    smooth = [6.0 - 0.1 * i for i in range(20)]
    assert detect_instability(records(smooth), **kw).stable
    spiky = smooth[:10] + [13.0] + smooth[11:]
    bad = detect_instability(records(spiky), **kw)
    assert not bad.stable and bad.first_bad_step == 11 and "loss spike" in bad.reasons[0]
    exploding = detect_instability(records(smooth, [1.0] * 12 + [50.0] + [1.0] * 7), **kw)
    assert not exploding.stable and "grad-norm explosion at step 13" in exploding.reasons[0]
    nonfinite = records(smooth)
    nonfinite[4].update(loss=math.nan, skipped=True)
    assert "non-finite step 5" in detect_instability(nonfinite, **kw).reasons
    rising = detect_instability(records([6.0 + 0.05 * i for i in range(20)]), **kw)
    assert not rising.stable and "diverged" in rising.reasons[-1]
    assert recommend_warmup({0: [True, False], 4: [True, True], 8: [True, True]}, 1.5)["recommended"] == 6
    # a stable short warm-up below an unstable longer one passed by luck: not recommended
    assert recommend_warmup({0: [True], 4: [False], 8: [True]}, 1.0)["shortest_stable"] == 8
    assert recommend_warmup({0: [False], 4: [False]}, 1.5)["recommended"] is None


# ---- bad sweep files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    ({"grdi": {"lr": [1e-3]}}, "grdi: Extra inputs are not permitted"),
    ({"grid": {"lr": []}}, "grid.lr: Value error, lr is an empty list"),
    ({"horizons": [3072, 49152]}, "horizons: 49,152 tokens exceeds the target of 24,576 tokens"),
    ({"horizons": [3000]}, "3,000 tokens is not a whole number (>= 1) of steps"),
    ({"horizons": []}, "horizons is an empty list"),
    ({"stress": {"lr_multiplier": [2.0]}}, "stress.lr_multiplier: Extra inputs are not permitted"),
])
def test_bad_sweep_files_give_one_error_line(tmp_path, capsys, change, expected):
    from phitrain.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**sweep_dict(tmp_path / "no-data"), **change}))
    assert main(["sweep", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()            # nothing ran


def test_missing_data_is_one_error_before_any_trial(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(tmp_path / "no-data")))
    proc = _cli(["sweep", str(path), "--run-dir", str(tmp_path / "run")])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: tokenizer:") and "Traceback" not in err
    assert not (tmp_path / "run" / "trials").exists()


# ---- a real tiny sweep: kill -9, resume, fits, stress test ---------------------------------------------------

@pytest.mark.slow
def test_real_sweep_killed_resumes_only_missing_trials_and_fits_inside_the_grid(data_dir, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(data_dir)))
    run = tmp_path / "run"
    trials = run / "trials"

    def finished() -> dict[str, int]:
        return {p.parent.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/pretrain/summary.json")}

    proc = _cli(["sweep", str(path), "--run-dir", str(run)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(finished()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)                                  # the trial processes die with the sweep (PDEATHSIG)
    before = finished()
    n_grid = len(GRID_LRS) * 2
    assert 2 <= len(before) < n_grid + 4
    plan = json.loads((run / "plan.json").read_text())
    assert len(plan["trials"]) >= n_grid
    alive = subprocess.run(["pgrep", "-f", f"--run-dir {trials}"], capture_output=True, text=True).stdout
    assert not alive.strip(), f"trial processes outlived the killed sweep: {alive}"

    second = _cli(["sweep", str(path), "--run-dir", str(run)])
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    grid_done = sum(1 for k in before if k.startswith("h3.07e3") or k.startswith("h1.23e4"))
    assert f"grid: {n_grid} trials, {min(grid_done, n_grid)} already finished" in out
    after = finished()
    assert {k: after[k] for k in before} == before   # finished trials were not run again
    assert len(after) == n_grid + 4

    result = json.loads((run / "sweep.json").read_text())
    for h in result["per_horizon"]:                  # the optimum is inside the grid at every horizon
        assert h["method"] == "quadratic" and h["inside"], h
        assert min(GRID_LRS) < h["lr_opt"] < max(GRID_LRS)
    short, long = result["per_horizon"]
    assert long["lr_opt"] < short["lr_opt"]           # longer horizon, lower optimal LR (and lower loss)
    assert long["loss_opt"] < short["loss_opt"]
    assert result["lr_trend"]["exponent"] < 0
    assert result["spearman_shortest_longest"] is not None and -1 <= result["spearman_shortest_longest"] <= 1

    # the stress test: no warm-up at 100x the LR (lr 1.0) is flagged, the same LR x1 with a warm-up passes
    runs = {(r["warmup_steps"], r["lr_multiplier"]): r for r in result["stress"]["runs"]}
    assert not runs[0, 100.0]["stable"] and runs[0, 100.0]["reasons"]
    assert runs[8, 1.0]["stable"] and runs[0, 1.0]["stable"]
    for name in ("sweep.md", "lr_curves.png", "lr_vs_horizon.png", "stress.png", "recommended.yaml"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    report = (run / "sweep.md").read_text()
    assert "Spearman" in report and "**no**" in report

    # the patch is what `phitrain train --set` takes
    patch = yaml.safe_load((run / "recommended.yaml").read_text())
    assert patch["stages.0.optim.lr"] == pytest.approx(result["recommended"]["lr"])
    recipe = {"name": "x", "device": "cpu", "stages": [sweep_dict(data_dir)["base"]["inline"]]}
    cfg = RecipeConfig.model_validate(apply_overrides(recipe, [f"{k}={v}" for k, v in patch.items()]))
    assert cfg.stages[0].optim.lr == patch["stages.0.optim.lr"]
    assert f"--set stages.0.optim.lr={patch['stages.0.optim.lr']}" in out

    # fixed seed: a trial run again from scratch gives the same loss, and the fits are the same numbers
    from phitrain.train.sweep import load_sweep, run_sweep

    redo = sorted(after)[len(after) // 2]
    shutil.rmtree(trials / redo)
    sweep, sweep_dir = load_sweep(path)
    again = run_sweep(sweep, run, sweep_dir=sweep_dir, source=str(path))
    assert again["trials_run"] == 1
    for key in ("per_horizon", "lr_trend", "loss_trend", "spearman", "recommended"):
        assert again[key] == result[key], key
    def losses(trials):
        return {t["id"]: (t["loss"], t["first_loss"], t["final_loss"]) for t in trials}
    assert losses(again["trials"]) == losses(result["trials"])
    assert [r["final_loss"] for r in again["stress"]["runs"]] == [r["final_loss"] for r in result["stress"]["runs"]]
