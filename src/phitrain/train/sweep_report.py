"""The sweep's analysis assembled from its trials, and its outputs: `sweep.json`, `recommended.yaml`,
`sweep.md` with plots, and the summary table.

The numbers come from `sweep_fit` (Phi-4 report §3: interpolate from shorter horizons, stress-test the
warm-up); this module decides which curve is the sweep's answer — the batch size / warm-up / weight decay
combination with the lowest fitted loss at the longest horizon — and writes it down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from phitrain.errors import PhitrainError
from phitrain.files import atomic_path, atomic_write_text
from phitrain.train.sweep import round3
from phitrain.train.sweep_fit import (HorizonFit, LRFit, detect_instability, fit_loss_horizon, fit_lr_curve,
                                      fit_optimum_2d, fit_power_law, recommend_warmup, spearman)


def _asdict(x):
    from dataclasses import asdict

    return asdict(x)


def analyse(sweep, base, grid, results) -> dict:
    """Per horizon and per (batch size, warm-up, weight decay) combination, the LR curve's optimum; the
    chosen combination's optimum across horizons, fitted and extrapolated to the target; Spearman
    correlations of each horizon's trial ordering with the longest's."""
    horizons = sorted({t.tokens for t in grid})
    combos = sorted({(t.global_batch_size, t.warmup_steps, t.weight_decay) for t in grid})
    curves: dict[tuple, LRFit] = {}
    for combo in combos:
        for h in horizons:
            ts = [t for t in grid if t.tokens == h and (t.global_batch_size, t.warmup_steps, t.weight_decay) == combo]
            curves[combo, h] = fit_lr_curve([t.lr for t in ts], [results[t.id].loss for t in ts], sweep.fit_window)
    longest = horizons[-1]

    def at_longest(combo):
        loss = curves[combo, longest].loss_opt
        return math.inf if loss is None else loss

    best = min(combos, key=at_longest)
    if curves[best, longest].loss_opt is None:
        raise PhitrainError(f"{base.source}: no trial at the longest horizon ({longest:,} tokens) reached a finite "
                            "loss; lower the grid's learning rates")
    per_horizon = [{"tokens": h, **_asdict(curves[best, h])} for h in horizons]
    have = [p for p in per_horizon if p["lr_opt"] is not None]
    lr_trend = fit_power_law([p["tokens"] for p in have], [p["lr_opt"] for p in have], base.target_tokens)
    loss_trend = fit_loss_horizon([p["tokens"] for p in have], [p["loss_opt"] for p in have], base.target_tokens)
    by_key = {h: {t.key: results[t.id].loss for t in grid if t.tokens == h} for h in horizons}
    ranks = []
    for h in horizons[:-1]:
        keys = sorted(set(by_key[h]) & set(by_key[longest]))
        ranks.append({"tokens": h, "vs_tokens": longest, "n": len(keys),
                      "spearman": spearman([by_key[h][k] for k in keys], [by_key[longest][k] for k in keys])})
    batch = None
    sizes = sorted({c[0] for c in combos})
    if len(sizes) >= 3:
        batch = fit_optimum_2d([(b, min(at_longest(c) for c in combos if c[0] == b)) for b in sizes])
    if lr_trend.kind != "none":
        lr, lr_source = round3(lr_trend.target), f"power law in tokens extrapolated to {base.target_tokens:,} tokens"
    else:
        lr, lr_source = round3(curves[best, longest].lr_opt), f"optimum at the longest horizon ({longest:,} tokens)"
    return {
        "name": sweep.name, "base_stage": base.stage.name, "base_stage_index": base.index,
        "target_tokens": base.target_tokens, "horizons": horizons,
        "tokens_per_step": {str(b): b * base.stage.seq_len for b in sizes},
        "combos": [{"global_batch_size": c[0], "warmup_steps": c[1], "weight_decay": c[2],
                    "per_horizon": [{"tokens": h, **_asdict(curves[c, h])} for h in horizons]} for c in combos],
        "chosen_combo": {"global_batch_size": best[0], "warmup_steps": best[1], "weight_decay": best[2]},
        "per_horizon": per_horizon, "lr_trend": _asdict(lr_trend), "loss_trend": _asdict(loss_trend),
        "spearman": ranks, "spearman_shortest_longest": ranks[0]["spearman"] if ranks else None,
        "batch_size": batch,
        "recommended": {"lr": lr, "lr_source": lr_source, "global_batch_size": best[0], "warmup_steps": best[1],
                        "weight_decay": best[2], "warmup_source": "the grid's best warm-up"},
        "trials": [results[t.id].to_dict() for t in grid],
    }


def add_stress(sweep, analysis: dict, stress, results, lr: float) -> dict:
    """Judge every stress run from its metrics and pick the warm-up (sweep_fit.recommend_warmup)."""
    s = sweep.stress
    runs, by_warmup = [], {}
    for t in stress:
        inst = detect_instability(results[t.id].records, spike_factor=s.spike_factor, grad_factor=s.grad_factor,
                                  window=s.window)
        runs.append({**results[t.id].to_dict(), **inst.to_dict()})
        by_warmup.setdefault(t.warmup_steps, []).append(inst.stable)
    rec = recommend_warmup(by_warmup, s.margin)
    steps = stress[0].max_steps if stress else 0
    long_warmups = [w for w in by_warmup if w >= steps / 2]
    analysis["stress"] = {"lr": lr, "tokens": stress[0].tokens if stress else None, "max_steps": steps,
                          "lr_multipliers": sorted(s.lr_multipliers), "warmups": sorted(by_warmup), "runs": runs,
                          "note_long_warmups": (f"warm-ups {long_warmups} take half the stress run or more; "
                                                "lengthen stress.tokens to test them fully") if long_warmups else "",
                          **rec}
    if rec["recommended"] is not None:
        analysis["recommended"]["warmup_steps"] = rec["recommended"]
        analysis["recommended"]["warmup_source"] = "warm-up stress test"
    return analysis


def patch(analysis: dict, sweep) -> dict:
    """The recommended values as `--set` keys of the base recipe."""
    i, rec = analysis["base_stage_index"], analysis["recommended"]
    out = {f"stages.{i}.optim.lr": rec["lr"], f"stages.{i}.optim.warmup_steps": rec["warmup_steps"]}
    if sweep.grid.global_batch_size is not None:
        out[f"stages.{i}.global_batch_size"] = rec["global_batch_size"]
    if sweep.grid.weight_decay is not None:
        out[f"stages.{i}.optim.weight_decay"] = rec["weight_decay"]
    return out


def set_args(p: dict) -> str:
    return " ".join(f"--set {k}={v}" for k, v in p.items())


# ---- files ---------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plots(analysis: dict, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    combo = analysis["chosen_combo"]
    trials = [t for t in analysis["trials"] if (t["global_batch_size"], t["warmup_steps"], t["weight_decay"]) ==
              (combo["global_batch_size"], combo["warmup_steps"], combo["weight_decay"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for j, p in enumerate(analysis["per_horizon"]):
        color = cmap(j / max(1, len(analysis["per_horizon"]) - 1))
        pts = sorted((t["lr"], t["loss"]) for t in trials if t["tokens"] == p["tokens"] and t["loss"] is not None)
        ax.plot([a for a, _ in pts], [b for _, b in pts], "o", color=color, label=f"{p['tokens']:,} tokens")
        if p["coef"] and p["fit_lrs"]:
            xs = np.linspace(math.log(min(p["fit_lrs"])), math.log(max(p["fit_lrs"])), 50)
            ax.plot(np.exp(xs), np.polyval(p["coef"], xs), "-", color=color, lw=1)
        if p["lr_opt"] is not None:
            ax.plot([p["lr_opt"]], [p["loss_opt"]], "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="loss at the end (nats/token)",
           title="loss vs LR per horizon (quadratic in log LR; * = optimum)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, run_dir / "lr_curves.png")
    written.append("lr_curves.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    have = [p for p in analysis["per_horizon"] if p["lr_opt"] is not None]
    target = analysis["target_tokens"]
    for ax, key, trend, label in ((a1, "lr_opt", analysis["lr_trend"], "optimal LR"),
                                  (a2, "loss_opt", analysis["loss_trend"], "loss at the optimum")):
        ax.plot([p["tokens"] for p in have], [p[key] for p in have], "o", label="short horizons")
        ts = np.geomspace(min(p["tokens"] for p in have), target, 60)
        if trend["kind"] == "power":
            a, b = trend["params"]
            ax.plot(ts, np.exp(a + b * np.log(ts)), "-", lw=1, label=f"fit: exponent {b:.3g}")
        elif trend["kind"] == "saturating":
            l_inf, amp, alpha, t0 = trend["params"]
            ax.plot(ts, l_inf + amp * (ts / t0) ** (-alpha), "-", lw=1, label=f"fit: L∞ {l_inf:.3g}, α {alpha:.3g}")
        if trend["target"] is not None:
            err = None
            if trend["lo"] is not None:
                err = [[trend["target"] - trend["lo"]], [trend["hi"] - trend["target"]]]
            ax.errorbar([target], [trend["target"]], yerr=err, fmt="s", color="C3", capsize=4,
                        label="target (95% band)")
        ax.set(xscale="log", yscale="log" if key == "lr_opt" else "linear", xlabel="horizon (tokens)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("how the optimum moves with the horizon")
    fig.tight_layout()
    _save(fig, run_dir / "lr_vs_horizon.png")
    written.append("lr_vs_horizon.png")

    stress = analysis.get("stress")
    if stress and stress["runs"]:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        warmups = stress["warmups"]
        mults = stress["lr_multipliers"]
        styles = ["-", "--", ":", "-."]
        for run in stress["runs"]:
            recs = [r for r in run.get("records", []) if "loss" in r]
            color = cmap(warmups.index(run["warmup_steps"]) / max(1, len(warmups) - 1))
            ls = styles[mults.index(run["lr_multiplier"]) % len(styles)]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], ls, color=color, lw=1,
                    label=f"wu {run['warmup_steps']}, lr x{run['lr_multiplier']:g}" +
                    ("" if run["stable"] else " (unstable)"))
            if not run["stable"] and run["first_bad_step"] is not None:
                bad = [r for r in recs if r["step"] == run["first_bad_step"]]
                if bad and math.isfinite(bad[0]["loss"]):
                    ax.plot([bad[0]["step"]], [bad[0]["loss"]], "x", color="C3", ms=10, mew=2)
        ax.set(xlabel="step", ylabel="train loss", yscale="log",
               title=f"warm-up stress test at lr {stress['lr']:.3g} (x = first unstable step)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        _save(fig, run_dir / "stress.png")
        written.append("stress.png")
    return written


def _f(x, spec=".4g") -> str:
    return "—" if x is None else format(x, spec)


def _trend_line(name: str, t: dict, target: int) -> str:
    if t["kind"] == "none":
        return f"- {name}: not fitted — {t['note']}"
    band = f" (95% band {_f(t['lo'])} … {_f(t['hi'])})" if t["lo"] is not None else " (no band)"
    se = f" ± {t['exponent_se']:.2g}" if t["exponent_se"] is not None else ""
    what = "exponent b of a·T^b" if t["kind"] == "power" else f"α of L∞ + A·T^-α, L∞ = {_f(t['asymptote'])}"
    note = f" {t['note']}" if t["note"] else ""
    return f"- {name}: {what} = {t['exponent']:.3g}{se}; at {target:,} tokens: {_f(t['target'])}{band}.{note}"


def _markdown(analysis: dict, sweep, p: dict, plots: list[str]) -> str:
    a = analysis
    rec = a["recommended"]
    c = a["chosen_combo"]
    lines = [f"# Sweep report: {a['name']}", "", sweep.description, "",
             f"Base stage `{a['base_stage']}` (index {a['base_stage_index']}); target horizon "
             f"{a['target_tokens']:,} tokens; {len(a['trials'])} grid trials over horizons "
             f"{', '.join(f'{h:,}' for h in a['horizons'])} tokens. The chosen curve is batch size "
             f"{c['global_batch_size']}, warm-up {c['warmup_steps']}, weight decay {c['weight_decay']:g} "
             "(lowest fitted loss at the longest horizon). Method: Phi-4 report §3 — interpolate from shorter "
             "horizons, then stress-test the warm-up.", "",
             "## Loss vs LR per horizon", "",
             "| horizon (tokens) | optimal LR | loss there | method | inside grid | points | note |",
             "|---|---|---|---|---|---|---|"]
    for h in a["per_horizon"]:
        lines.append(f"| {h['tokens']:,} | {_f(h['lr_opt'])} | {_f(h['loss_opt'])} | {h['method']} | "
                     f"{'yes' if h['inside'] else 'NO'} | {h['n_points']} | {h['note']} |")
    lines += ["", *(f"![{n}]({n})" for n in plots if n == "lr_curves.png"), "", "## Across horizons", "",
              _trend_line("optimal LR", a["lr_trend"], a["target_tokens"]),
              _trend_line("loss at the optimum", a["loss_trend"], a["target_tokens"]), ""]
    if a["lr_trend"]["exponent"] is not None:
        lines += [f"The optimal LR {'falls' if a['lr_trend']['exponent'] < 0 else 'rises'} as the horizon grows "
                  "(longer runs want a lower peak LR; a negative exponent is the expected direction).", ""]
    lines += [*(f"![{n}]({n})" for n in plots if n == "lr_vs_horizon.png"), "",
              "## How far short runs can be trusted", "",
              "Spearman rank correlation of the trials' losses at each horizon with their losses at the longest "
              "(1 = the same ordering; Phi-4 §3 relied on this for its data-mixture ablations).", "",
              "| horizon | vs | trials | Spearman ρ |", "|---|---|---|---|"]
    for r in a["spearman"]:
        lines.append(f"| {r['tokens']:,} | {r['vs_tokens']:,} | {r['n']} | "
                     f"{_f(r['spearman'], '.3f') if r['spearman'] is not None else 'too few trials (< 3) or no spread'} |")
    if not a["spearman"]:
        lines.append("| — | — | — | one horizon only: nothing to correlate |")
    if a["batch_size"]:
        lines += ["", f"Batch size: fitted optimum {a['batch_size']['batch_size_opt']:.3g} "
                      f"({a['batch_size']['method']}) at the longest horizon."]
    st = a.get("stress")
    if st:
        lines += ["", "## Warm-up stress test", "",
                  f"At peak LR {st['lr']:.3g} times {', '.join(f'{m:g}' for m in st['lr_multipliers'])}, "
                  f"{st['tokens']:,} tokens ({st['max_steps']} steps) each. Unstable = a non-finite step, a loss "
                  f"above {sweep.stress.spike_factor:g}x its running median, a grad norm above "
                  f"{sweep.stress.grad_factor:g}x its running median, or a final loss above the first.", "",
                  "| warm-up | LR x | LR | stable | max loss / median | max grad / median | first → final loss | why |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in st["runs"]:
            lines.append(f"| {r['warmup_steps']} | {r['lr_multiplier']:g} | {r['lr']:.3g} | "
                         f"{'yes' if r['stable'] else '**no**'} | {r['max_loss_ratio']:.2f} | {r['max_grad_ratio']:.2f} | "
                         f"{_f(r['first_loss'])} → {_f(r['final_loss'])} | {'; '.join(r['reasons'])} |")
        lines += ["", st["note"] + ".", st["note_long_warmups"], "",
                  *(f"![{n}]({n})" for n in plots if n == "stress.png")]
    lines += ["", "## Recommendation", "",
              f"- peak LR {rec['lr']:.3g} ({rec['lr_source']})",
              f"- warm-up {rec['warmup_steps']} steps ({rec['warmup_source']})",
              f"- global batch size {rec['global_batch_size']}, weight decay {rec['weight_decay']:g}", "",
              "`recommended.yaml`, as arguments of `phitrain train`:", "", "```", set_args(p), "```", "",
              "## Trials", "", "| id | kind | steps | loss | first → final train loss | wall |", "|---|---|---|---|---|---|"]
    for t in a["trials"] + [r for r in (st or {}).get("runs", []) if r["id"] not in {x["id"] for x in a["trials"]}]:
        lines.append(f"| {t['id']} | {t['kind']} | {t['max_steps']} | {_f(t['loss'])} | {_f(t['first_loss'])} → "
                     f"{_f(t['final_loss'])} | {t['wall_s']:.0f} s |")
    lines += ["", f"Sweep wall time {a['wall_s']:.0f} s; {a['trials_run']} trials run this time."]
    return "\n".join(lines) + "\n"


def write_outputs(sweep, base, analysis: dict, grid, stress, results, run_dir: Path) -> None:
    if analysis.get("stress"):
        for run in analysis["stress"]["runs"]:
            run["records"] = [{k: r[k] for k in ("step", "loss", "grad_norm", "lr", "skipped") if k in r}
                              for r in results[run["id"]].records if "loss" in r]
    plots = _plots(analysis, run_dir)
    p = patch(analysis, sweep)
    analysis["patch"] = p
    analysis["plots"] = plots
    atomic_write_text(run_dir / "sweep.json", json.dumps(analysis, indent=2, default=_json_default) + "\n")
    atomic_write_text(run_dir / "recommended.yaml",
                      f"# phitrain sweep {sweep.name}: recommended values for stage {base.stage.name!r} "
                      f"(index {base.index}).\n# Use: phitrain train RECIPE.yaml --run-dir DIR {set_args(p)}\n"
                      + yaml.safe_dump(p, sort_keys=False))
    atomic_write_text(run_dir / "sweep.md", _markdown(analysis, sweep, p, plots))


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x))


def print_summary(analysis: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {analysis['name']}: optimum per horizon")
    for col in ("horizon (tokens)", "optimal LR", "loss", "method", "inside grid", "Spearman vs longest"):
        table.add_column(col)
    rho = {r["tokens"]: r["spearman"] for r in analysis["spearman"]}
    for h in analysis["per_horizon"]:
        table.add_row(f"{h['tokens']:,}", _f(h["lr_opt"]), _f(h["loss_opt"]), h["method"],
                      "yes" if h["inside"] else "NO", _f(rho.get(h["tokens"]), ".3f"))
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    console.print(table)
    t = analysis["lr_trend"]
    if t["kind"] != "none":
        band = f" [{_f(t['lo'])}, {_f(t['hi'])}]" if t["lo"] is not None else ""
        print(f"optimal LR ∝ tokens^{t['exponent']:.3g}; at {analysis['target_tokens']:,} tokens: "
                      f"{_f(t['target'])}{band}")
    st = analysis.get("stress")
    if st:
        bad = sum(not r["stable"] for r in st["runs"])
        print(f"stress test: {len(st['runs'])} runs, {bad} unstable; {st['note']}")
    print(f"recommended ({run_dir / 'recommended.yaml'}): {set_args(analysis['patch'])}")
    print(f"report: {run_dir / 'sweep.md'}", flush=True)
