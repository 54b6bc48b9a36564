"""Peak memory per rank: one process vs FSDP2 over 2 ranks, and phi-4's per-rank bytes when sharded.

1. Trains phi-1-small (357M parameters, fp32 master weights, AdamW) for `--steps` steps on CPU with a short
   sequence, once as one process (`parallel.strategy=none`) and once under torchrun with 2 ranks
   (`parallel.strategy=fsdp`), on a small corpus prepared from the standard library. The trainer records
   each rank's peak RSS (`getrusage` maxrss) after the build, after the first step and after the last
   save, and the parameter bytes each rank holds (`summary.json`: `peak_rss_mb`, `build`). Goal: each FSDP
   rank's peak <= 0.6x the single process's. FSDP runs with `parallel.return_freed_memory` on (its
   default: freed tensors >= 1 MB go back to the OS); a third run shows the single process with the same
   setting, so the ratio is also given against it.
2. Phi-4 (14.7B parameters): the model is built on the meta device and the per-rank bytes of a 2-way
   FSDP2 shard are computed from the parameter shapes (parameters + AdamW moments + gradients in fp32:
   16 bytes per parameter, divided over the ranks), against one process's — building it for real would
   need ~59 GB per copy of the weights alone.

Prints a table, then one JSON line.

    python benchmarks/memory.py [--steps 3] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GOAL = 0.6


def prepare_data(root: Path) -> Path:
    from phitrain.config import DataRecipe
    from phitrain.data import prepare

    out = root / "data"
    prepare(DataRecipe.model_validate({
        "sources": [{"name": "code", "kind": "stdlib", "max_files": 60}],
        "quality": {"enabled": False}, "decontam": {"enabled": False}, "exercises": {"enabled": False},
        "tokenizer": {"vocab_size": 2048}, "shards": {"val_fraction": 0.05}, "executor": {"workers": 1}}),
        out, progress=False)
    return out


def write_recipe(root: Path, data: Path, args) -> Path:
    stage = dict(name="pretrain", model="phi-1-small",
                 data={"data_dir": str(data), "sources": [{"path": "code", "weight": 1.0}]},
                 seq_len=args.seq_len, global_batch_size=2, micro_batch_size=1, max_steps=args.steps,
                 precision="fp32", eval_windows=2, save_every=args.steps, keep_last=1,
                 optim={"lr": 1e-4, "warmup_steps": 1})
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "memory", "device": "cpu", "stages": [stage]}))
    return path


def run(recipe: Path, run_dir: Path, nproc: int, strategy: str, release: bool | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    launcher = [sys.executable, "-m", "phitrain"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "phitrain"]
    t = time.time()
    sets = ["--set", f"parallel.strategy={strategy}"]
    if release is not None:
        sets += ["--set", f"parallel.return_freed_memory={str(release).lower()}"]
    proc = subprocess.run([*launcher, "train", str(recipe), "--run-dir", str(run_dir), *sets], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {strategy} x{nproc} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    label = f"{strategy} x{nproc}" + ("" if release is None else f" release={str(release).lower()}")
    return {"label": label, "strategy": strategy, "ranks": nproc, "seconds": round(time.time() - t, 1),
            "peak_rss_mb": summary["peak_rss_mb"], "build": summary["build"], "params": summary["params"]}


def phi4_bytes(world: int) -> dict:
    import torch

    from phitrain.model.phi import PhiModel
    from phitrain.model.presets import get_preset

    with torch.device("meta"):
        model = PhiModel(get_preset("phi-4"))
    params = sum(p.numel() for p in model.parameters())
    # FSDP2 shards every parameter on dim 0 over the ranks (padded to a multiple of the world size)
    local = sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) for p in model.parameters())
    return {"params": params, "train_state_gb_one_process": round(16 * params / 1e9, 1),
            f"train_state_gb_per_rank_{world}": round(16 * local / 1e9, 1),
            "ratio": round(local / params, 4)}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = write_recipe(root, prepare_data(root), args)
        one = run(recipe, root / "one", 1, "none")
        # the single process with the allocator setting FSDP gets by default, to show it is not what
        # makes the difference
        one_released = run(recipe, root / "one-released", 1, "none", release=True)
        two = run(recipe, root / "fsdp", 2, "fsdp")
    phases = ("build", "first_step", "save")
    print(f"{'run':<28}{'rank':>5}" + "".join(f"{ph + ' MB':>15}" for ph in phases) + f"{'param MB held':>15}")
    for r in (one, one_released, two):
        for rank, (rss, build) in enumerate(zip(r["peak_rss_mb"], r["build"])):
            print(f"{r['label']:<28}{rank:>5}" +
                  "".join(f"{rss.get(ph, float('nan')):>15,.0f}" for ph in phases) +
                  f"{build['local_param_bytes'] / 2**20:>15,.0f}")
    single_peak = max(one["peak_rss_mb"][0].values())
    ratios = [max(r.values()) / single_peak for r in two["peak_rss_mb"]]
    released_peak = max(one_released["peak_rss_mb"][0].values())
    phi4 = phi4_bytes(2)
    print(f"phi-1-small ({one['params']:,} params): FSDP2 rank peak / single-process peak = "
          f"{', '.join(f'{x:.2f}' for x in ratios)} (goal <= {GOAL}); against the single process with the "
          f"same allocator setting: {', '.join(f'{max(r.values()) / released_peak:.2f}' for r in two['peak_rss_mb'])}")
    print(f"phi-4 ({phi4['params']:,} params): fp32 weights + grads + AdamW = {phi4['train_state_gb_one_process']} GB "
          f"in one process, {phi4['train_state_gb_per_rank_2']} GB per rank with 2-way FSDP2")
    result = {"benchmark": "memory", "single": one, "single_released": one_released, "fsdp2": two,
              "rank_peak_ratio": [round(x, 3) for x in ratios],
              "rank_peak_ratio_vs_released": [round(max(r.values()) / released_peak, 3) for r in two["peak_rss_mb"]],
              "goal": GOAL, "meets_goal": all(x <= GOAL for x in ratios), "phi4": phi4}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
