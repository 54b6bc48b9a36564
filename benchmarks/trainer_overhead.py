"""The full trainer's tokens/s against a bare loop doing the same model steps (target: >= 95%).

Both sides train the same preset on the same prepared windows with the same micro-batch, accumulation,
precision and AdamW; the bare loop is forward/backward/clip/step and nothing else. The trainer adds what
a real run needs: the loader's bookkeeping, loss all-reduce, grad-norm logging, metrics.jsonl, the
progress line, spike tracking. Runs alternate (bare, trainer, bare, trainer, ...) to cancel machine noise;
the first step of each run is excluded (allocator warm-up). Prints a table, then one JSON line.

    python benchmarks/trainer_overhead.py [--steps 30] [--reps 2] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from phitrain.config import DataRecipe, RecipeConfig, load_yaml
from phitrain.data.pipeline import prepare
from phitrain.data.windows import WindowLoader
from phitrain.model.phi import PhiModel
from phitrain.tokenizer import load_tokenizer
from phitrain.train.optim import build_optimizer
from phitrain.train.recipe import run_recipe
from phitrain.train.trainer import resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def recipe(data_dir: Path, vocab: int, steps: int, precision: str) -> RecipeConfig:
    return RecipeConfig.model_validate(dict(name="overhead", device="cpu", tokenizer=str(data_dir / "tokenizer"), stages=[dict(
        name="pretrain", model="phi-1-tiny", model_overrides={"vocab_size": vocab},
        data={"data_dir": str(data_dir), "sources": [{"path": "stdlib", "weight": 1.0}]},
        seq_len=256, global_batch_size=16, micro_batch_size=8, max_steps=steps, precision=precision,
        eval_windows=1, optim={"lr": 1e-3, "warmup_steps": 2})]))


def bare_loop(cfg: RecipeConfig) -> float:
    stage = cfg.stages[0]
    torch.manual_seed(stage.seed)
    from phitrain.model.presets import get_preset

    model = PhiModel(get_preset(stage.model, **stage.model_overrides))
    precision = resolve_precision(stage.precision, torch.device("cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    opt = build_optimizer(model, stage.optim)
    loader = WindowLoader(stage.data, stage.seq_len, stage.micro_batch_size)
    accum = stage.grad_accum_steps()
    times = []
    for _ in range(stage.max_steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            x, y = next(loader)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), stage.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return stage.tokens_per_step * (len(times) - 1) / sum(times[1:])


def trainer(cfg: RecipeConfig) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        (summary,) = run_recipe(cfg, run_dir)
    return summary.tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--data-dir", default=None, help="a prepared stdlib data dir (default: prepare 120 files)")
    args = ap.parse_args()

    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="overhead-data-"))
        data = load_yaml(DataRecipe, ROOT / "recipes" / "data-stdlib.yaml", ["sources.0.max_files=120"])
        prepare(data, data_dir, progress=False)
    vocab = load_tokenizer(data_dir / "tokenizer").padded_vocab_size(64)
    cfg = recipe(data_dir, vocab, args.steps, args.precision)

    bare, full = [], []
    for _ in range(args.reps):
        bare.append(bare_loop(cfg))
        full.append(trainer(cfg))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"trainer overhead: phi-1-tiny, 16x256 tokens/step, {args.steps} steps, best of {args.reps}")
    for col in ("side", "tokens/s (best)", "runs"):
        table.add_column(col)
    table.add_row("bare loop", f"{max(bare):,.0f}", ", ".join(f"{x:,.0f}" for x in bare))
    table.add_row("phitrain trainer", f"{max(full):,.0f}", ", ".join(f"{x:,.0f}" for x in full))
    ratio = max(full) / max(bare)
    table.add_row("ratio", f"{ratio:.3f}", "target >= 0.95")
    Console(width=120).print(table)
    print(json.dumps({"benchmark": "trainer_overhead", "steps": args.steps, "bare_tokens_per_s": bare,
                      "trainer_tokens_per_s": full, "ratio_best": round(ratio, 4),
                      "precision": resolve_precision(args.precision, torch.device("cpu")),
                      "threads": torch.get_num_threads()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
