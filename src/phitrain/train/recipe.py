"""Run a recipe — a chain of stages (pretrain → midtrain → finetune) — into one run directory.

The run directory holds `config.yaml` (the resolved recipe), one directory per stage and `report.md`.
Running the same command again continues where it stopped: finished stages (those with `final/` and
`summary.json`) are skipped and an interrupted stage resumes from its newest complete checkpoint. A
recipe that differs from the one the run directory was started with is refused, naming the changed
keys, unless `force` is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from phitrain.config import RecipeConfig, dump_yaml, load_yaml
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text
from phitrain.train import parallel
from phitrain.train.trainer import FINAL_DIR, SUMMARY_FILE, StageSummary, run_stage


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    return load_yaml(RecipeConfig, path, overrides)


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_run_dir(recipe: RecipeConfig, run_dir: Path, force: bool) -> None:
    """Refuse to continue a run directory under a changed recipe (unless forced); record the recipe."""
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        previous = yaml.safe_load(config_path.read_text())
        changes = _diff(previous, recipe.model_dump(mode="json"))
        if changes and not force:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise PhitrainError(f"{config_path}: the run was started with a different recipe ({shown}). "
                                "Use a new --run-dir, or --force to continue with the new one")
    dump_yaml(recipe, config_path)


def resolve_tokenizer(recipe: RecipeConfig):
    from phitrain.tokenizer import load_tokenizer

    if recipe.tokenizer:
        return load_tokenizer(recipe.tokenizer)  # a directory, a tokenizer.json, or "cl100k_base"
    path = Path(recipe.stages[0].data.data_dir) / "tokenizer"
    if not path.exists():
        raise PhitrainError(f"tokenizer: {path} does not exist; run `phitrain data prepare` first or set "
                            "`tokenizer:` in the recipe")
    return load_tokenizer(path)


def run_recipe(recipe: RecipeConfig, run_dir: str | Path, force: bool = False) -> list[StageSummary]:
    run_dir = Path(run_dir)
    dist, device = parallel.init_distributed(recipe.parallel, recipe.device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_run_dir(recipe, run_dir, force)
    dist.barrier()
    tokenizer = resolve_tokenizer(recipe)
    summaries: list[StageSummary] = []
    previous_final: Path | None = None
    for stage in recipe.stages:
        stage_dir = run_dir / stage.name
        if stage.init_from == "previous":
            init_dir = previous_final
        else:
            init_dir = Path(stage.init_from) if stage.init_from else None
        summary_path = stage_dir / SUMMARY_FILE
        if summary_path.is_file() and (stage_dir / FINAL_DIR).is_dir():
            summary = StageSummary(**json.loads(summary_path.read_text()))
            if dist.is_main:
                print(f"[{stage.name}] already finished ({summary.steps} steps); skipping", flush=True)
        else:
            summary = run_stage(stage, stage_dir, tokenizer=tokenizer, init_dir=init_dir, device=device,
                                dist=dist, parallel_cfg=recipe.parallel)
        summaries.append(summary)
        previous_final = stage_dir / FINAL_DIR
    if dist.is_main:
        write_report(recipe, run_dir, summaries)
        print_summary(summaries)
    return summaries


def seconds_per_step(probe: RecipeConfig, run_dir: Path) -> float:
    """Seconds per optimizer step of `probe`'s first stage, timed by running it (a few steps) with the
    trainer itself in `run_dir`, quietly; the directory is removed before (a killed probe may have left
    another configuration's) and after. How the quickstart and `ablate` fit their step counts to a
    time budget."""
    import contextlib
    import io
    import shutil

    probe = probe.model_copy(deep=True)
    probe.stages = probe.stages[:1]
    probe.stages[0].eval_windows = 1
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):   # the probe's own progress and table are noise here
        (summary,) = run_recipe(probe, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return probe.stages[0].tokens_per_step / summary.tokens_per_s


def _fmt(x, spec=".4f") -> str:
    return "—" if x is None else format(x, spec)


def write_report(recipe: RecipeConfig, run_dir: Path, summaries: list[StageSummary], extra: str = "") -> Path:
    lines = [f"# Run report: {recipe.name}", "", recipe.description, "",
             "| stage | steps | tokens | train loss first → last | val loss start → end | tokens/s | MFU | "
             "precision | wall |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s.stage} | {s.steps} | {s.tokens:,} | {_fmt(s.first_loss)} → {_fmt(s.final_loss)} | "
                     f"{_fmt(s.val_loss_start)} → {_fmt(s.val_loss_end)} | {s.tokens_per_s:,.0f} | "
                     f"{s.mfu:.1%} | {s.precision} | {s.wall_s:.0f} s |")
    lines.append("")
    for s in summaries:
        lines += [f"## {s.stage}", "",
                  f"{s.params:,} parameters on {s.device}; MFU against {s.peak_tflops:.2f} TFLOP/s "
                  f"({s.peak_source}). Skipped steps (non-finite): {s.skipped_steps}; loss spikes flagged: "
                  f"{s.loss_spikes}." + (f" Best checkpoint: step {s.best_step}." if s.best_step else ""),
                  "", f"![loss]({s.stage}/loss.png)", "", f"![lr]({s.stage}/lr.png)", ""]
    if extra:
        lines += [extra, ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def print_summary(summaries: list[StageSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training summary")
    for col in ("stage", "steps", "tokens", "loss first→last", "val start→end", "tok/s", "MFU", "wall"):
        table.add_column(col)
    for s in summaries:
        table.add_row(s.stage, str(s.steps), f"{s.tokens:,}", f"{_fmt(s.first_loss)}→{_fmt(s.final_loss)}",
                      f"{_fmt(s.val_loss_start)}→{_fmt(s.val_loss_end)}", f"{s.tokens_per_s:,.0f}",
                      f"{s.mfu:.1%}", f"{s.wall_s:.0f}s")
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    console.print(table)
