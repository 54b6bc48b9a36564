"""phitrain vs transformers vs litgpt on the same config, weights and thread count: training and generation.

Measures, side by side in one process, each framework eager and compiled (`torch.compile`):
- training step tokens/s (forward + backward + AdamW step) in bf16 autocast at batch 8x256 and 4x1024,
  and in fp32 at 8x256;
- greedy generation tokens/s with a KV cache, 128 new tokens after a 32-token prompt, batch 1 and 8.

Each side runs as its own users would run it on this device:
- phitrain: `PhiModel(ids, targets)` (the loss fused with the vocabulary projection), the trainer's
  optimizer (`train.optim.build_optimizer`) and, compiled, what `compile: true` applies
  (`train.parallel.compile_blocks`); generation through `generate`, compiled with `compile=True`.
- transformers: `AutoModelForCausalLM`-equivalent `PhiForCausalLM`/`Phi3ForCausalLM` with `labels`
  (it shifts them itself) and `torch.optim.AdamW` (what its Trainer's default `adamw_torch` builds on a
  CPU), compiled as a whole with `torch.compile(model)`; `generate()` with its default dynamic cache, and
  compiled the way its docs show: a static cache and `torch.compile(model.forward)`.
- litgpt: `GPT` with its own `chunked_cross_entropy` and `torch.optim.AdamW` (its pretrain script fuses
  AdamW on CUDA only), compiled with `torch.compile(model)`; `generate` (batch 1) and
  `batched_generate_fn` (batch 8), compiled as its generate script does (`next_token` compiled).
All three hold the same weights: phitrain's, renamed (litgpt's fused qkv has phitrain's [q; k; v] layout;
transformers gets split q/k/v through phitrain's own export), and the greedy tokens of all are compared.

On CPU the process keeps freed memory for reuse (`--freed-memory keep`, the default), as phitrain's
trainer does: one setting for the whole process, so every framework gets it (without it each of them
takes thousands of page faults a step; `--freed-memory default` measures glibc's own behaviour).

Repetitions alternate over every (framework, mode) and swap direction each round, so machine noise such
as other processes on a shared CPU hits all alike; each framework is reported at its best mode, by the
median over repetitions, and the ratio is phitrain's over the best other framework. Prints a rich table,
then one JSON line with every number.

    python benchmarks/model_speed.py                        # phi-1-tiny shapes: hidden 256, 6 layers, vocab 4096
    python benchmarks/model_speed.py --peers transformers --modes eager --reps 3
    python benchmarks/model_speed.py --block sequential --kv-heads 2

litgpt pins huggingface-hub<1.4, which transformers 5 refuses; install it beside them with
`pip install litgpt && pip install "huggingface-hub>=1.31"` (litgpt's model and generation code do not
use the hub).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from contextlib import nullcontext

import torch

TRAIN_SHAPES = {"train_bf16_8x256": ("bf16", 8, 256), "train_bf16_4x1024": ("bf16", 4, 1024),
                "train_fp32_8x256": ("fp32", 8, 256)}
GENERATE_BATCHES = {"generate_b1": 1, "generate_b8": 8}
TARGETS = {"train_bf16_8x256": 1.3, "train_bf16_4x1024": 1.3, "train_fp32_8x256": 1.2,
           "generate_b1": 2.0, "generate_b8": 2.0}


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
    p.add_argument("--measure", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--peers", nargs="*", default=["transformers", "litgpt"], choices=["transformers", "litgpt"])
    p.add_argument("--modes", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per repetition")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--freed-memory", choices=["keep", "default"], default="keep",
                   help="what the C library does with freed tensors, for the whole process and so for every "
                        "framework: keep them for reuse, as phitrain's trainer sets it on CPU "
                        "(train.parallel.set_freed_memory_policy), or glibc's default")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- three models, one set of weights ------------------------------------------------------------

def phitrain_model(args):
    from phitrain.config import ModelConfig
    from phitrain.model.phi import PhiModel

    head_dim = args.hidden // args.heads
    rotary = args.rotary_dim or (head_dim // 2 if args.block == "parallel" else head_dim)
    inter = args.intermediate or (4 * args.hidden if args.block == "parallel" else 3 * args.hidden)
    longest = max([args.prompt_len + args.new_tokens] + [seq for _, _, seq in TRAIN_SHAPES.values()])
    cfg = ModelConfig(name="bench", block=args.block, vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=inter, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, rotary_dim=rotary, max_position_embeddings=longest)
    torch.manual_seed(args.seed)
    return PhiModel(cfg)


def transformers_model(ours):
    import transformers

    from phitrain.interop.hf import to_hf_config, to_hf_state_dict

    hf_cfg = to_hf_config(ours.config)
    config_class = transformers.PhiConfig if ours.config.block == "parallel" else transformers.Phi3Config
    model_class = transformers.PhiForCausalLM if ours.config.block == "parallel" else transformers.Phi3ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model_class(config_class(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), ours.config), strict=True)
    return theirs


def litgpt_model(ours):
    """litgpt's GPT for the same config and weights (phitrain names → litgpt names)."""
    from litgpt.config import Config
    from litgpt.model import GPT

    cfg = ours.config
    parallel = cfg.block == "parallel"
    lit_cfg = Config(
        name="bench", block_size=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_embd=cfg.hidden_size,
        n_query_groups=cfg.num_kv_heads, head_size=cfg.head_dim, rotary_percentage=cfg.rotary_dim / cfg.head_dim,
        rope_base=int(cfg.rope_theta), intermediate_size=cfg.intermediate_size, norm_eps=cfg.norm_eps,
        bias=parallel, lm_head_bias=parallel, parallel_residual=parallel, shared_attention_norm=parallel,
        norm_class_name="LayerNorm" if parallel else "RMSNorm", gelu_approximate="tanh",
        mlp_class_name="GptNeoxMLP" if parallel else "LLaMAMLP")
    theirs = GPT(lit_cfg)
    names = {"embed.weight": "transformer.wte.weight", "final_norm": "transformer.ln_f", "lm_head": "lm_head"}
    per_block = ({"norm": "norm_1", "attn.qkv": "attn.qkv", "attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc",
                  "mlp.fc2": "mlp.proj"} if parallel else
                 {"attn_norm": "norm_1", "mlp_norm": "norm_2", "attn.qkv": "attn.qkv", "attn.out_proj": "attn.proj",
                  "mlp.down": "mlp.proj"})
    state = {}
    for name, tensor in ours.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            if module == "mlp.gate_up":   # phitrain fuses gate and up (gate first); litgpt keeps fc_1, fc_2
                gate, up = tensor.chunk(2, dim=0)
                state[f"transformer.h.{i}.mlp.fc_1.{leaf}"] = gate
                state[f"transformer.h.{i}.mlp.fc_2.{leaf}"] = up
                continue
            state[f"transformer.h.{i}.{per_block[module]}.{leaf}"] = tensor
        else:
            module, leaf = name.rsplit(".", 1)
            state[names.get(name) or f"{names[module]}.{leaf}"] = tensor
    theirs.load_state_dict(state, strict=True)
    return theirs


# ---- training steps ------------------------------------------------------------------------------

def train_step_fn(framework: str, model, compiled: bool, batch, precision: str, device: str):
    """A callable doing one forward + backward + optimizer step, as `framework`'s users run it."""
    from phitrain.config import OptimConfig
    from phitrain.train.optim import build_optimizer
    from phitrain.train.parallel import compile_blocks

    x, y = batch
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    model.train()
    if framework == "phitrain":
        opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1))
        if compiled:
            compile_blocks(model, torch.device(device))
        forward = lambda: model(x, y)                                            # noqa: E731
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        run = torch.compile(model) if compiled else model
        if framework == "transformers":
            forward = lambda: run(input_ids=x, labels=x).loss                    # noqa: E731
        else:
            from litgpt.utils import chunked_cross_entropy
            forward = lambda: chunked_cross_entropy(run(x), y)                   # noqa: E731

    def step():
        with autocast():
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ---- generation ----------------------------------------------------------------------------------

def generate_fn(framework: str, model, compiled: bool, prompts: torch.Tensor, new_tokens: int, results: dict,
                key: str):
    """A callable generating `new_tokens` greedy tokens for every row of `prompts`, storing them."""
    model.eval()
    B, P = prompts.shape
    device = prompts.device
    if framework == "phitrain":
        from phitrain.model.generate import generate

        def run():
            results[key] = generate(model, prompts.tolist(), new_tokens, compile=compiled)
        return run
    if framework == "transformers":
        if compiled:   # transformers' documented recipe: a static cache, the forward compiled
            model.generation_config.cache_implementation = "static"
            model.forward = torch.compile(model.forward, fullgraph=True,
                                          mode="reduce-overhead" if device.type == "cuda" else None)

        def run():
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                     pad_token_id=0)
            results[key] = out[:, P:].tolist()
        return run

    import litgpt.generate.base as lit_gen
    next_token = lit_gen.next_token
    mode = "reduce-overhead" if device.type == "cuda" else None
    if compiled and B == 1:   # as `litgpt generate --compile` does
        next_token = torch.compile(lit_gen.next_token, mode=mode)
    elif compiled:            # the batched path calls the model itself: compile its forward
        model.forward = torch.compile(model.forward)

    def run():
        lit_gen.next_token, saved = next_token, lit_gen.next_token
        try:
            model.max_seq_length = P + new_tokens
            model.set_kv_cache(batch_size=B, device=device)
            with torch.inference_mode():
                if B == 1:
                    out = lit_gen.generate(model, prompts[0], P + new_tokens, temperature=0.0, include_prompt=False)
                    results[key] = [out.tolist()]
                else:
                    steps = list(lit_gen.batched_generate_fn(model, prompts, P + new_tokens,
                                                             sample_args={"temperature": 0.0},
                                                             include_prompt=False, include_eos=True))
                    results[key] = [[int(step[i]) for step in steps] for i in range(B)]
        finally:
            lit_gen.next_token = saved
            model.clear_kv_cache()
    return run


# ---- timing --------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(fns: dict, reps: int, inner: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each fn, `reps` times, alternating fns and reversing their order each round."""
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


def measure(key: str, base, models: dict, args, console) -> dict:
    """tokens/s (median and best over reps) of every (framework, mode) for one measurement."""
    fns, warm, results = {}, {}, {}
    g = torch.Generator().manual_seed(args.seed + 1)
    for framework, model in models.items():
        for mode in args.modes:
            m = copy.deepcopy(model)
            name = f"{framework}/{mode}"
            if key in GENERATE_BATCHES:
                B = GENERATE_BATCHES[key]
                prompts = torch.randint(0, base.config.vocab_size, (B, args.prompt_len), generator=g.manual_seed(7))
                fns[name] = generate_fn(framework, m, mode == "compiled", prompts.to(args.device), args.new_tokens,
                                        results, name)
                tokens = B * args.new_tokens
            else:
                precision, B, T = TRAIN_SHAPES[key]
                ids = torch.randint(0, base.config.vocab_size, (B, T + 1), generator=g.manual_seed(7)).to(args.device)
                fns[name] = train_step_fn(framework, m, mode == "compiled", (ids[:, :-1], ids[:, 1:]), precision,
                                          args.device)
                tokens = B * T
            t0 = time.perf_counter()
            fns[name]()      # warm-up: compile, allocator, optimizer state
            fns[name]()
            warm[name] = time.perf_counter() - t0
    console.print(f"  {key}: warm-up (incl. compile) " + ", ".join(f"{n} {s:.0f}s" for n, s in warm.items()))
    inner = 1 if key in GENERATE_BATCHES else args.train_steps
    times = time_alternating(fns, args.reps, inner, args.device)
    out = {name: {"median_tok_s": tokens / statistics.median(t), "best_tok_s": tokens / min(t),
                  "warmup_s": warm[name]} for name, t in times.items()}
    if results:
        reference = results[f"phitrain/{args.modes[0]}"]
        out["same_tokens"] = {name: toks == reference for name, toks in results.items()}
    return out


def main(argv=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    for peer in args.peers:
        try:
            __import__(peer)
        except ImportError as err:
            raise SystemExit(f"error: benchmarks/model_speed.py: cannot import {peer} ({err}); install it "
                             f"(see the docstring) or leave it out with --peers")
    torch.set_num_threads(args.threads)
    if args.freed_memory == "keep" and args.device == "cpu":
        from phitrain.train.parallel import set_freed_memory_policy

        set_freed_memory_policy(release=False, report=True)
    warnings.filterwarnings("ignore")
    base = phitrain_model(args)
    models = {"phitrain": base}
    if "transformers" in args.peers:
        models["transformers"] = transformers_model(base)
    if "litgpt" in args.peers:
        models["litgpt"] = litgpt_model(base)
    models = {name: m.to(args.device) for name, m in models.items()}
    from importlib.metadata import version

    versions = {name: version(name) for name in ("torch", *args.peers)}
    cfg = base.config
    console = Console()
    console.print(f"[bold]model_speed[/]: {cfg.block} block, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
                  f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, "
                  f"{base.num_params() / 1e6:.1f}M params; device {args.device}, {torch.get_num_threads()} threads; "
                  + ", ".join(f"{k} {v}" for k, v in versions.items())
                  + f"; medians of {args.reps} alternating reps; freed memory: {args.freed_memory}")

    record = {"config": vars(args), "params": base.num_params(), "versions": versions,
              "threads": torch.get_num_threads()}
    table = Table(title="tokens/s, median (higher is better); each framework at its best mode")
    for col in ["measurement", *models, "ratio", "target"]:
        table.add_column(col, justify="left" if col == "measurement" else "right")
    # generation first: training steps change the weights (differently in each copy, but still)
    for key in sorted(args.measure, key=lambda k: k not in GENERATE_BATCHES):
        console.print(f"{key} ...")
        r = measure(key, base, models, args, console)
        best = {fw: max(((r[f"{fw}/{m}"]["median_tok_s"], m) for m in args.modes)) for fw in models}
        others = [best[fw][0] for fw in models if fw != "phitrain"]
        ratio = best["phitrain"][0] / max(others) if others else None
        ok = ratio is not None and ratio >= TARGETS[key]
        table.add_row(key, *(f"{best[fw][0]:,.0f} ({best[fw][1]})" for fw in models),
                      "—" if ratio is None else f"[{'green' if ok else 'red'}]{ratio:.2f}x[/]", f">= {TARGETS[key]}x")
        record[key] = {"runs": r, "best_mode": {fw: best[fw][1] for fw in models},
                       "tok_s": {fw: round(best[fw][0], 1) for fw in models},
                       "ratio": None if ratio is None else round(ratio, 3), "target": TARGETS[key], "meets_target": ok}
        if "same_tokens" in r and not all(r["same_tokens"].values()):
            console.print(f"[red]warning: greedy tokens differ from phitrain's: {r['same_tokens']}[/]")
    console.print(table)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
