"""An OpenAI-compatible client with a request-level cache on disk, retries and token accounting.

Generation at Phi-4's scale (~400B synthetic tokens) runs for days against remote endpoints; a crash must
not cost finished work. Cosmopedia restarted by hand and distilabel caches per batch; here every answered
request is committed to a sqlite database (WAL journal: a process killed with SIGKILL loses at most the
requests still in flight) before its answer is used. The key is the sha256 of (api, model, prompt or
messages, sampling parameters, seed), so a re-run of the same recipe finds every answer it already has
and sends only the rest; the endpoint's URL is not part of the key, so the same model served elsewhere
still hits the cache.

Requests are plain HTTP POSTs through one `httpx.Client` shared by the worker threads (the pool size is
the recipe's `concurrency`). Retries with exponential backoff and jitter cover what a busy or restarting
server does — HTTP 429/5xx (honouring Retry-After), timeouts, refused or dropped connections, answers that
are not the JSON the API promises; other HTTP errors (401, 404 model not found, 400) are mistakes retrying
cannot fix and fail at once. Either way the run stops with one `error:` line, and every answer received
until then stays in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

from phitrain.errors import PhitrainError
from phitrain.synth.config import EndpointConfig, SamplingConfig


class Aborted(Exception):
    """Raised in a worker when another worker's failure has stopped the run."""


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool


@dataclass
class Counters:
    """Requests and tokens of one run, split into answers received now and answers found in the cache."""

    sent: int = 0
    cache_hits: int = 0
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    usage_missing: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class RequestCache:
    """Answers by request key in a sqlite database; safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                             "finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER)")
        except sqlite3.DatabaseError as err:
            raise PhitrainError(f"{self.path}: not a usable request cache ({err}); delete it or set cache: "
                                "to another file") from None

    def get(self, key: str) -> Answer | None:
        with self._lock:
            row = self._db.execute("SELECT text, finish_reason, prompt_tokens, completion_tokens FROM answers "
                                   "WHERE key = ?", (key,)).fetchone()
        return Answer(row[0], row[1], row[2], row[3], cached=True) if row else None

    def put(self, key: str, answer: Answer) -> None:
        """Commit one answer (autocommit: the row is durable before the caller uses the answer)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                             (key, answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _RateLimit:
    """At most `per_minute` request starts per minute, spaced evenly across all threads."""

    def __init__(self, per_minute: float | None, abort: threading.Event) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.abort = abort
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if self.abort.wait(slot - now):
            raise Aborted


class _Retryable(Exception):
    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


class LLMClient:
    """`complete(prompt, ...)` -> Answer, from the cache or the endpoint. Thread-safe."""

    def __init__(self, endpoint: EndpointConfig, cache: RequestCache) -> None:
        self.endpoint = endpoint
        self.cache = cache
        self.url = endpoint.base_url.rstrip("/") + ("/chat/completions" if endpoint.api == "chat" else "/completions")
        headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise PhitrainError(f"endpoint.api_key_env: environment variable {endpoint.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=endpoint.concurrency, max_keepalive_connections=endpoint.concurrency)
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(endpoint.timeout_s), limits=limits)
        self.counters = Counters()
        self.abort = threading.Event()
        self._rate = _RateLimit(endpoint.rate_limit, self.abort)
        self._jitter = random.Random()

    def payload(self, prompt: str, system: str | None, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.endpoint.model, "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": seed}
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if self.endpoint.api == "chat":
            body["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = f"{system}\n\n{prompt}" if system else prompt
        return body

    def key(self, body: dict[str, Any]) -> str:
        canonical = json.dumps({"api": self.endpoint.api, **body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def complete(self, prompt: str, system: str | None, sampling: SamplingConfig, seed: int) -> Answer:
        body = self.payload(prompt, system, sampling, seed)
        key = self.key(body)
        hit = self.cache.get(key)
        if hit is not None:
            self.counters.add(cache_hits=1, cached_prompt_tokens=hit.prompt_tokens,
                              cached_completion_tokens=hit.completion_tokens)
            return hit
        answer = self._send(body)
        self.cache.put(key, answer)
        self.counters.add(sent=1, prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
        return answer

    def _send(self, body: dict[str, Any]) -> Answer:
        ep = self.endpoint
        problem = ""
        for attempt in range(ep.max_retries + 1):
            if self.abort.is_set():
                raise Aborted
            self._rate.wait()
            self.counters.add(attempts=1)
            try:
                return self._post(body)
            except _Retryable as err:
                problem = str(err)
                if attempt == ep.max_retries:
                    break
                delay = min(ep.backoff_max_s, ep.backoff_s * 2 ** attempt) * self._jitter.uniform(0.5, 1.5)
                if err.retry_after is not None:
                    delay = min(ep.backoff_max_s, err.retry_after)
                self.counters.add(retries=1)
                if self.abort.wait(delay):
                    raise Aborted from None
        raise PhitrainError(
            f"endpoint {self.url}: {problem}; gave up after {ep.max_retries + 1} attempts "
            f"(endpoint.max_retries={ep.max_retries}). {len(self.cache)} answers are kept in {self.cache.path}: "
            "run the same command again to continue from them")

    def _post(self, body: dict[str, Any]) -> Answer:
        try:
            resp = self._http.post(self.url, json=body)
        except httpx.TimeoutException:
            raise _Retryable(f"no answer within endpoint.timeout_s={self.endpoint.timeout_s:g} s") from None
        except httpx.TransportError as err:
            raise _Retryable(f"cannot connect ({type(err).__name__}: {err})") from None
        if resp.status_code == 429 or resp.status_code == 408 or resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code} {resp.reason_phrase}: {_snippet(resp.text)}",
                             _retry_after(resp.headers.get("retry-after")))
        if resp.status_code != 200:
            raise PhitrainError(f"endpoint {self.url}: HTTP {resp.status_code} {resp.reason_phrase}: "
                                f"{_snippet(resp.text)} (not retried: check endpoint.model, api and api_key_env)")
        return self._parse(resp)

    def _parse(self, resp: httpx.Response) -> Answer:
        try:
            reply = resp.json()
        except ValueError:
            raise _Retryable(f"malformed answer, not JSON: {_snippet(resp.text)!r}") from None
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.endpoint.api == "chat" else choice["text"]
            text = "" if text is None else text      # a null content (a refusal) is an empty answer
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            field_name = "choices[0].message.content" if self.endpoint.api == "chat" else "choices[0].text"
            raise _Retryable(f"malformed answer without a string {field_name}: {_snippet(resp.text)!r}") from None
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int):
            self.counters.add(usage_missing=1)
            prompt_tokens = prompt_tokens if isinstance(prompt_tokens, int) else 0
            completion_tokens = completion_tokens if isinstance(completion_tokens, int) else 0
        return Answer(text, choice.get("finish_reason"), prompt_tokens, completion_tokens, cached=False)

    def close(self) -> None:
        self._http.close()


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
