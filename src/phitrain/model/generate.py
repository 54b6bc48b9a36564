"""Batched autoregressive generation with a KV cache.

Prompts of different lengths are left-padded into one batch; an attention mask hides the padding and
position ids count only real tokens (so a padded row computes exactly what it would alone). Decoding is
greedy at temperature 0, else sampling with optional top-k and top-p (nucleus, Holtzman et al. 2020).
A repetition penalty (Keskar et al. 2019, CTRL §4.1; transformers' definition) divides the positive
logits and multiplies the negative ones of every token already in the row, so a small model's greedy
output does not fall into the loops it otherwise prefers; `stop_at_top_level` ends a completion at the
first line that starts in column 0 (the end of the definition the prompt opened).
`use_cache=False` recomputes the whole sequence each step: slow, but the reference the cached path must
match token for token.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from phitrain.model.phi import KVCache, PhiModel


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def penalize_repeats(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """Last-position logits [B, V] with the tokens present in `ids` [B, T] (where `mask` is 1) penalised."""
    seen = torch.zeros(logits.shape, dtype=torch.long, device=logits.device).scatter_add_(1, ids, mask) > 0
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# A line that starts in column 0 with something other than a closing bracket ends a top-level definition.
TOP_LEVEL_LINE = re.compile(r"\n(?=[^\s)\]}])")


def left_pad(prompts: Sequence[Sequence[int]], width: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, mask, position_ids), each [B, width]: prompts right-aligned at the longest prompt's end.

    Columns after the prompts are marked real in the mask (they will hold generated tokens), and position
    ids count real tokens only, so a padded row computes what it would alone. The serving engine
    (`phitrain.serve.engine`) prefills joining requests with the same layout.
    """
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):longest] = torch.tensor(list(p), dtype=torch.long)
        mask[i, longest - len(p):longest] = 1
    mask[:, longest:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model: PhiModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] | None = None,
    stop_fn: Callable[[int, list[int]], bool] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt; returns the new tokens only.

    A row stops at `eos_id` (included), when its new tokens end with one of `stop_ids` (included), or when
    `stop_fn(row, new_tokens)` says so (text-level stop strings, see `complete`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new exceeds the context of {limit}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    B, total = len(prompts), longest + max_new_tokens
    ids, mask, positions = left_pad(prompts, total, device)
    padded = bool((mask[:, :longest] == 0).any())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, B, total, device, next(model.parameters()).dtype) if use_cache else None

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stops = [list(s) for s in (stop_ids or []) if len(s)]
    end = longest
    logits = model(ids[:, :end], position_ids=positions[:, :end],
                   attention_mask=mask[:, :end] if padded else None, cache=cache)[:, -1]
    for _ in range(max_new_tokens):
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, ids[:, :end], mask[:, :end], repetition_penalty)
        next_ids = _sample(logits, temperature, top_k, top_p, generator)
        ids[:, end] = next_ids
        end += 1
        for i in range(B):
            if done[i]:
                continue
            tok = int(next_ids[i])
            out[i].append(tok)
            if tok == eos_id or any(out[i][-len(s):] == s for s in stops) or (stop_fn and stop_fn(i, out[i])):
                done[i] = True
        if all(done) or end == total:
            break
        am = mask[:, :end] if padded else None
        if cache is not None:
            logits = model(ids[:, end - 1:end], position_ids=positions[:, end - 1:end], attention_mask=am,
                           cache=cache)[:, -1]
        else:
            logits = model(ids[:, :end], position_ids=positions[:, :end], attention_mask=am)[:, -1]
    model.train(was_training)
    return out


def complete(
    model: PhiModel,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    stop_at_top_level: bool = False,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Text in, completion text out, cut before the first stop string (HumanEval-style stop sequences)
    or, with `stop_at_top_level`, before the first line that starts in column 0.

    Prompts longer than the context are truncated from the left so that `max_new_tokens` still fit.
    """
    limit = model.config.max_position_embeddings - max_new_tokens
    if limit <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in the context of "
                         f"{model.config.max_position_embeddings}")
    encoded = [tokenizer.encode(p)[-limit:] or [tokenizer.eos_id] for p in prompts]
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]

        def cut_at(text: str) -> int | None:
            cuts = [text.find(s) for s in stop if s in text]
            if stop_at_top_level and (m := TOP_LEVEL_LINE.search(text)):
                cuts.append(m.start())
            return min(cuts, default=None)

        def stop_fn(row: int, new: list[int]) -> bool:
            return cut_at(tokenizer.decode(new)) is not None

        new_tokens = generate(model, batch, max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, eos_id=tokenizer.eos_id,
                              stop_fn=stop_fn if stop or stop_at_top_level else None,
                              seed=None if seed is None else seed + start, repetition_penalty=repetition_penalty)
        for toks in new_tokens:
            text = tokenizer.decode([t for t in toks if t != tokenizer.eos_id])
            cut = cut_at(text)
            texts.append(text if cut is None else text[:cut])
    return texts
