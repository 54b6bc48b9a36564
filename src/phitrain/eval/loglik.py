"""Log-likelihood evaluation: multiple-choice tasks scored by the model's own probabilities.

Phi-4's report evaluates base models with log-likelihood / few-shot tasks (Phi-4 report §3, Table 2's
"MMLU"-style rows, as in lm-evaluation-harness). Each choice is scored by log P(continuation | context);
`acc` picks the highest summed log-likelihood, `acc_norm` divides by the continuation's length in
characters first (lm-evaluation-harness's definition), which removes the bias towards short answers.

Task file: JSONL, one object per question: {"context": str, "choices": [str, ...], "gold": int}. k-shot
prompts prepend k other solved questions (drawn with a seed, never the question itself), each as
context + delimiter + gold choice, separated by a blank line.

The scoring functions here (`score_continuations`, `rolling_logprob`) are the ones the lm-eval adapter
calls, so both paths compute the same numbers.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from phitrain.errors import PhitrainError


@torch.no_grad()
def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], *,
                        batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log P(continuation tokens | context), whether every continuation token is the argmax)
    for each (context, continuation) pair. Context and continuation are tokenised separately, so the
    continuation's tokens are the same whatever the context; an empty context is replaced by EOS (the
    document separator the model was trained with, phi-1 §2.3). Contexts are cut from the left to fit
    the model's window."""
    window = model.config.max_position_embeddings
    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer.encode(context) if context else [tokenizer.eos_id]
        cont = tokenizer.encode(continuation)
        if not cont:
            raise PhitrainError(f"empty continuation after context {context[-60:]!r}")
        if len(cont) >= window:
            raise PhitrainError(f"a continuation of {len(cont)} tokens does not fit the context of {window}")
        seq = (ctx + cont)[-(window + 1):]
        encoded.append((seq, len(cont)))
    return score_sequences(model, encoded, batch_size)


@torch.no_grad()
def score_sequences(model, encoded: list[tuple[list[int], int]], batch_size: int) -> list[tuple[float, bool]]:
    """Score the last n tokens of each sequence (n given); longest first so padding is small."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i][0]) for i in idx) - 1
        inputs = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i][0][:-1]
            inputs[row, :len(seq)] = torch.tensor(seq)  # right padding: causal attention never sees it
        logprobs = torch.log_softmax(model(inputs.to(device)).float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            seq, n = encoded[i]
            targets = torch.tensor(seq[-n:])
            lp = logprobs[row, len(seq) - 1 - n:len(seq) - 1]
            picked = lp.gather(-1, targets[:, None]).squeeze(-1)
            out[i] = (float(picked.sum()), bool((lp.argmax(-1) == targets).all()))
    return out


@torch.no_grad()
def rolling_logprob(model, tokens: list[int], prefix_id: int, *, batch_size: int = 8) -> float:
    """Total log-probability of a whole token sequence, scored in disjoint windows of the model's
    context; the first token is predicted from `prefix_id` (EOS, the document boundary). Used for
    perplexity and for lm-eval's loglikelihood_rolling."""
    window = model.config.max_position_embeddings
    prefixed = [prefix_id] + list(tokens)
    pieces = [(prefixed[start:min(start + window, len(tokens)) + 1], min(window, len(tokens) - start))
              for start in range(0, len(tokens), window)]
    return sum(lp for lp, _ in score_sequences(model, pieces, batch_size))


@dataclass
class MCQuestion:
    context: str
    choices: list[str]
    gold: int


def read_task(path: str | os.PathLike) -> list[MCQuestion]:
    """Questions from a task JSONL; every error names the file and line."""
    from phitrain.files import iter_jsonl

    questions = []
    for number, obj in iter_jsonl(path):
        context, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
        if not isinstance(context, str):
            raise PhitrainError(f"{path}:{number}: 'context' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise PhitrainError(f"{path}:{number}: 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise PhitrainError(f"{path}:{number}: 'gold' must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
        questions.append(MCQuestion(context, choices, gold))
    if not questions:
        raise PhitrainError(f"{path}: no questions in the file")
    return questions


def build_prompts(questions: list[MCQuestion], num_fewshot: int, seed: int, delimiter: str = " ",
                  fewshot_delimiter: str = "\n\n") -> list[str]:
    """The context each question is scored with: k solved examples (not the question itself), then it."""
    if num_fewshot < 0 or num_fewshot > len(questions) - 1:
        raise PhitrainError(f"num_fewshot must be in 0..{len(questions) - 1} for a task of {len(questions)} "
                            f"questions, got {num_fewshot}")
    rng = random.Random(seed)
    prompts = []
    for i, q in enumerate(questions):
        shots = rng.sample([j for j in range(len(questions)) if j != i], num_fewshot) if num_fewshot else []
        parts = [questions[j].context + delimiter + questions[j].choices[questions[j].gold] for j in shots]
        prompts.append(fewshot_delimiter.join(parts + [q.context]))
    return prompts


def evaluate_task(model, tokenizer, questions: list[MCQuestion], *, num_fewshot: int = 0, seed: int = 1234,
                  delimiter: str = " ", batch_size: int = 16) -> dict[str, Any]:
    """acc and acc_norm (with their standard errors) over the task's questions."""
    prompts = build_prompts(questions, num_fewshot, seed, delimiter)
    pairs = [(p, delimiter + c) for p, q in zip(prompts, questions) for c in q.choices]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size=batch_size))
    acc, acc_norm = [], []
    for q in questions:
        lls = [next(scores)[0] for _ in q.choices]
        normed = [ll / len(c) for ll, c in zip(lls, q.choices)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == q.gold))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == q.gold))
    return {"questions": len(questions), "num_fewshot": num_fewshot, "acc": _mean(acc),
            "acc_stderr": _stderr(acc), "acc_norm": _mean(acc_norm), "acc_norm_stderr": _stderr(acc_norm)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def load_for_eval(checkpoint: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer) from a checkpoint directory, with a clear error when it is missing/incomplete.
    `device` is cpu, cuda, cuda:N or auto (cuda when there is one)."""
    from phitrain.checkpoint import load_checkpoint
    from phitrain.device import resolve_device

    path = Path(checkpoint)
    if not path.is_dir():
        raise PhitrainError(f"checkpoint {path}: no such directory")
    model, tokenizer = load_checkpoint(path, device=resolve_device(device))
    if tokenizer is None:
        raise PhitrainError(f"checkpoint {path}: has no tokenizer/ directory; save it with its tokenizer")
    return model, tokenizer


def run_loglik(*, checkpoint: str, task: str, num_fewshot: int = 0, seed: int = 1234, batch_size: int = 16,
               device: str = "cpu") -> dict[str, Any]:
    """The `phitrain eval loglik` command: a table and a final JSON line."""
    questions = read_task(task)
    model, tokenizer = load_for_eval(checkpoint, device)
    result = {"task": str(task), **evaluate_task(model, tokenizer, questions, num_fewshot=num_fewshot, seed=seed,
                                                 batch_size=batch_size)}
    print_table("log-likelihood", result)
    print(json.dumps(result))
    return result


def print_table(title: str, result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
