"""phitrain vs transformers on the same config, weights and thread count: training and generation speed.

Measures, side by side in one process:
- training step tokens/s (forward + backward + AdamW step, batch 8 x 256 by default) in fp32 and in
  bf16 autocast;
- greedy generation tokens/s with a KV cache (batch 1, 128 new tokens after a 32-token prompt;
  transformers with its default cache).

The transformers model is loaded from phitrain's own HF export, so both hold the same weights; the
greedy token ids of the two are compared as a sanity check. Repetitions alternate between the two (and
swap which goes first) so that machine noise, such as other processes on a shared CPU, hits both alike;
the table reports the best repetition of each (noise only ever adds time, as `timeit` argues) and the
JSON line also carries the medians. Prints a rich table, then one JSON line with all numbers and ratios.

    python benchmarks/model_speed.py                      # parallel block, hidden 256, 6 layers, vocab 4096
    python benchmarks/model_speed.py --block sequential --kv-heads 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", choices=["parallel", "sequential"], default="parallel")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: = heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4x hidden, 3x for sequential)")
    p.add_argument("--rotary-dim", type=int, default=None, help="default: half the head (parallel), all of it (sequential)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per repetition")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--skip", nargs="*", default=[], choices=["fp32", "bf16", "generate"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_models(args):
    """(phitrain model, transformers model) with identical weights, via phitrain's HF export."""
    import transformers

    from phitrain.checkpoint import save_checkpoint
    from phitrain.config import ModelConfig
    from phitrain.interop.hf import export_hf
    from phitrain.model.phi import PhiModel

    head_dim = args.hidden // args.heads
    rotary = args.rotary_dim or (head_dim // 2 if args.block == "parallel" else head_dim)
    inter = args.intermediate or (4 * args.hidden if args.block == "parallel" else 3 * args.hidden)
    cfg = ModelConfig(name="bench", block=args.block, vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=inter, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, rotary_dim=rotary,
                      max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens))
    torch.manual_seed(args.seed)
    ours = PhiModel(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", ours)
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf")
    return ours.to(args.device), theirs.to(args.device), cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_train_step(model, is_hf: bool, batch, autocast):
    ids, targets = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        with autocast():
            # transformers shifts `labels` itself; phitrain takes already-shifted targets. Same work.
            loss = model(input_ids=ids, labels=ids).loss if is_hf else model(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_alternating(fns: dict, reps: int, inner: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each fn, `reps` times, alternating fns and swapping who goes first."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def bench_training(ours, theirs, cfg, args, precision: str) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(args.device)
    x, y = ids[:, :-1], ids[:, 1:]
    dev_type = "cuda" if args.device.startswith("cuda") else "cpu"
    if precision == "bf16":
        def autocast():
            return torch.autocast(dev_type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    ours.train()
    theirs.train()
    steps = {"phitrain": make_train_step(ours, False, (x, y), autocast),
             "transformers": make_train_step(theirs, True, (x, None), autocast)}
    for fn in steps.values():  # warm-up: allocator, optimizer state, kernels
        fn()
    times = time_alternating(steps, args.reps, args.train_steps, args.device)
    tokens = args.batch * args.seq
    return {name: (tokens / min(t), tokens / statistics.median(t)) for name, t in times.items()}


def bench_generation(ours, theirs, cfg, args) -> dict:
    from phitrain.model.generate import generate

    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
    ours.eval()
    theirs.eval()
    results = {}

    def run_ours():
        results["phitrain"] = generate(ours, prompt.tolist(), args.new_tokens)[0]

    def run_theirs():
        with torch.no_grad():
            out = theirs.generate(prompt.to(args.device), attention_mask=torch.ones_like(prompt).to(args.device),
                                  do_sample=False, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
        results["transformers"] = out[0, args.prompt_len:].tolist()

    fns = {"phitrain": run_ours, "transformers": run_theirs}
    for fn in fns.values():
        fn()
    times = time_alternating(fns, args.reps, 1, args.device)
    speeds = {name: (args.new_tokens / min(t), args.new_tokens / statistics.median(t)) for name, t in times.items()}
    speeds["same_tokens"] = results["phitrain"] == results["transformers"]
    return speeds


def main(argv=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    ours, theirs, cfg = build_models(args)
    n_params = sum(p.numel() for p in ours.parameters())
    console = Console(stderr=False)
    console.print(f"[bold]model_speed[/]: {cfg.block} block, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
                  f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; "
                  f"device {args.device}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
                  f"transformers {transformers.__version__}; best of {args.reps} alternating reps")

    rows = {}
    # generation first: training steps change the weights, slightly differently in the two models
    if "generate" not in args.skip:
        console.print("greedy generation with KV cache ...")
        rows["generate"] = bench_generation(ours, theirs, cfg, args)
    for precision in ("fp32", "bf16"):
        if precision not in args.skip:
            console.print(f"training step, {precision} ...")
            rows[f"train_{precision}"] = bench_training(ours, theirs, cfg, args, precision)

    targets = {"train_fp32": 1.0, "train_bf16": 1.5, "generate": 2.0}
    labels = {"train_fp32": f"train step fp32 (batch {args.batch}x{args.seq})",
              "train_bf16": f"train step bf16 autocast (batch {args.batch}x{args.seq})",
              "generate": f"greedy generate, KV cache ({args.prompt_len}+{args.new_tokens} tokens)"}
    table = Table(title="phitrain vs transformers: tokens/s (higher is better)")
    for col in ("measurement", "phitrain", "transformers", "ratio", "target"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    record = {"config": {k: v for k, v in vars(args).items() if k != "skip"}, "params": n_params,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads()}
    for key, r in rows.items():
        (ours_best, ours_median), (theirs_best, theirs_median) = r["phitrain"], r["transformers"]
        ratio = ours_best / theirs_best
        ok = ratio >= targets[key]
        table.add_row(labels[key], f"{ours_best:,.0f}", f"{theirs_best:,.0f}",
                      f"[{'green' if ok else 'red'}]{ratio:.2f}x[/]", f">= {targets[key]:.1f}x")
        record[key] = {"phitrain_tok_s": round(ours_best, 1), "transformers_tok_s": round(theirs_best, 1),
                       "ratio": round(ratio, 3), "target": targets[key], "meets_target": ok,
                       "phitrain_median_tok_s": round(ours_median, 1),
                       "transformers_median_tok_s": round(theirs_median, 1),
                       "median_ratio": round(ours_median / theirs_median, 3)}
        if "same_tokens" in r:
            record[key]["same_tokens"] = r["same_tokens"]
    console.print(table)
    if "generate" in rows and not rows["generate"]["same_tokens"]:
        console.print("[red]warning: greedy tokens differ between phitrain and transformers[/]")
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
