"""Training MFU of phi-1-small (350M) and phi-1 (1.3B) on one CUDA GPU, against the datasheet and a measured peak.

Each model trains on one fixed batch of random tokens (data loading is not measured) the way a
`phitrain train` stage with `precision: bf16, compile: true` on one GPU does: fp32 weights under bf16
autocast, phitrain's single-process engine (`parallel.make_engine` → `Engine.setup`, i.e. the fused AdamW
of `optim.build_optimizer`; `Engine.step`: gradient clipping at the recipe's 1.0, then the step), and
SDPA restricted to FlashAttention (`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`: an error, never a silent
fallback to another kernel). Dropout is off unless `--keep-dropout` (the presets train with 0.1).

`torch.compile` is applied per block, by `parallel.apply_block_options` — what the trainer's `compile: true`
does — rather than to the whole model: the number measured is then the one a training run gets, the
identical blocks share one compiled graph (one compilation, not one per layer), and it composes with
activation checkpointing and FSDP2's per-block units exactly as in training. Compiling the whole model
could also fuse the LM head's fp32 cast and cross-entropy, but that is not what the trainer runs.

After `--warmup` steps (compilation, allocator warm-up), `--steps` steps are timed one by one with
`torch.cuda.synchronize()`; the median step time gives tokens/s and MFU = flops_per_token(seq) x
tokens/s / peak (PaLM appendix B; `PhiModel.flops_per_token`: 6N + 12·layers·hidden·seq, model FLOPs, so
recomputation under `--checkpointing` is not counted as useful work). The peak is taken two ways: the
dense bf16 datasheet number for the device, and the best measured 8192³ bf16 matmul. Goals (datasheet
peak): phi-1-small >= 45% MFU, phi-1 >= 55%. Peak memory is `torch.cuda.max_memory_allocated` over the
timed steps. Prints a rich table, then one JSON line with all numbers.

    python benchmarks/gpu_mfu.py                                   # both models, micro-batch 8 and 4
    python benchmarks/gpu_mfu.py --models phi-1 --batch 8 --checkpointing
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from phitrain.config import ParallelConfig, StageConfig
from phitrain.errors import PhitrainError
from phitrain.model.phi import PhiModel
from phitrain.train import parallel
from phitrain.train.metrics import datasheet_tflops, measure_matmul_tflops
from phitrain.train.trainer import model_config

# Micro-batch per model for an 80+ GB GPU (sequence 2048, fp32 weights + AdamW, no checkpointing).
DEFAULT_BATCH = {"phi-1-small": 8, "phi-1": 4}
GOALS = {"phi-1-small": 0.45, "phi-1": 0.55}          # MFU against the datasheet peak
NO_DROPOUT = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
MATMUL_N = 8192


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(DEFAULT_BATCH), default=list(DEFAULT_BATCH))
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch for every model (default: " +
                        ", ".join(f"{m} {b}" for m, b in DEFAULT_BATCH.items()) + ")")
    p.add_argument("--no-compile", action="store_true", help="eager blocks instead of torch.compile per block")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--keep-dropout", action="store_true", help="keep the presets' dropout (0.1) instead of 0")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first step compiles)")
    return args


def stage_for(name: str, args) -> StageConfig:
    """The benchmark as a one-GPU training stage (the data section is required by the schema, never read)."""
    batch = args.batch or DEFAULT_BATCH[name]
    return StageConfig.model_validate(dict(
        name=f"mfu-{name}", model=name, model_overrides={} if args.keep_dropout else NO_DROPOUT,
        data={"data_dir": "unused", "sources": [{"path": "random-tokens", "weight": 1.0}]},
        seq_len=args.seq, global_batch_size=batch, micro_batch_size=batch, max_steps=args.warmup + args.steps,
        precision="bf16", compile=not args.no_compile, activation_checkpointing=args.checkpointing))


def require_flash(stage: StageConfig) -> None:
    """Exit with the reason if FlashAttention cannot run forward + backward for this model's heads."""
    cfg = model_config(stage, None, None)
    q = torch.randn(stage.micro_batch_size, cfg.num_heads, stage.seq_len, cfg.head_dim, device="cuda",
                    dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as err:
        sys.exit(f"error: FlashAttention is unavailable on {torch.cuda.get_device_name()} for bf16 heads of dim "
                 f"{cfg.head_dim}: {str(err).splitlines()[0]}")


def bench_model(stage: StageConfig, args) -> dict:
    """Median step time, tokens/s, achieved TFLOP/s and peak memory of one model's training step."""
    device = torch.device("cuda")
    cfg = model_config(stage, None, None)
    torch.manual_seed(0)
    with device:
        model = PhiModel(cfg)   # fp32 weights, initialised on the GPU
    parallel.apply_block_options(model, stage, device)
    engine = parallel.make_engine(stage, ParallelConfig(), parallel.Dist(), stage.precision, device)
    engine.setup(model)
    assert engine.optimizer.defaults["fused"], "build_optimizer did not give the fused AdamW on CUDA"
    scaler = torch.amp.GradScaler("cuda", enabled=False)   # bf16 needs no loss scaling
    ids = torch.randint(0, cfg.vocab_size, (stage.micro_batch_size, stage.seq_len + 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = engine.module(inputs, targets)
        engine.backward(loss)
        engine.step(scaler, stage.optim.grad_clip, finite_loss=True)
        return loss

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss = step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = stage.micro_batch_size * stage.seq_len / median
    flops_per_token = model.flops_per_token(stage.seq_len)
    return {"params": model.num_params(), "batch": stage.micro_batch_size, "seq": stage.seq_len,
            "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
            "achieved_tflops": flops_per_token * tokens_per_s / 1e12,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "last_loss": float(loss)}


def main(argv=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_mfu.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    try:
        stages = {name: stage_for(name, args) for name in args.models}
        for stage in stages.values():
            model_config(stage, None, None)   # e.g. --seq beyond the model's context: an error now
    except (PhitrainError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    device_name = torch.cuda.get_device_name()
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)   # a pipe or file gets the whole table, not ellipses
    sheet = datasheet_tflops(device_name, "bf16")
    measured = measure_matmul_tflops(torch.device("cuda"), torch.bfloat16, n=MATMUL_N)
    console.print(f"[bold]gpu_mfu[/]: {device_name}, torch {torch.__version__}; bf16 peak: datasheet "
                  f"{f'{sheet:g} TFLOP/s' if sheet else 'unknown'}, measured {MATMUL_N}³ matmul {measured:,.0f} "
                  f"TFLOP/s; compile {'off' if args.no_compile else 'per block'}, activation checkpointing "
                  f"{'on' if args.checkpointing else 'off'}, dropout {'kept' if args.keep_dropout else 'off'}, "
                  f"median of {args.steps} steps after {args.warmup} warm-up")

    results = {}
    for name, stage in stages.items():
        require_flash(stage)
        console.print(f"{name}: micro-batch {stage.micro_batch_size} x {stage.seq_len} ...")
        try:
            r = bench_model(stage, args)
        except torch.cuda.OutOfMemoryError:
            r = {"batch": stage.micro_batch_size, "seq": stage.seq_len,
                 "error": "out of memory: lower --batch or add --checkpointing"}
        gc.collect()
        torch.cuda.empty_cache()
        torch.compiler.reset()   # the next model's blocks have other shapes
        if "error" not in r:
            r["mfu_datasheet"] = r["achieved_tflops"] / sheet if sheet else None
            r["mfu_measured"] = r["achieved_tflops"] / measured
        r["goal_mfu"] = GOALS[name]
        # unknown without a datasheet peak; a run that did not fit did not meet it
        r["meets_goal"] = None if sheet is None else ("error" not in r and r["mfu_datasheet"] >= GOALS[name])
        results[name] = r

    table = Table(title=f"training MFU on one {device_name} (bf16 autocast, FlashAttention, fused AdamW)")
    for col in ("model", "params", "batch x seq", "step s (median)", "tokens/s", "TFLOP/s", "MFU datasheet",
                "MFU measured", "goal", "peak mem GB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        shape = f"{r['batch']} x {r['seq']}"
        if "error" in r:
            table.add_row(name, "", shape, f"[red]{r['error']}[/]", "", "", "", "", f">= {GOALS[name]:.0%}", "")
            continue
        verdict = "n/a" if r["meets_goal"] is None else ("[green]pass[/]" if r["meets_goal"] else "[red]FAIL[/]")
        table.add_row(name, f"{r['params'] / 1e6:,.0f}M", shape, f"{r['step_s_median']:.3f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['achieved_tflops']:,.0f}",
                      "unknown GPU" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.1%}",
                      f"{r['mfu_measured']:.1%}", f">= {GOALS[name]:.0%} {verdict}", f"{r['peak_mem_gb']:.1f}")
    console.print(table)
    verdicts = [r["meets_goal"] for r in results.values()]
    record = {"benchmark": "gpu_mfu", "device": device_name, "torch": torch.__version__,
              "config": vars(args),
              "peak_tflops_datasheet": sheet, "peak_tflops_measured": round(measured, 1),
              "models": {name: {k: round(v, 6) if isinstance(v, float) and math.isfinite(v) else v
                                for k, v in r.items()} for name, r in results.items()},
              "meets_goals": None if None in verdicts else all(verdicts)}
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
