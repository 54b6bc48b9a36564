"""The sweep's analysis: loss-vs-LR fits per horizon, how the optimum moves with the horizon, rank
correlation between short and long runs, and the warm-up stress test's instability detection.

The Phi-4 report (§3, "Pretraining details") tuned its pretraining hyperparameters "using interpolations
from shorter horizon runs" and adjusted them "by stress testing the learning rate warm-up stage for
stability"; its data-mixture ablations trusted short runs because their rankings correlated with long
ones. This module is that analysis, kept free of randomness (closed-form least squares and a
deterministic trust-region `curve_fit` from fixed starting points), so the same trial losses always
give the same numbers. Everything here works on plain numbers; `phitrain.train.sweep` runs the trials.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from statistics import median

import numpy as np

Z95 = 1.959963984540054   # two-sided 95% normal quantile, used when a fit has no degrees of freedom left


def _t95(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, dof)) if dof > 0 else math.inf


# ---- one horizon: loss against log(lr) -----------------------------------------------------------------

@dataclass
class LRFit:
    """The optimum of one loss-vs-LR curve (one horizon, one batch size / warm-up / weight decay).

    `method`: "quadratic" (vertex of a parabola in ln(lr) through the points around the grid minimum),
    "grid" (the best grid point: too few points, no upward curvature, or a vertex outside the fitted
    points), or "none" (no finite loss). `inside` is False when the optimum sits on the edge of the grid:
    the true optimum may lie beyond it and the grid should be widened."""

    lr_opt: float | None
    loss_opt: float | None
    method: str
    inside: bool
    n_points: int
    coef: list[float] = field(default_factory=list)      # c2, c1, c0 of loss = c2 x^2 + c1 x + c0, x = ln lr
    fit_lrs: list[float] = field(default_factory=list)
    note: str = ""


def fit_lr_curve(lrs: list[float], losses: list[float], window: int = 2) -> LRFit:
    """Fit loss = c2·ln(lr)² + c1·ln(lr) + c0 over the grid minimum and `window` neighbours each side.

    Only the points around the minimum are used because the curve is a parabola in log LR only near its
    bottom: far too high an LR diverges (a wall, not a parabola) and far too low barely trains.
    """
    pts = sorted((lr, loss) for lr, loss in zip(lrs, losses) if loss is not None and math.isfinite(loss))
    grid = sorted(set(lrs))
    if not pts:
        return LRFit(None, None, "none", False, 0, note="no trial reached a finite loss")
    best = min(range(len(pts)), key=lambda i: pts[i][1])
    lr_best, loss_best = pts[best]
    on_edge = lr_best in (grid[0], grid[-1])
    lo, hi = max(0, best - window), min(len(pts), best + window + 1)
    sel = pts[lo:hi]
    if len(sel) < 3:
        return LRFit(lr_best, loss_best, "grid", not on_edge, len(sel), fit_lrs=[p[0] for p in sel],
                     note=f"too few points for a fit ({len(sel)} < 3): the best grid point is used")
    x = np.log([p[0] for p in sel])
    y = np.array([p[1] for p in sel])
    c2, c1, c0 = (float(c) for c in np.polyfit(x, y, 2))
    if c2 <= 0:
        return LRFit(lr_best, loss_best, "grid", not on_edge, len(sel), [c2, c1, c0], [p[0] for p in sel],
                     note="no upward curvature around the minimum: the best grid point is used")
    xv = -c1 / (2 * c2)
    if not x.min() <= xv <= x.max():
        return LRFit(lr_best, loss_best, "grid", False, len(sel), [c2, c1, c0], [p[0] for p in sel],
                     note=f"the parabola's vertex (lr {math.exp(xv) if abs(xv) < 700 else math.inf:.3g}) lies "
                          "outside the grid: widen it")
    return LRFit(math.exp(xv), c0 - c1 * c1 / (4 * c2), "quadratic", not on_edge, len(sel), [c2, c1, c0], [p[0] for p in sel],
                 note="" if not on_edge else "the grid's best point is on its edge: widen the grid")


def fit_optimum_2d(points: list[tuple[float, float]]) -> dict | None:
    """The optimal batch size from (batch size, best loss at it) pairs: a parabola in ln(batch size)
    over at least three batch sizes, vertex clipped to the measured range. None when fewer."""
    pts = sorted((b, l) for b, l in points if l is not None and math.isfinite(l))
    if len(pts) < 3:
        return None
    x, y = np.log([p[0] for p in pts]), np.array([p[1] for p in pts])
    c2, c1, _ = np.polyfit(x, y, 2)
    if c2 <= 0:
        return {"batch_size_opt": float(min(pts, key=lambda p: p[1])[0]), "method": "grid"}
    xv = float(np.clip(-c1 / (2 * c2), x.min(), x.max()))
    return {"batch_size_opt": math.exp(xv), "method": "quadratic"}


# ---- across horizons -------------------------------------------------------------------------------------

@dataclass
class HorizonFit:
    """A fitted trend of a quantity against the horizon (tokens), extrapolated to the target horizon.

    `kind`: "power" (y = a·T^b, linear in log-log; `exponent` = b), "saturating" (loss = L∞ + A·T^-α;
    `exponent` = α, `asymptote` = L∞) or "none". `lo`/`hi` bound the 95% confidence band at the target
    (None when the fit has no degrees of freedom left to estimate one)."""

    kind: str
    n_points: int
    params: list[float]
    exponent: float | None
    exponent_se: float | None
    target: float | None
    lo: float | None
    hi: float | None
    asymptote: float | None = None
    note: str = ""


def fit_power_law(tokens: list[float], values: list[float], target_tokens: float) -> HorizonFit:
    """log(y) = a + b·log(T) by least squares (scipy `curve_fit`); the band at the target comes from the
    parameters' covariance (delta method) with a Student-t quantile for the few points a sweep has."""
    from scipy.optimize import OptimizeWarning, curve_fit

    pts = [(t, v) for t, v in zip(tokens, values) if v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2 or len({t for t, _ in pts}) < 2:
        return HorizonFit("none", len(pts), [], None, None, None, None, None,
                          note=f"too few horizons with a result ({len(pts)} < 2) to fit a trend")
    x = np.log([t for t, _ in pts])
    y = np.log([v for _, v in pts])
    x0 = float(x.mean())   # centred: a well-conditioned fit whatever the token scale
    with warnings.catch_warnings():   # two points: no covariance, said in the note instead
        warnings.simplefilter("ignore", OptimizeWarning)
        (a, b), cov = curve_fit(lambda xx, a, b: a + b * (xx - x0), x, y, p0=[float(y.mean()), 0.0])
    xt = math.log(target_tokens) - x0
    yt = a + b * xt
    dof = len(pts) - 2
    if dof > 0 and np.all(np.isfinite(cov)):
        g = np.array([1.0, xt])
        se = math.sqrt(max(float(g @ cov @ g), 0.0))
        t = _t95(dof)
        lo, hi = math.exp(yt - t * se), math.exp(yt + t * se)
        b_se = math.sqrt(max(float(cov[1, 1]), 0.0))
        note = ""
    else:
        lo = hi = b_se = None
        note = "two horizons determine the line exactly: no confidence band (add a horizon)"
    return HorizonFit("power", len(pts), [float(a - b * x0), float(b)], float(b), b_se, math.exp(yt), lo, hi,
                      note=note)


def fit_loss_horizon(tokens: list[float], losses: list[float], target_tokens: float) -> HorizonFit:
    """loss = L∞ + A·(T/T0)^-α with scipy `curve_fit` (bounded trust-region, fixed start: deterministic)
    when four or more horizons allow it, else the log-log line of `fit_power_law`."""
    from scipy.optimize import curve_fit

    pts = sorted((t, v) for t, v in zip(tokens, losses) if v is not None and math.isfinite(v) and v > 0)
    if len(pts) < 4:
        fit = fit_power_law([t for t, _ in pts], [v for _, v in pts], target_tokens)
        if fit.kind == "power":
            fit.note = ("fewer than 4 horizons: log-log line instead of L∞ + A·T^-α. " + fit.note).strip()
        return fit
    t0 = pts[0][0]
    s = np.array([t / t0 for t, _ in pts])
    y = np.array([v for _, v in pts])

    def f(ss, l_inf, amp, alpha):
        return l_inf + amp * ss ** (-alpha)

    p0 = [0.5 * float(y.min()), float(y[0] - 0.5 * y.min()), 0.5]
    try:
        params, cov = curve_fit(f, s, y, p0=p0, bounds=([0.0, 0.0, 1e-3], [float(y.min()), np.inf, 5.0]),
                                method="trf", maxfev=20000)
    except (RuntimeError, ValueError) as err:
        fit = fit_power_law([t for t, _ in pts], [v for _, v in pts], target_tokens)
        fit.note = f"L∞ + A·T^-α did not converge ({err}); log-log line instead"
        return fit
    l_inf, amp, alpha = (float(p) for p in params)
    st = target_tokens / t0
    yt = f(st, l_inf, amp, alpha)
    dof = len(pts) - 3
    lo = hi = a_se = None
    if dof > 0 and np.all(np.isfinite(cov)):
        g = np.array([1.0, st ** (-alpha), -amp * st ** (-alpha) * math.log(st)])
        se = math.sqrt(max(float(g @ cov @ g), 0.0))
        t = _t95(dof)
        lo, hi = yt - t * se, yt + t * se
        a_se = math.sqrt(max(float(cov[2, 2]), 0.0))
    return HorizonFit("saturating", len(pts), [l_inf, amp, alpha, t0], alpha, a_se, yt, lo, hi, asymptote=l_inf)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation of paired values (scipy), None with fewer than three pairs or no spread:
    how far the ordering of trials at a short horizon predicts the ordering at a long one (Phi-4 §3)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho)


# ---- the warm-up stress test -----------------------------------------------------------------------------

@dataclass
class Instability:
    """What the metrics of one run show: the reasons it is unstable (empty = stable)."""

    stable: bool
    reasons: list[str]
    first_bad_step: int | None
    max_loss_ratio: float
    max_grad_ratio: float
    first_loss: float | None
    final_loss: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def detect_instability(records: list[dict], *, spike_factor: float, grad_factor: float, window: int,
                       min_history: int = 2, final_window: int = 3) -> Instability:
    """Read a run's step records (metrics.jsonl) for the failures a too-short warm-up or too-high LR
    causes early in training (Phi-4 §3 stress-tests exactly this stage):

    - a non-finite or skipped step (the trainer skips steps whose loss or gradient norm is not finite);
    - a loss spike: a loss above `spike_factor` × the median of the previous `window` losses;
    - a gradient-norm explosion: a norm above `grad_factor` × the median of the previous `window` norms;
    - divergence: the mean of the last `final_window` losses above the first step's loss.
    A running median (not a mean) is the reference so one earlier spike does not hide the next.
    """
    steps = [r for r in records if "loss" in r]
    reasons: list[str] = []
    bad: list[int] = []
    losses: list[float] = []
    norms: list[float] = []
    max_lr_ratio = max_g_ratio = 0.0
    for r in steps:
        loss, norm = float(r["loss"]), float(r.get("grad_norm", math.nan))
        if r.get("skipped") or not math.isfinite(loss) or ("grad_norm" in r and not math.isfinite(norm)):
            reasons.append(f"non-finite step {r['step']}")
            bad.append(r["step"])
            continue
        if len(losses) >= min_history:
            ref = median(losses[-window:])
            ratio = loss / ref if ref > 0 else math.inf
            max_lr_ratio = max(max_lr_ratio, ratio)
            if ratio > spike_factor:
                reasons.append(f"loss spike at step {r['step']} ({loss:.3g} = {ratio:.1f}x running median)")
                bad.append(r["step"])
        if len(norms) >= min_history and math.isfinite(norm):
            ref = median(norms[-window:])
            ratio = norm / ref if ref > 0 else math.inf
            max_g_ratio = max(max_g_ratio, ratio)
            if ratio > grad_factor:
                reasons.append(f"grad-norm explosion at step {r['step']} ({norm:.3g} = {ratio:.1f}x running median)")
                bad.append(r["step"])
        losses.append(loss)
        if math.isfinite(norm):
            norms.append(norm)
    first = losses[0] if losses else None
    final = float(np.mean(losses[-final_window:])) if losses else None
    if not losses:
        reasons.append("no finite step at all")
    elif len(losses) > final_window and final > first:
        reasons.append(f"diverged: final loss {final:.3g} above the initial {first:.3g}")
        bad.append(steps[-1]["step"])
    if len(reasons) > 6:   # the first few say enough; the rest are counted
        reasons = reasons[:5] + [f"and {len(reasons) - 5} more"]
    return Instability(not reasons, reasons, min(bad) if bad else None, max_lr_ratio, max_g_ratio, first, final)


def recommend_warmup(results: dict[int, list[bool]], margin: float) -> dict:
    """The shortest warm-up that is stable at every tested LR multiplier and stays stable for every longer
    warm-up tested (stability should only improve with a longer warm-up; a failure above the candidate
    means the candidate passed by luck), times `margin` (rounded up). `results`: warm-up steps -> stable
    flags of its runs."""
    ws = sorted(results)
    ok = [all(results[w]) for w in ws]
    shortest = None
    for i, w in enumerate(ws):
        if all(ok[i:]):
            shortest = w
            break
    if shortest is None:
        return {"shortest_stable": None, "recommended": None,
                "note": "no tested warm-up was stable at every LR multiplier: lengthen the warm-ups or lower the LR"}
    rec = max(shortest, math.ceil(shortest * margin))
    return {"shortest_stable": shortest, "recommended": rec,
            "note": f"shortest warm-up stable at every multiplier: {shortest} steps; x{margin:g} margin -> {rec}"}
