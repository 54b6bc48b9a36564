"""Continuous batching over the KV-cache model: the engine behind `phitrain serve`.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022): the batch is re-formed between decode steps, so
a request that arrives while others are generating joins at the next step instead of waiting for the
whole batch to finish, and a finished row leaves at once instead of riding along as padding.

The batch layout is the generator's (`phitrain.model.generate`): every row's keys and values are
right-aligned at one common column `end` of a static KV cache, left padding is masked out, and position
ids count a row's real tokens only, so a row computes what it would alone whatever it is batched with.
Joining works because of that: requests admitted together are prefilled as one left-padded batch with
their own cache, and their keys/values (already rotated by RoPE at their own positions) are copied into
a fresh running cache right-aligned with the rows already there. When rows finish, the survivors are
copied into a compacted cache. Both copies happen per request, not per step, and each new cache is sized
to the longest row plus the most tokens any row may still add, so decode steps never reallocate.

Sampling is per row: each row has its own temperature/top-k/top-p and its own `torch.Generator` seeded
from its request's seed (or at random). A seeded row's tokens therefore depend only on its prompt,
parameters and seed, never on which rows it shares a step with, as long as the model computes the same
logits for it in either batch; batched matmuls may differ in the last bits from unbatched ones (more so
on GPUs), which can flip a greedy near-tie or a draw that lands on a probability boundary.

The engine is single-threaded and steppable (`step()`), so tests drive it directly; `Scheduler` runs it
on one thread that owns the model, fed by a queue from the HTTP layer.
"""

from __future__ import annotations

import queue
import secrets
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from phitrain.model.generate import _sample, compiled_decoder, decode_step, last_logits, left_pad
from phitrain.model.phi import KVCache, PhiModel


@dataclass(frozen=True)
class SamplingParams:
    """What one completion asks for (the OpenAI request fields of the same names).

    `ignore_eos` (a vLLM extension) keeps generating past `<|endoftext|>`, for fixed-length benchmarks.
    """

    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Event:
    """What the engine reports about one sequence: new text, and on its last event why it ended
    (`finish_reason` "stop": end of text or a stop string; "length": max_tokens) or what went wrong."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    """One prompt being completed.

    Built by the HTTP layer and owned by the engine's thread once submitted; the only field another thread
    writes is `cancelled` (the client went away), which the engine checks before every step.
    `on_event` is called on the engine's thread. With `stream` the text is reported as it grows;
    otherwise in one event at the end.
    """

    def __init__(self, prompt: Iterable[int], params: SamplingParams, on_event: Callable[[Event], None],
                 stream: bool = False):
        self.prompt = list(prompt)
        self.params = params
        self.on_event = on_event
        self.stream = stream
        self.generated: list[int] = []
        self.emitted = 0  # characters of text already reported
        self.cancelled = False
        self.generator: torch.Generator | None = None  # made on the first sampled token

    @property
    def cached(self) -> int:
        """Positions this row holds in the KV cache: the prompt and every generated token but the last,
        which is the next decode step's input."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass
class EngineStats:
    """Counters for `/stats`. A batch is one decode step over the running rows."""

    prefills: int = 0
    batches: int = 0
    batch_rows: int = 0
    max_batch_size: int = 0
    joined_running: int = 0  # sequences admitted while other rows were mid-generation
    completion_tokens: int = 0
    prompt_tokens: int = 0

    def snapshot(self) -> dict:
        out = asdict(self)
        out["mean_batch_size"] = round(self.batch_rows / self.batches, 3) if self.batches else 0.0
        return out


def streamable(text: str, stops: Iterable[str]) -> int:
    """How much of `text` can be reported now: all of it except a trailing U+FFFD (the next token may
    complete that multi-byte character) and a suffix that could be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.startswith(stop[:k], end - k):
                hold = k
                break
    return end - hold


class BatchEngine:
    """The running batch: admit waiting sequences, decode one token for every row, retire finished rows."""

    def __init__(self, model: PhiModel, tokenizer, max_batch_size: int, compile: bool = False):
        self.model = model
        # compile: decode steps run as the model's compiled graph (`phitrain.model.generate.CompiledDecoder`),
        # in its any-shape form: rows and cache widths change as requests come and go
        self.decoder = compiled_decoder(model) if compile else None
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.max_batch_size = max_batch_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.waiting: list[Sequence] = []
        self.rows: list[Sequence] = []
        self.cache: KVCache | None = None  # cache.length is the common end column of all rows
        self.mask: torch.Tensor | None = None  # [cache rows, capacity], 1 = a real token (or a future one)
        self.padded = False  # whether any row has left padding (else attention needs no mask)
        self.stats = EngineStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.stats.prompt_tokens += len(seq.prompt)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled sequences, admit waiting ones up to the batch limit (one prefill), then run one
        decode step over every running row."""
        self.waiting = [s for s in self.waiting if not s.cancelled]
        if any(s.cancelled for s in self.rows):
            self._keep([i for i, s in enumerate(self.rows) if not s.cancelled])
        room = self.max_batch_size - len(self.rows)
        if room > 0 and self.waiting:
            admitted, self.waiting = self.waiting[:room], self.waiting[room:]
            self._admit(admitted)
        if self.rows:
            self._decode()

    def fail(self, message: str) -> None:
        """Report `message` to every sequence the engine holds and start over empty."""
        for seq in self.rows + self.waiting:
            seq.on_event(Event("", error=message, completion_tokens=len(seq.generated)))
        self.rows, self.waiting, self.cache, self.mask = [], [], None, None

    # ---- the batch ---------------------------------------------------------------------------------

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` as one left-padded batch, sample their first tokens, join the survivors."""
        width = max(len(s.prompt) for s in seqs)
        ids, mask, positions = left_pad([s.prompt for s in seqs], width, self.device)
        cache = KVCache(self.model.config, len(seqs), width, self.device, self.dtype)
        padded = bool((mask == 0).any())
        logits = last_logits(self.model, ids, positions, mask if padded else None, width, cache)
        self.stats.prefills += 1
        if self.rows:
            self.stats.joined_running += len(seqs)
        tokens = self._sample(logits, seqs)
        alive = [i for i, (seq, tok) in enumerate(zip(seqs, tokens)) if not self._advance(seq, tok)]
        if alive:
            groups = [(cache, mask, width, alive, [seqs[i] for i in alive])]
            if self.rows:
                groups.insert(0, (self.cache, self.mask, self.cache.length, range(len(self.rows)), self.rows))
            self._assemble(groups)

    def _keep(self, keep: list[int]) -> None:
        """Retire every row not in `keep`, compacting the cache to the survivors."""
        if keep:
            self._assemble([(self.cache, self.mask, self.cache.length, keep, [self.rows[i] for i in keep])])
        else:
            self.rows, self.cache, self.mask = [], None, None

    def _assemble(self, groups) -> None:
        """Build the running batch from (cache, mask, end column, row indices, sequences) groups: a new
        cache as wide as the longest row plus the most tokens any row may still add, and one column more,
        every row's cached positions copied right-aligned at the new end column.

        The spare column is never written: it keeps the window of filled columns a compiled step attends
        over (`CompiledDecoder`) narrower than the cache, a strided view at every step; a window as wide
        as the cache would be contiguous, which the compiled graph's stride guards tell apart (one more
        graph to compile for the last step of the longest row)."""
        rows = [seq for *_, seqs in groups for seq in seqs]
        end = max(s.cached for s in rows)
        capacity = end + max(s.params.max_tokens - len(s.generated) for s in rows) + 1
        # compiled on CPU, rows are padded to a row count with a graph of its own (`batch_rows`); a pad
        # row attends to the columns it writes itself and its logits are dropped
        size = self.decoder.batch_rows(len(rows)) if self.decoder is not None else len(rows)
        cache = KVCache(self.model.config, size, capacity, self.device, self.dtype)
        mask = torch.zeros(size, capacity, dtype=torch.long, device=self.device)
        mask[:, end:] = 1
        at = 0
        for src_cache, src_mask, src_end, index, _ in groups:
            index = torch.tensor(list(index), dtype=torch.long, device=self.device)
            n, w = len(index), min(end, src_end)  # every chosen row's positions lie in the last w columns
            for dst, src in zip(cache.k + cache.v, src_cache.k + src_cache.v):
                dst[at:at + n, :, end - w:end] = src[:, :, src_end - w:src_end].index_select(0, index)
            mask[at:at + n, end - w:end] = src_mask[:, src_end - w:src_end].index_select(0, index)
            at += n
        cache.length = end
        self.rows, self.cache, self.mask = rows, cache, mask
        self.padded = bool((mask[:len(rows), :end] == 0).any())

    def _decode(self) -> None:
        """One forward over every running row's last token, then one new token per row."""
        rows = self.rows
        pad = [[0]] * (len(self.mask) - len(rows))   # pad rows (`_assemble`): any token, any position
        last = torch.tensor([[s.generated[-1]] for s in rows] + pad, dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.cached] for s in rows] + pad, dtype=torch.long, device=self.device)
        # compiled, a batch of several rows passes its mask even when no row is padded (all ones then:
        # ~5% of such a step): one graph per row count instead of two (a lone row is never padded,
        # `_assemble` aligns it to its own tokens)
        masked = self.padded or (self.decoder is not None and len(self.mask) > 1)
        logits = decode_step(self.model, last, positions, self.cache, self.mask if masked else None,
                             self.decoder, any_shape=True)[:len(rows)]
        self.stats.batches += 1
        self.stats.batch_rows += len(rows)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(rows))
        finished = [self._advance(s, t) for s, t in zip(rows, self._sample(logits, rows))]
        if any(finished):
            self._keep([i for i, done in enumerate(finished) if not done])

    # ---- tokens and text ---------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Greedy rows by one batched argmax; sampled rows one by one with their own generator, through
        the generator's `_sample`, so a seeded row draws exactly what `phitrain generate --seed` draws."""
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature > 0:
                if seq.generator is None:
                    seed = p.seed if p.seed is not None else secrets.randbits(63)
                    seq.generator = torch.Generator(device=self.device).manual_seed(seed)
                tokens[i] = _sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, seq.generator)[0]
        return tokens.tolist()

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Append `token`, report new text, and say whether the sequence is finished.

        Text is decoded from all new tokens without `<|endoftext|>` and cut before the first stop string,
        as `phitrain.model.generate.complete` does, so the two give the same text. Rows that neither
        stream nor have stop strings are decoded once, at the end.
        """
        seq.generated.append(token)
        self.stats.completion_tokens += 1
        p = seq.params
        reason = "stop" if token == self.eos_id and not p.ignore_eos else None
        at_limit = len(seq.generated) >= p.max_tokens
        if not (reason or at_limit or p.stop or seq.stream):
            return False
        text = self.tokenizer.decode([t for t in seq.generated if t != self.eos_id])
        hits = [text.find(s) for s in p.stop if s in text]
        if hits:
            text, reason = text[:min(hits)], "stop"
        elif reason is None and at_limit:
            reason = "length"
        if reason is not None:
            seq.on_event(Event(text[seq.emitted:], reason, len(seq.generated)))
            return True
        if seq.stream:
            ready = streamable(text, p.stop)
            if ready > seq.emitted:
                seq.on_event(Event(text[seq.emitted:ready]))
                seq.emitted = ready
        return False


class Scheduler:
    """Runs a `BatchEngine` on one thread, the only one that touches the model.

    Requests wait in a queue; the thread blocks on it while idle and, while generating, takes everything
    that arrived before each step, so new requests join the running batch at the next step. An exception
    in a step (say, CUDA out of memory) is printed and reported to that step's requests, and serving goes on.
    """

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[list[Sequence] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="phitrain-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        self._inbox.put(seqs)

    def close(self) -> None:
        """Stop after the current step; sequences still held are told the server is shutting down."""
        self._inbox.put(None)
        self._thread.join()
        while True:  # requests that arrived after the stop marker
            try:
                seqs = self._inbox.get_nowait()
            except queue.Empty:
                break
            for seq in seqs or []:
                self.engine.add(seq)
        self.engine.fail("the server is shutting down")

    def _run(self) -> None:
        while True:
            item = self._inbox.get() if not self.engine.busy else self._poll()
            while item is not False:
                if item is None:
                    return
                for seq in item:
                    self.engine.add(seq)
                item = self._poll()
            try:
                self.engine.step()
            except Exception as err:  # keep serving: report the failure to the requests it hit
                traceback.print_exc(file=sys.stderr)
                self.engine.fail(f"generation failed: {type(err).__name__}: {err}")

    def _poll(self):
        """The next queued item without blocking, or False when there is none."""
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return False
