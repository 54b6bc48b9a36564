"""AdamW with parameter groups, and the learning-rate schedules of the phi papers.

Weight decay applies to the projection matrices only. Not decayed:
- biases and LayerNorm/RMSNorm weights: they set offsets and scales, not feature directions; shrinking
  them towards 0 fights the normalisation rather than regularising (GPT-2/nanoGPT/litgpt practice);
- the token embedding: a row only receives gradient when its token occurs, but decay shrinks every row
  every step, so rare tokens' embeddings would decay towards zero between occurrences.
The lm_head matrix is a projection and is decayed.
"""

from __future__ import annotations

import math

import torch

from phitrain.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name.split(".")[0] or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per tensor doing the whole update in one pass over its state, on CUDA
    and on CPU alike): ~8% of a phi-1-tiny CPU step less than foreach (benchmarks/model_speed.py)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True,
    )


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based).

    Warmup rises linearly to 1 at step `warmup_steps`; then `linear` falls linearly to `min_lr_ratio` at
    `max_steps` (phi-1 §2.3, Phi-4 §3), `cosine` follows a half cosine to the same floor, and `wsd` holds 1
    until the last `wsd_decay_fraction` of steps and then falls linearly.
    """
    floor = cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if cfg.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = 1.0 - cfg.wsd_decay_fraction
    if progress <= decay_start:
        return 1.0
    return floor + (1.0 - floor) * (1.0 - (progress - decay_start) / cfg.wsd_decay_fraction)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
