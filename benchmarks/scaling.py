"""Data-parallel scaling on this machine: 1 process x 2 threads against 2 processes x 1 thread, per strategy.

Each configuration runs the same short recipe (`phitrain train`, fp32, same global batch) as a subprocess —
one plain process with OMP_NUM_THREADS=2, or `torchrun --standalone --nproc_per_node=2` with one thread
per rank — and reports the trainer's own steady-state tokens/s (summary.json; the first step, which pays
allocator warm-up, is excluded). Prints a table, then one JSON line last.

What limits scaling here: both layouts use the same 2 cores, so the best 2 x 1 can do is match 1 x 2's
compute (threads inside one matmul vs one process per core); on top of that DDP adds a gloo all-reduce
of every gradient through the kernel's TCP loopback per step, FSDP2 an all-gather of each block's
parameters in forward and backward plus a reduce-scatter of gradients, and DeepSpeed ZeRO its partitioned
reductions (with its shared-memory CPU collective) — none of which overlaps with compute when there is no
spare core. On a real multi-GPU node the ranks do not share compute, and NCCL over NVLink hides most of
the communication behind backward.

    python benchmarks/scaling.py                      # default: phi-1-tiny shape, seq 128, 12 steps
    python benchmarks/scaling.py --strategies ddp fsdp --steps 20
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

LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}


def prepare_data(out: Path, vocab: int) -> None:
    from phitrain.config import DataRecipe
    from phitrain.data.pipeline import prepare

    prepare(DataRecipe.model_validate({
        "sources": [{"name": "stdlib", "kind": "stdlib", "max_files": 80}],
        "dedup": {"near": False}, "quality": {"enabled": False}, "decontam": {"enabled": False},
        "exercises": {"enabled": False}, "tokenizer": {"vocab_size": vocab},
        "shards": {"workers": 1, "val_fraction": 0.05},
    }), out, progress=False)


def write_recipe(path: Path, data_dir: Path, args) -> None:
    stage = dict(name="pretrain", model=args.preset,
                 model_overrides={"vocab_size": args.vocab, "attn_pdrop": 0.0, "resid_pdrop": 0.0},
                 data={"data_dir": str(data_dir), "sources": [{"path": "stdlib", "weight": 1.0}]},
                 seq_len=args.seq_len, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                 max_steps=args.steps, precision="fp32", eval_windows=2, optim={"lr": 1e-3, "warmup_steps": 2},
                 peak_tflops=1.0)
    path.write_text(yaml.safe_dump({"name": "scaling", "device": "cpu", "stages": [stage]}))


def run(recipe: Path, run_dir: Path, strategy: str, nproc: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    launcher = [sys.executable, "-m", "phitrain"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "phitrain"]
    cmd = [*launcher, "train", str(recipe), "--run-dir", str(run_dir), "--set", f"parallel.strategy={strategy}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200], "wall_s": wall}
    summary = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    return {"tokens_per_s": summary["tokens_per_s"], "final_loss": summary["final_loss"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", nargs="+", default=["none", "ddp", "fsdp", "deepspeed"],
                   choices=["none", "ddp", "fsdp", "deepspeed"])
    p.add_argument("--preset", default="phi-1-tiny")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="phitrain-scaling-") as tmp:
        tmp = Path(tmp)
        prepare_data(tmp / "data", args.vocab)
        recipe = tmp / "recipe.yaml"
        write_recipe(recipe, tmp / "data", args)
        for strategy in args.strategies:
            # `none` is the single-process reference (1 x 1 shows what the second thread adds); ddp on one
            # process is the same as none
            layouts = ["1x1", "1x2"] if strategy == "none" else (["2x1"] if strategy == "ddp" else ["1x2", "2x1"])
            for layout in layouts:
                nproc, threads = LAYOUTS[layout]
                load = os.getloadavg()[0]  # other work on the machine skews every number below
                result = run(recipe, tmp / f"{strategy}-{layout}", strategy, nproc, threads)
                rows.append({"strategy": strategy, "layout": layout, "processes": nproc,
                             "threads_per_process": threads, "load_before": round(load, 2), **result})
                print(f"{strategy:>9} {layout}: {result}", file=sys.stderr, flush=True)

    reference = next((r.get("tokens_per_s") for r in rows if r["strategy"] == "none" and r["layout"] == "1x2"), None)
    for r in rows:
        if reference and r.get("tokens_per_s"):
            r["vs_1x2_none"] = r["tokens_per_s"] / reference

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data-parallel scaling on {os.cpu_count()} CPU cores: {args.preset}, seq {args.seq_len}, "
                        f"global batch {args.global_batch}, fp32")
    for col in ("strategy", "processes x threads", "tokens/s", "vs 1x2 none", "final loss", "wall (s)", "load"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["strategy"], f"{r['processes']} x {r['threads_per_process']}",
                      f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else f"error: {r['error']}",
                      f"{r['vs_1x2_none']:.2f}x" if "vs_1x2_none" in r else "—",
                      f"{r['final_loss']:.4f}" if "final_loss" in r else "—", f"{r['wall_s']:.0f}",
                      f"{r['load_before']:.1f}")
    console = Console()
    console.print(table)
    console.print("Limits here: both layouts share the same cores, every gradient all-reduce / all-gather goes "
                  "through gloo over loopback TCP with no spare core to overlap it, and when other processes "
                  "load the machine (load column) OpenMP threads of one process wait on each other, which "
                  "penalises the x 2-thread layouts most.")
    print(json.dumps({"benchmark": "scaling", "preset": args.preset, "seq_len": args.seq_len,
                      "global_batch": args.global_batch, "steps": args.steps, "cpu_count": os.cpu_count(),
                      "results": rows}))


if __name__ == "__main__":
    main()
