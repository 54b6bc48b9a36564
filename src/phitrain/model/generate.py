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

A small model decodes at the speed of its per-op overhead, not of its arithmetic: one token of a
7M-parameter model is ~100 small kernels, each launched from Python. `compile=True` runs each decode
step as one `torch.compile`d graph instead (inductor's fused C++ kernels on CPU; on CUDA also captured
as a CUDA graph, `mode="reduce-overhead"`), over a static KV cache whose shape and write position are
tensors that do not change between steps (`PhiModel.forward(cache_position=...)`), so one graph serves
every step. The prompt's prefill stays eager (its length varies). Greedy tokens are the eager path's
(tested; as between any two kernels, a last-bit difference could flip an exact near-tie).

A decode step multiplies a few rows (one per sequence) by every weight, and the BLAS's GEMM, built for
big tiles, streams such skinny products far below the memory bandwidth. On CPU the fixed-shape step
therefore runs `SkinnyMatmulPass` (phitrain.model.skinny_matmul): each matmul of up to 16 rows becomes
one fused C++ loop that reads every weight row once and uses it for all rows, with an accumulator per
row (phi-1-tiny's 25 matmuls on 2 AVX2 cores: 1.4 vs 4.0 ms at 8 rows, 1.0 vs 2.2 ms at 1, against
MKL's GEMM). `cpp_wrapper` calls the kernels from
generated C++ instead of a Python wrapper. Over a KV cache of WINDOW_MIN_BYTES or more (phi-1-tiny: 8
rows of 192 columns are 19 MB, as much as its weights) each step attends over the columns filled so
far, not the whole buffer: the step sees a window of the cache (`KVCache.window`) whose width is a
dynamic dimension of one graph, so the average step of a generation reads half the cache. And after the
first decode step of a `generate` call has passed dynamo's guards, the remaining steps of that call
(same model, cache and shapes) check only the guards that tell its compiled graphs apart
(`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`). CUDA keeps the full cache under the mask:
a CUDA graph replays fixed shapes. benchmarks/model_speed.py has the end-to-end numbers.

The serving engine's step (`any_shape`) always attends over a window of the filled columns, its width
a dynamic dimension (rows come and go, and their cache is rebuilt to the longest row each time). On CPU
the engine pads its rows to a power of two up to PADDED_ROWS_MAX (`CompiledDecoder.batch_rows`), and
each of those row counts has a graph of its own with `SkinnyMatmulPass` (the rows fixed, so an
accumulator per row); more rows, and CUDA, run one graph for any row count.
benchmarks/serve_speed.py has the served throughput.
"""

from __future__ import annotations

import functools
import re
import weakref
from contextlib import nullcontext
from typing import Callable, NamedTuple, Sequence

import torch

from phitrain.compile_cache import keep_inductor_cache
from phitrain.model.phi import KVCache, PhiModel
from phitrain.model.skinny_matmul import MAX_ROWS, SkinnyMatmulPass


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


# Cache widths are rounded up to a multiple of this, so prompts of different lengths share compiled graphs.
_CAPACITY_STEP = 64
# `compile="auto"` in `complete`: compile when this many decode steps lie ahead. A graph compiles in
# ~15-45 s on 2 CPU cores (each new batch shape or cache width is one more; inductor's cache makes a
# repeat fast) and saves ~1-5 ms per step for phi-1-tiny (benchmarks/model_speed.py): below this,
# compiling costs more than it saves.
AUTO_COMPILE_DECODE_STEPS = 10_000
# A CPU decode step over a KV cache of at least this many bytes attends over its filled columns only.
# Making the window costs ~0.1 ms a step (views, dynamic-shape guards): measured at 128 new tokens for
# phi-1-tiny, 8 rows (19 MB of cache) gain 14%, 1 row (2.4 MB) loses 6%.
WINDOW_MIN_BYTES = 4 * 2**20
# The serving engine's CPU step pads its rows to a power of two up to this many (1, 2, 4, 8, 16), each
# such row count a graph of its own with SkinnyMatmulPass and only the cache width dynamic. Per step for
# phi-1-tiny over 41 and 120 cached columns on 2 AVX2 cores, against a graph with the row count dynamic
# too (up to 8 rows with the pass's one accumulator per output, above that the GEMM): 2 rows 1.66-1.90
# vs 2.21-2.35 ms, 4 rows 2.03-2.26 vs 2.58-2.91, 8 rows 2.69-3.24 vs 3.92-4.26, 16 rows 6.25-7.58 vs
# 7.51-8.57 (12 rows with the GEMM 6.94-7.77): a padded row costs less than the dynamic count does.
PADDED_ROWS_MAX = MAX_ROWS


class CompiledDecoder:
    """One decode step of a model (one new token per row → next-token logits) as a compiled graph.

    Two compiled forms: `generate` keeps its shapes fixed (cache widths rounded up to _CAPACITY_STEP), so
    its graphs are specialised to them (`dynamic=False`, the fastest code); the serving engine's cache
    widths change with every request that joins or leaves, so its graphs hold for any width (marked
    dynamic at each call): on CPU one graph per row count up to PADDED_ROWS_MAX (the engine pads its
    rows to `batch_rows`), with SkinnyMatmulPass; for more rows, or on CUDA, one graph for a single row
    and one for any row count. The model is an argument, not captured, so a model's compiled code does
    not keep it alive; graphs are cached by dynamo per model configuration and shape.

    It holds the model's latest KV cache for `generate` to reuse: a CUDA graph is recorded for its
    buffers, and a cache's unwritten or stale columns are never attended (they lie past
    `cache_position` or under the padding mask), so reuse needs no clearing. Only one is kept: a cache
    of phi-1 for 8 rows of 2048 tokens is 3 GB in bf16.
    """

    def __init__(self, model: PhiModel):
        param = next(model.parameters())
        self.model_ref = weakref.ref(model)
        self.device, self.dtype = param.device, param.dtype
        self._cache: KVCache | None = None
        self._guarded = False    # has this generate call's first fixed-shape step passed the full guards
        self._window = False     # does this generate call attend over a window of the cache

    def capacity(self, total: int) -> int:
        limit = self.model_ref().config.max_position_embeddings
        return min(limit, -(-total // _CAPACITY_STEP) * _CAPACITY_STEP)

    def batch_rows(self, rows: int) -> int:
        """The rows the serving engine's cache and step hold for `rows` sequences: on CPU up to
        PADDED_ROWS_MAX the next power of two (a graph per such count, see PADDED_ROWS_MAX), else `rows`."""
        return min(1 << (rows - 1).bit_length(), PADDED_ROWS_MAX) if self._fixed_rows(rows) else rows

    def _fixed_rows(self, rows: int) -> bool:
        """Whether the serving engine's step for `rows` rows is a graph for that row count alone."""
        return self.device.type == "cpu" and rows <= PADDED_ROWS_MAX

    def cache(self, batch_size: int, capacity: int) -> KVCache:
        cache = self._cache
        if cache is None or (len(cache.k[0]), cache.capacity) != (batch_size, capacity):
            self._cache = cache = KVCache(self.model_ref().config, batch_size, capacity, self.device, self.dtype)
            if self.device.type == "cuda":   # a CUDA graph may then use the buffers in place
                for buffer in cache.k + cache.v:
                    torch._dynamo.mark_static_address(buffer)
        cache.length = 0
        self._guarded = False
        self._window = self.device.type == "cpu" and sum(t.nbytes for t in cache.k + cache.v) >= WINDOW_MIN_BYTES
        return cache

    def __call__(self, last_ids, positions, cache: KVCache, mask, any_shape: bool = False) -> torch.Tensor:
        steps = _compiled_steps(self.device.type)
        column = torch.full((1,), cache.length, dtype=torch.long, device=self.device)
        # within one generate call every step sees what the first one did (model, cache, shapes), so only
        # the guards between graphs are needed; the serving engine's shapes change between its calls
        skip_guards = self._guarded and not any_shape
        rows = last_ids.shape[0]
        fixed_rows = not any_shape or self._fixed_rows(rows)
        step = steps.fixed if not any_shape else steps.any_width if fixed_rows else steps.any_shape
        seen = cache
        if any_shape or self._window:  # attend over the filled columns only, at any width
            seen = cache.window(cache.length + 1)
            mask = None if mask is None else mask[:, :cache.length + 1]
            if not skip_guards:  # (a step that skips the guards runs the graph the first step found)
                _mark_varying_sizes(seen, mask, last_ids, positions, varying_rows=not fixed_rows and rows > 1)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip_guards else nullcontext():
            logits = step(self.model_ref(), last_ids, positions, seen, column, mask)
        self._guarded = not any_shape
        cache.length += 1
        return logits.clone() if self.device.type == "cuda" else logits  # a CUDA graph reuses its output


def _mark_varying_sizes(window: KVCache, mask, last_ids, positions, varying_rows: bool) -> None:
    # the sizes that change from step to step are dynamic in the graph: the width, and the rows of the
    # serving engine's any-row-count graph (one row is a graph of its own: dynamo specialises sizes of
    # 1); the heads, head size, weights and the model's floats stay fixed, as in a fixed-shape graph
    for buffer in window.k + window.v:
        torch._dynamo.mark_dynamic(buffer, [0, 2] if varying_rows else 2)
    if mask is not None:
        torch._dynamo.mark_dynamic(mask, [0, 1] if varying_rows else 1)
    if varying_rows:
        torch._dynamo.mark_dynamic(last_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)


def _decode_logits(model, last_ids, positions, cache, column, mask):
    return model(last_ids, position_ids=positions, cache=cache, cache_position=column, attention_mask=mask)[:, -1]


def _decode_logits_any_shape(model, last_ids, positions, cache, column, mask):
    # a code object of its own: dynamo keeps compiled graphs per code object, and these must not mix
    return _decode_logits(model, last_ids, positions, cache, column, mask)


def _decode_logits_any_width(model, last_ids, positions, cache, column, mask):
    # (a code object of its own too)
    return _decode_logits(model, last_ids, positions, cache, column, mask)


class DecodeSteps(NamedTuple):
    fixed: Callable             # generate's: shapes fixed, CUDA graphs on CUDA, SkinnyMatmulPass on CPU
    any_shape: Callable         # the serving engine's, for any rows and cache width
    any_width: Callable         # the serving engine's on CPU: rows fixed (a graph per count), any cache width


@functools.cache
def _compiled_steps(device_type: str) -> DecodeSteps:
    # one graph per model configuration x batch size x cache width x padded or not: more than dynamo's
    # default of 8 recompiles per function in a process that evaluates several models
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    keep_inductor_cache()
    skinny = {"post_grad_custom_post_pass": SkinnyMatmulPass()}
    fixed = (dict(mode="reduce-overhead") if device_type == "cuda" else
             dict(options={"cpp_wrapper": True, **skinny}))
    # any_width: dynamic=False keeps each row count a graph of its own (dynamo would otherwise make the
    # rows dynamic at the second count it sees); only the width, marked at each call, is dynamic
    return DecodeSteps(torch.compile(_decode_logits, fullgraph=True, dynamic=False, **fixed),
                       torch.compile(_decode_logits_any_shape, fullgraph=True),
                       torch.compile(_decode_logits_any_width, fullgraph=True, dynamic=False, options=skinny))


_DECODERS: "weakref.WeakKeyDictionary[PhiModel, CompiledDecoder]" = weakref.WeakKeyDictionary()


def compiled_decoder(model: PhiModel) -> CompiledDecoder:
    """The model's compiled decode step (compiled on its first call); a new one, with a new cache, once
    the model has moved to another device or dtype."""
    param = next(model.parameters())
    decoder = _DECODERS.get(model)
    if decoder is None or (decoder.device, decoder.dtype) != (param.device, param.dtype):
        decoder = _DECODERS[model] = CompiledDecoder(model)
    return decoder


def decode_step(model: PhiModel, last_ids, positions, cache: KVCache, mask, decoder: CompiledDecoder | None,
                any_shape: bool = False):
    """Logits [B, V] for one new token per row written at column `cache.length` (then advanced).

    `mask` ([B, cache columns], 1 = real) is None when no row is padded. Eager, the tokens attend to the
    filled columns only; with a `decoder`, the compiled static-cache step (`any_shape`: the form compiled
    for changing batch shapes).
    """
    if decoder is not None:
        return decoder(last_ids, positions, cache, mask, any_shape)
    am = None if mask is None else mask[:, :cache.length + 1]
    return model(last_ids, position_ids=positions, attention_mask=am, cache=cache)[:, -1]


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
    compile: bool = False,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` for each prompt; returns the new tokens only.

    A row stops at `eos_id` (included), when its new tokens end with one of `stop_ids` (included), or when
    `stop_fn(row, new_tokens)` says so (text-level stop strings, see `complete`). `compile` decodes with
    the model's compiled step (`CompiledDecoder`; the first call compiles it).
    """
    if compile and not use_cache:
        raise ValueError("compile=True needs use_cache=True (it decodes over the static KV cache)")
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
    decoder = compiled_decoder(model) if compile else None
    width = decoder.capacity(total) if decoder else total
    ids, mask, positions = left_pad(prompts, width, device)
    padded = bool((mask[:, :longest] == 0).any())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if decoder is not None:
        cache = decoder.cache(B, width)
    else:
        cache = KVCache(model.config, B, total, device, next(model.parameters()).dtype) if use_cache else None

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stops = [list(s) for s in (stop_ids or []) if len(s)]
    end = longest
    logits = last_logits(model, ids, positions, mask if padded else None, end, cache)
    for _ in range(max_new_tokens):
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, ids[:, :end], mask[:, :end], repetition_penalty)
        next_ids = _sample(logits, temperature, top_k, top_p, generator)
        ids[:, end] = next_ids
        end += 1
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            out[i].append(tok)
            if tok == eos_id or any(out[i][-len(s):] == s for s in stops) or (stop_fn and stop_fn(i, out[i])):
                done[i] = True
        if all(done) or end == total:
            break
        if cache is not None:
            logits = decode_step(model, ids[:, end - 1:end], positions[:, end - 1:end], cache,
                                 mask if padded else None, decoder)
        else:
            logits = last_logits(model, ids, positions, mask if padded else None, end, None)
    model.train(was_training)
    return out


def last_logits(model: PhiModel, ids, positions, mask, end: int, cache: KVCache | None) -> torch.Tensor:
    """Next-token logits [B, V] after the first `end` columns, projecting only the last position to the
    vocabulary (a prompt's other positions need no logits)."""
    hidden = model(ids[:, :end], position_ids=positions[:, :end],
                   attention_mask=None if mask is None else mask[:, :end], cache=cache, return_hidden=True)
    return model.lm_head(hidden[:, -1])


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
    compile: bool | str = False,
) -> list[str]:
    """Text in, completion text out, cut before the first stop string (HumanEval-style stop sequences)
    or, with `stop_at_top_level`, before the first line that starts in column 0.

    Prompts longer than the context are truncated from the left so that `max_new_tokens` still fit.
    `compile`: decode with the compiled step; "auto" when at least AUTO_COMPILE_DECODE_STEPS decode
    steps (batches x max_new_tokens) lie ahead.
    """
    if compile == "auto":
        compile = -(-len(prompts) // batch_size) * max_new_tokens >= AUTO_COMPILE_DECODE_STEPS
    elif not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
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
                              seed=None if seed is None else seed + start, repetition_penalty=repetition_penalty,
                              compile=compile)
        for toks in new_tokens:
            text = tokenizer.decode([t for t in toks if t != tokenizer.eos_id])
            cut = cut_at(text)
            texts.append(text if cut is None else text[:cut])
    return texts
