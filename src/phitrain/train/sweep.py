"""`phitrain sweep`: short-horizon hyperparameter sweeps, extrapolated to the full run, and a warm-up
stress test (Phi-4 report §3: pretraining hyperparameters "tuned using interpolations from shorter
horizon runs and further adjusted by stress testing the learning rate warm-up stage for stability").

A sweep file names a base stage (a stage of a recipe, or one written inline), a grid of peak LR, global
batch size, warm-up steps and weight decay, and several short horizons (token budgets). Every trial is
an ordinary one-stage recipe run by `python -m phitrain train` in its own directory
`RUN_DIR/trials/<id>/`, the id spelling out its hyperparameters (`h2.05e5-lr3e-3-bs16-wu10-wd0.1`). So a
trial resumes like any run, a finished one (summary.json + final/) is skipped, trials run side by side
(`parallel_trials` processes; `launcher` puts torchrun or srun in front; `devices` gives each slot its
GPUs), and a `kill -9` of the sweep loses only the unfinished trials: the children die with it
(PR_SET_PDEATHSIG) and the next run starts exactly those again.

Two phases: the grid, then the fits (`sweep_fit`); then the stress trials at the chosen LR with shortened
warm-ups and raised LRs, which depend on the grid's result. The plan (`plan.json`), the analysis
(`sweep.json`), the report (`sweep.md` with plots) and `recommended.yaml` (a `--set` patch) are written
to the run directory.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationInfo, field_validator, model_validator

from phitrain.config import Config, RecipeConfig, StageConfig, load_yaml, read_yaml, validate
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text

TRIALS_DIR = "trials"
TRIAL_RECIPE = "recipe.yaml"


# ---- the sweep file ------------------------------------------------------------------------------------

class SweepBase(Config):
    """The stage every trial starts from: `recipe` (a recipe YAML, relative to the sweep file or the
    working directory) and `stage` (its name or index; default the first), or an `inline` stage with the
    recipe-level `device` and `tokenizer`."""

    recipe: str | None = None
    stage: str | int | None = None
    inline: StageConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SweepBase":
        if (self.recipe is None) == (self.inline is None):
            raise ValueError("give exactly one of recipe (a recipe YAML, with stage) or inline (a stage)")
        if self.inline is not None and self.stage is not None:
            raise ValueError("stage selects a stage of recipe; an inline stage needs none")
        return self


def _check_list(name: str, values, positive: bool = True):
    if values is None:
        return values
    if not values:
        raise ValueError(f"{name} is an empty list: list at least one value, or omit it to use the base's value")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists a value twice: {values}")
    if positive and any(v <= 0 for v in values):
        raise ValueError(f"{name} values must be positive, got {values}")
    if not positive and any(v < 0 for v in values):
        raise ValueError(f"{name} values must be >= 0, got {values}")
    return values


def _positive_list(values, info: ValidationInfo):
    return _check_list(info.field_name, values)


def _nonnegative_list(values, info: ValidationInfo):
    return _check_list(info.field_name, values, positive=False)


class SweepGrid(Config):
    """Values to try; every combination is a trial at every horizon. An omitted key keeps the base's value."""

    lr: list[float] | None = None
    global_batch_size: list[int] | None = None
    warmup_steps: list[int] | None = None
    weight_decay: list[float] | None = None

    _positive = field_validator("lr", "global_batch_size")(_positive_list)
    _nonnegative = field_validator("warmup_steps", "weight_decay")(_nonnegative_list)


class StressConfig(Config):
    """The warm-up stress test: runs at the chosen peak LR (`lr`, default the sweep's extrapolated optimum)
    times each of `lr_multipliers`, with each warm-up of `warmup_steps` (default: `warmup_fractions` of the
    chosen warm-up), for `tokens` (default the longest horizon). A run is unstable on a non-finite step,
    a loss above `spike_factor` x the running median of the last `window` losses, a gradient norm above
    `grad_factor` x its running median, or a final loss above the first. The recommendation is the
    shortest warm-up stable at every multiplier, times `margin`."""

    enabled: bool = True
    tokens: int | None = None
    lr: float | None = None
    warmup_steps: list[int] | None = None
    warmup_fractions: list[float] = [0.0, 0.25, 0.5, 1.0]
    lr_multipliers: list[float] = [1.0, 2.0]
    spike_factor: float = 2.0
    grad_factor: float = 10.0
    window: int = 10
    margin: float = 1.5

    _positive = field_validator("lr_multipliers")(_positive_list)
    _nonnegative = field_validator("warmup_steps", "warmup_fractions")(_nonnegative_list)

    @model_validator(mode="after")
    def _check(self) -> "StressConfig":
        if self.spike_factor <= 1 or self.grad_factor <= 1:
            raise ValueError("spike_factor and grad_factor must be above 1")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.margin < 1:
            raise ValueError(f"margin must be at least 1, got {self.margin}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return self


class SweepConfig(Config):
    """What `phitrain sweep SWEEP.yaml --run-dir DIR` runs (see the module docstring and README)."""

    name: str = "sweep"
    description: str = ""
    base: SweepBase
    grid: SweepGrid = SweepGrid()
    horizons: list[int]                      # token budgets of the short runs
    target_tokens: int | None = None         # the horizon to extrapolate to; default the base stage's
    fit_window: int = 2                      # grid neighbours each side of the minimum in the LR fit
    stress: StressConfig = StressConfig()
    parallel_trials: int = 1                 # trial processes at once on this machine
    launcher: list[str] = []                 # replaces the interpreter: [torchrun, --nproc_per_node=8], [srun, -n1, python]
    devices: list[str] = []                  # CUDA_VISIBLE_DEVICES of each concurrent slot, e.g. ["0", "1"]
    threads_per_trial: int | None = None     # OMP threads per trial (default: cores ÷ parallel_trials)
    trial_save_every: int = 0                # checkpoints inside a trial (0: only at its end)
    seed: int | None = None                  # every trial's seed (default: the base stage's)

    _positive = field_validator("horizons")(_positive_list)

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        if self.fit_window < 1:
            raise ValueError(f"fit_window must be at least 1, got {self.fit_window}")
        if self.parallel_trials < 1:
            raise ValueError(f"parallel_trials must be at least 1, got {self.parallel_trials}")
        if self.devices and len(self.devices) < self.parallel_trials:
            raise ValueError(f"devices lists {len(self.devices)} slots for parallel_trials {self.parallel_trials}")
        if self.target_tokens is not None and self.target_tokens <= 0:
            raise ValueError(f"target_tokens must be positive, got {self.target_tokens}")
        return self


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Path]:
    """The sweep config and the directory its relative `base.recipe` is looked up in."""
    return load_yaml(SweepConfig, path, overrides), Path(path).resolve().parent


# ---- trials --------------------------------------------------------------------------------------------

def _sci(x: float) -> str:
    """3 significant digits without '+' or padding: 0.003 -> 3e-3, 204800 -> 2.05e5."""
    mant, exp = f"{x:.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def round3(x: float) -> float:
    """A value as its trial id spells it (3 significant digits), so id and config always agree."""
    return float(f"{x:.3g}")


@dataclass
class Trial:
    kind: str                 # "grid" or "stress"
    tokens: int
    lr: float
    global_batch_size: int
    warmup_steps: int
    weight_decay: float
    max_steps: int
    lr_multiplier: float = 1.0

    @property
    def id(self) -> str:
        return (f"h{_sci(self.tokens)}-lr{_sci(self.lr)}-bs{self.global_batch_size}-wu{self.warmup_steps}"
                f"-wd{self.weight_decay:g}")

    @property
    def key(self) -> tuple:
        """The hyperparameters without the horizon: the same trial at another horizon has the same key."""
        return (self.lr, self.global_batch_size, self.warmup_steps, self.weight_decay)

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}


@dataclass
class Base:
    """The resolved base: the recipe-level settings, the stage, and its index in the recipe (for --set)."""

    recipe: RecipeConfig
    stage: StageConfig
    index: int
    target_tokens: int
    source: str


def resolve_base(sweep: SweepConfig, sweep_dir: Path, source: str) -> Base:
    b = sweep.base
    if b.inline is not None:
        recipe = RecipeConfig(name=sweep.name, device=b.device, tokenizer=b.tokenizer, stages=[b.inline])
        index = 0
    else:
        path = Path(b.recipe)
        if not path.is_absolute() and not path.is_file() and (sweep_dir / path).is_file():
            path = sweep_dir / path
        recipe = validate(RecipeConfig, read_yaml(path), str(path))
        names = [s.name for s in recipe.stages]
        if b.stage is None:
            index = 0
        elif isinstance(b.stage, int):
            if not 0 <= b.stage < len(names):
                raise PhitrainError(f"{source}: base.stage: {b.stage} is not a stage index of {path} "
                                    f"({len(names)} stages: {names})")
            index = b.stage
        elif b.stage in names:
            index = names.index(b.stage)
        else:
            raise PhitrainError(f"{source}: base.stage: no stage {b.stage!r} in {path} (stages: {names})")
    stage = recipe.stages[index]
    if stage.init_from == "previous":
        raise PhitrainError(f"{source}: base stage {stage.name!r} starts from the previous stage (init_from: "
                            "previous), which a sweep trial does not have; sweep a stage with model: or a "
                            "checkpoint directory in init_from")
    target = sweep.target_tokens or stage.total_tokens
    return Base(recipe, stage, index, target, source)


def _steps(tokens: int, gbs: int, seq_len: int, what: str, source: str) -> int:
    per_step = gbs * seq_len
    if tokens % per_step or tokens < per_step:
        hint = (f"use a multiple of {per_step:,}" if tokens >= per_step else f"the smallest is {per_step:,}")
        raise PhitrainError(f"{source}: {what}: {tokens:,} tokens is not a whole number (>= 1) of steps of "
                            f"global_batch_size {gbs} x seq_len {seq_len} = {per_step:,} tokens; {hint}")
    return tokens // per_step


def grid_trials(sweep: SweepConfig, base: Base) -> list[Trial]:
    st, g, src = base.stage, sweep.grid, base.source
    for h in sweep.horizons:
        if h > base.target_tokens:
            raise PhitrainError(f"{src}: horizons: {h:,} tokens exceeds the target of {base.target_tokens:,} tokens "
                                "(target_tokens, default the base stage's max_steps x global_batch_size x seq_len); "
                                "a sweep extrapolates from shorter runs")
    trials = []
    for tokens, lr, gbs, wu, wd in itertools.product(
            sorted(sweep.horizons), g.lr or [st.optim.lr], g.global_batch_size or [st.global_batch_size],
            g.warmup_steps if g.warmup_steps is not None else [st.optim.warmup_steps],
            g.weight_decay if g.weight_decay is not None else [st.optim.weight_decay]):
        steps = _steps(tokens, gbs, st.seq_len, "horizons", src)
        trials.append(Trial("grid", tokens, round3(lr), gbs, wu, wd, steps))
    _unique(trials, src)
    return trials


def stress_trials(sweep: SweepConfig, base: Base, lr: float, warmup: int, gbs: int, wd: float) -> list[Trial]:
    s, src = sweep.stress, base.source
    tokens = s.tokens or max(sweep.horizons)
    if tokens > base.target_tokens:
        raise PhitrainError(f"{src}: stress.tokens: {tokens:,} exceeds the target of {base.target_tokens:,} tokens")
    steps = _steps(tokens, gbs, base.stage.seq_len, "stress.tokens", src)
    warmups = s.warmup_steps if s.warmup_steps is not None else sorted({round(f * warmup) for f in s.warmup_fractions})
    trials = [Trial("stress", tokens, round3(lr * m), gbs, w, wd, steps, lr_multiplier=m)
              for w in sorted(warmups) for m in sorted(s.lr_multipliers)]
    _unique(trials, src)
    return trials


def _unique(trials: list[Trial], source: str) -> None:
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.id in seen and seen[t.id] != t:
            raise PhitrainError(f"{source}: two trials round to the same id {t.id} (values closer than 3 "
                                "significant digits); spread the grid")
        seen[t.id] = t


def trial_recipe(sweep: SweepConfig, base: Base, trial: Trial) -> RecipeConfig:
    """The trial as an ordinary one-stage recipe: the base stage with the trial's values, checkpoints only at
    the end (keep one), evaluation at the end, and absolute paths so any node can run it."""
    st = base.stage.model_dump()
    st["max_steps"] = trial.max_steps
    st["global_batch_size"] = trial.global_batch_size
    if trial.global_batch_size % st["micro_batch_size"]:
        st["micro_batch_size"] = math.gcd(trial.global_batch_size, st["micro_batch_size"])
    st["optim"].update(lr=trial.lr, warmup_steps=trial.warmup_steps, weight_decay=trial.weight_decay)
    st.update(save_every=sweep.trial_save_every, keep_last=1, keep_best=False, eval_every=0)
    if sweep.seed is not None:
        st["seed"] = sweep.seed
    st["data"]["data_dir"] = str(Path(st["data"]["data_dir"]).resolve())
    if st.get("init_from"):
        st["init_from"] = str(Path(st["init_from"]).resolve())
    r = base.recipe
    tok = r.tokenizer if r.tokenizer in (None, "cl100k_base") or not Path(r.tokenizer).exists() \
        else str(Path(r.tokenizer).resolve())
    return validate(RecipeConfig, {"name": f"{sweep.name}-{trial.id}", "description": f"sweep trial ({trial.kind})",
                                   "tokenizer": tok, "device": r.device, "parallel": r.parallel.model_dump(),
                                   "stages": [st]}, f"{base.source}: trial {trial.id}")


def trial_dir(run_dir: Path, trial: Trial) -> Path:
    return run_dir / TRIALS_DIR / trial.id


def is_finished(run_dir: Path, trial: Trial, stage_name: str) -> bool:
    from phitrain.train.trainer import FINAL_DIR, SUMMARY_FILE

    stage_dir = trial_dir(run_dir, trial) / stage_name
    return (stage_dir / SUMMARY_FILE).is_file() and (stage_dir / FINAL_DIR).is_dir()


# ---- running trials ------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the sweep process dies (Linux PR_SET_PDEATHSIG), so a
    killed sweep leaves no orphan writing into a trial directory the next run will resume."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _last_error(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errs or lines or ["no output"])[-1].strip()


def run_trials(sweep: SweepConfig, base: Base, trials: list[Trial], run_dir: Path, force: bool,
               phase: str) -> int:
    """Run every unfinished trial as `python -m phitrain train` children, `parallel_trials` at a time;
    returns how many ran. A trial that fails stops the sweep with its error (finished trials are kept)."""
    from phitrain.progress import Progress
    from phitrain.train.recipe import _diff

    todo = []
    for t in trials:
        if is_finished(run_dir, t, base.stage.name):
            continue
        recipe = trial_recipe(sweep, base, t)
        d = trial_dir(run_dir, t)
        old = d / "config.yaml"
        if old.is_file() and not force:
            changes = _diff(yaml.safe_load(old.read_text()), recipe.model_dump(mode="json"))
            if changes:
                raise PhitrainError(f"{old}: trial {t.id} was started with a different stage ({changes[0]}); "
                                    "use a new --run-dir, or --force to continue with the new one")
        atomic_write_text(d / TRIAL_RECIPE, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        todo.append(t)
    done = len(trials) - len(todo)
    print(f"[sweep] {phase}: {len(trials)} trials, {done} already finished, {len(todo)} to run "
          f"({sweep.parallel_trials} at a time)", flush=True)
    if not todo:
        return 0
    threads = sweep.threads_per_trial or max(1, (os.cpu_count() or 1) // sweep.parallel_trials)
    prefix = list(sweep.launcher) or [sys.executable]
    queue = list(todo)
    running: dict[int, tuple[Trial, subprocess.Popen, object]] = {}
    failures: list[str] = []
    progress = Progress(f"sweep {phase}", len(todo), file=sys.stdout, unit="trial")
    try:
        while queue or running:
            free = [s for s in range(sweep.parallel_trials) if s not in running]
            while queue and free and not failures:
                slot, t = free.pop(0), queue.pop(0)
                d = trial_dir(run_dir, t)
                env = {**os.environ}
                if sweep.threads_per_trial:
                    env["OMP_NUM_THREADS"] = str(sweep.threads_per_trial)
                env.setdefault("OMP_NUM_THREADS", str(threads))
                env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
                if sweep.devices:
                    env["CUDA_VISIBLE_DEVICES"] = sweep.devices[slot]
                cmd = prefix + ["-m", "phitrain", "train", str(d / TRIAL_RECIPE), "--run-dir", str(d)]
                if force:
                    cmd.append("--force")
                log = open(d / "train.log", "ab")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                running[slot] = (t, proc, log)
            if failures and not running:
                break
            time.sleep(0.1)
            for slot, (t, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                if proc.returncode != 0:
                    failures.append(f"trial {t.id} failed (exit {proc.returncode}): "
                                    f"{_last_error(trial_dir(run_dir, t) / 'train.log')}")
                progress.advance(info=t.id)
    finally:
        for t, proc, log in running.values():
            proc.kill()
            proc.wait()
            log.close()
        progress.close()
    if failures:
        raise PhitrainError(f"{failures[0]} (log: {run_dir / TRIALS_DIR}/<id>/train.log; finished trials are kept, "
                            "re-run the same command to retry)" +
                            (f"; {len(failures) - 1} more failed" if len(failures) > 1 else ""))
    return len(todo)


@dataclass
class TrialResult:
    trial: Trial
    loss: float | None            # the fitted quantity: validation loss at the end, else the last train loss
    first_loss: float | None
    final_loss: float | None
    val_loss: float | None
    wall_s: float
    records: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {**self.trial.to_dict(), "loss": self.loss, "first_loss": self.first_loss,
                "final_loss": self.final_loss, "val_loss": self.val_loss, "wall_s": self.wall_s}


def read_result(run_dir: Path, trial: Trial, stage_name: str) -> TrialResult:
    from phitrain.train.metrics import read_metrics
    from phitrain.train.trainer import SUMMARY_FILE

    stage_dir = trial_dir(run_dir, trial) / stage_name
    s = json.loads((stage_dir / SUMMARY_FILE).read_text())

    def finite(x):
        return x if x is not None and math.isfinite(x) else None

    val, final = finite(s.get("val_loss_end")), finite(s.get("final_loss"))
    return TrialResult(trial, val if val is not None else final, finite(s.get("first_loss")), final, val,
                       float(s.get("wall_s", 0.0)), read_metrics(stage_dir / "metrics.jsonl"))


def _write_plan(run_dir: Path, sweep: SweepConfig, base: Base, trials: list[Trial]) -> None:
    atomic_write_text(run_dir / "plan.json", json.dumps({
        "sweep": sweep.model_dump(mode="json"), "base_stage": base.stage.name, "base_stage_index": base.index,
        "target_tokens": base.target_tokens, "trials": [t.to_dict() for t in trials]}, indent=2) + "\n")


# ---- the whole sweep -----------------------------------------------------------------------------------

def run_sweep(sweep: SweepConfig, run_dir: str | Path, *, sweep_dir: Path | None = None, source: str = "sweep",
              force: bool = False) -> dict:
    """Run (or resume) a sweep into `run_dir`; returns the analysis written to `sweep.json`."""
    from phitrain.train import sweep_report
    from phitrain.train.recipe import resolve_tokenizer

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    base = resolve_base(sweep, sweep_dir or Path.cwd(), source)
    grid = grid_trials(sweep, base)
    for t in grid:                            # every trial's stage validates before anything runs
        trial_recipe(sweep, base, t)
    resolve_tokenizer(trial_recipe(sweep, base, grid[0]))   # data prepared? one clear error here, not N
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_plan(run_dir, sweep, base, grid)
    ran = run_trials(sweep, base, grid, run_dir, force, "grid")
    results = {t.id: read_result(run_dir, t, base.stage.name) for t in grid}
    analysis = sweep_report.analyse(sweep, base, grid, results)
    stress: list[Trial] = []
    if sweep.stress.enabled:
        choice = analysis["recommended"]
        lr = sweep.stress.lr or choice["lr"]
        stress = stress_trials(sweep, base, lr, choice["warmup_steps"], choice["global_batch_size"],
                               choice["weight_decay"])
        for t in stress:
            trial_recipe(sweep, base, t)
        _write_plan(run_dir, sweep, base, grid + stress)
        ran += run_trials(sweep, base, stress, run_dir, force, "stress")
        for t in stress:
            results.setdefault(t.id, read_result(run_dir, t, base.stage.name))
        analysis = sweep_report.add_stress(sweep, analysis, stress, results, lr)
    analysis["wall_s"] = time.perf_counter() - t0
    analysis["trials_run"] = ran
    sweep_report.write_outputs(sweep, base, analysis, grid, stress, results, run_dir)
    sweep_report.print_summary(analysis, run_dir)
    return analysis
