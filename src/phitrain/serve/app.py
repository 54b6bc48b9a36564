"""`phitrain serve`: an OpenAI-compatible HTTP server over the batching engine.

FastAPI on uvicorn: the request bodies are the pydantic models of `protocol` (validated before a handler
runs, their schema published at /docs), and asyncio lets many clients, streaming ones included, wait on
one engine thread without a thread each. Handlers tokenize and validate, hand sequences to the
`Scheduler`, and await the engine's events through an asyncio queue that the engine thread fills with
`call_soon_threadsafe`. uvicorn stops on SIGINT/SIGTERM after in-flight responses finish (or 5 s).

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
(including malformed JSON and fields phitrain does not implement), 404 for an unknown model or path,
500 if generation itself fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from phitrain.errors import PhitrainError
from phitrain.serve.engine import BatchEngine, Event, SamplingParams, Scheduler, Sequence
from phitrain.serve.protocol import (CHAT_END, ChatCompletionRequest, CompletionRequest, SamplingRequest,
                                     render_chat)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# pydantic tags union members in error locations ("str", "list[int]"); they are not request fields
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _validation_error(errors) -> ApiError:
    """The first pydantic error as one readable sentence naming the field."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if isinstance(x, int) or (x != "body" and x.isidentifier()
                                                                        and x not in _UNION_TAGS)]
    param = ".".join(loc) or None
    kind = err.get("type")
    if kind == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported parameter {param!r}", param)
    if kind == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param)
    msg = str(err["ctx"]["error"]) if kind == "value_error" else err["msg"]
    return ApiError(400, f"{param}: {msg}" if param else msg, param)


class _CountRequests:
    """Pure ASGI middleware counting requests and error responses by path for /stats (synth's tests
    count what reached the server with it); streaming bodies pass through untouched."""

    def __init__(self, app, requests: Counter, rejected: Counter):
        self.app, self.requests, self.rejected = app, requests, rejected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        self.requests[path] += 1

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.rejected[path] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class _Service:
    """What the routes share: the model's limits, the scheduler, and the request → sequences bridge."""

    def __init__(self, model, tokenizer, name: str, max_batch_size: int, compile: bool):
        self.name, self.tokenizer = name, tokenizer
        self.context = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.engine = BatchEngine(model, tokenizer, max_batch_size, compile=compile)
        self.scheduler = Scheduler(self.engine)
        self.created = int(time.time())
        self.requests: Counter = Counter()
        self.rejected: Counter = Counter()

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r} "
                                "(see /v1/models)", "model", "model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; an empty text prompt becomes `<|endoftext|>`, as in `complete`."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                           "prompt")
        return prompt

    def sampling(self, body: SamplingRequest, prompt: list[int], max_tokens: int,
                 extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        """The sequence's parameters, refusing (like OpenAI) a request that does not fit the context."""
        if len(prompt) + max_tokens > self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens, but the "
                                f"request needs {len(prompt) + max_tokens} ({len(prompt)} in the prompt, "
                                f"{max_tokens} for the completion); shorten the prompt or lower max_tokens",
                           "max_tokens", "context_length_exceeded")
        return body.sampling(max_tokens, extra_stops)

    async def run(self, prompts: list[list[int]], params: list[SamplingParams],
                  stream: bool) -> AsyncIterator[tuple[int, Event]]:
        """Submit one sequence per prompt and yield (prompt index, event) until all have finished.
        Leaving early (client gone, an error) cancels the sequences still running."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def deliver(i: int):
            def put(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))
            return put

        seqs = [Sequence(p, sp, deliver(i), stream) for i, (p, sp) in enumerate(zip(prompts, params))]
        self.scheduler.submit(seqs)
        left = len(seqs)
        try:
            while left:
                i, event = await events.get()
                if event.error:
                    raise ApiError(500, event.error, kind="server_error")
                left -= event.finish_reason is not None
                yield i, event
        finally:
            for seq in seqs:
                seq.cancelled = True

    async def collect(self, prompts, params) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion tokens) per prompt."""
        texts, ends = [""] * len(prompts), [("", 0)] * len(prompts)
        async with contextlib.aclosing(self.run(prompts, params, stream=False)) as events:
            async for i, event in events:
                texts[i] += event.text
                if event.finish_reason:
                    ends[i] = (event.finish_reason, event.completion_tokens)
        return [(text, *end) for text, end in zip(texts, ends)]

    def stats(self) -> dict:
        return {"model": self.name, "requests": dict(self.requests), "rejected": dict(self.rejected),
                "running": len(self.engine.rows), "waiting": len(self.engine.waiting),
                **self.engine.stats.snapshot()}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, an error object if generation fails, `data: [DONE]`."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model, tokenizer, name: str, max_batch_size: int = 32, compile: bool = False) -> FastAPI:
    """The FastAPI app serving `model` as `name`; its lifespan starts and stops the engine thread."""
    svc = _Service(model, tokenizer, name, max_batch_size, compile)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        svc.scheduler.start()
        try:
            yield
        finally:
            svc.scheduler.close()

    app = FastAPI(title="phitrain serve", lifespan=lifespan)
    app.add_middleware(_CountRequests, requests=svc.requests, rejected=svc.rejected)

    @app.exception_handler(ApiError)
    async def api_error(_req: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, err: RequestValidationError):
        return await api_error(_req, _validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(req: Request, err: HTTPException):
        return await api_error(req, ApiError(err.status_code, f"{req.method} {req.url.path}: {err.detail}"))

    def model_card() -> dict:
        return {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "phitrain",
                "max_model_len": svc.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str):
        svc.check_model(model)
        return model_card()

    @app.get("/stats")
    async def stats():
        """Not OpenAI: requests and errors by path, tokens, and batching (a batch is one decode step)."""
        return svc.stats()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        svc.check_model(body.model)
        prompts = [svc.encode(p) for p in body.prompts()]
        params = [svc.sampling(body, p, body.max_tokens or DEFAULT_COMPLETION_TOKENS) for p in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": svc.name}
        n_prompt = sum(map(len, prompts))

        def choice(i: int, text: str, reason: str | None) -> dict:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

        if body.stream:
            async def chunks():
                generated = 0
                async with contextlib.aclosing(svc.run(prompts, params, stream=True)) as events:
                    async for i, event in events:
                        generated += event.completion_tokens
                        if event.text or event.finish_reason:
                            yield {**head, "choices": [choice(i, event.text, event.finish_reason)]}
                if body.include_usage:
                    yield {**head, "choices": [], "usage": _usage(n_prompt, generated)}
            return _sse(chunks())
        results = await svc.collect(prompts, params)
        return {**head, "choices": [choice(i, *r[:2]) for i, r in enumerate(results)],
                "usage": _usage(n_prompt, sum(r[2] for r in results))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        svc.check_model(body.model)
        prompt = svc.encode(render_chat(body.messages))
        limit = body.token_limit or max(1, svc.context - len(prompt))
        params = svc.sampling(body, prompt, limit, extra_stops=(CHAT_END,))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.name}

        if body.stream:
            def chunk(delta: dict, reason: str | None = None) -> dict:
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

            async def chunks():
                generated = 0
                yield chunk({"role": "assistant", "content": ""})
                async with contextlib.aclosing(svc.run([prompt], [params], stream=True)) as events:
                    async for _, event in events:
                        if event.text:
                            yield chunk({"content": event.text})
                        if event.finish_reason:
                            yield chunk({}, event.finish_reason)
                            generated = event.completion_tokens
                if body.include_usage:
                    yield {**head, "object": "chat.completion.chunk", "choices": [],
                           "usage": _usage(len(prompt), generated)}
            return _sse(chunks())
        [(text, reason, generated)] = await svc.collect([prompt], [params])
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}],
                "usage": _usage(len(prompt), generated)}

    return app


# ---- loading and running -----------------------------------------------------------------------------

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_for_serving(source: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, device, dtype name) from a phitrain checkpoint or a transformers directory.

    A transformers directory is converted with `phitrain.interop.hf.import_hf` into a temporary
    checkpoint, loaded, and the temporary files deleted. `auto` picks CUDA when there is one, and bf16 on
    a GPU that supports it, else the checkpoint's float32 (what `phitrain generate` computes in).
    """
    import torch

    from phitrain.checkpoint import CONFIG_FILE, load_checkpoint
    from phitrain.device import resolve_device

    device = resolve_device(device)
    if dtype not in _DTYPES:
        raise PhitrainError(f"--dtype {dtype}: expected one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    torch_dtype = getattr(torch, dtype)
    path = Path(source)
    if not path.is_dir():
        raise PhitrainError(f"{path}: directory does not exist")
    if (path / CONFIG_FILE).is_file():
        model, tokenizer = load_checkpoint(path, device=device, dtype=torch_dtype)
    elif (path / "config.json").is_file():
        from phitrain.interop.hf import import_hf

        with tempfile.TemporaryDirectory(prefix="phitrain-serve-") as tmp:
            import_hf(path, Path(tmp) / "checkpoint")
            model, tokenizer = load_checkpoint(Path(tmp) / "checkpoint", device=device, dtype=torch_dtype)
    else:
        raise PhitrainError(f"{path}: neither a phitrain checkpoint ({CONFIG_FILE}) nor a transformers "
                            "directory (config.json)")
    if tokenizer is None:
        raise PhitrainError(f"{path}: no tokenizer to read prompts with (a phitrain checkpoint needs "
                            "tokenizer/, a transformers directory tokenizer.json)")
    return model, tokenizer, device, dtype


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts so that `--port 0` can report its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise PhitrainError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
          device: str = "auto", dtype: str = "auto", model_name: str | None = None, compile: bool = True) -> None:
    """Load `source` and serve it until SIGINT/SIGTERM; prints one line with the URL when ready.
    `compile`: decode with the compiled step (the first requests pay for compiling it)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise PhitrainError(f"--port {port}: expected 0..65535 (0 picks a free port)")
    if max_batch_size < 1:
        raise PhitrainError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    # Only the engine's thread may run torch's parallel regions. With GNU OpenMP (torch's CPU threads) a
    # thread that has run one keeps its own pool of worker threads, and while the main thread's idle pool
    # exists the engine thread's compiled kernels ran 2-4x slower (a served decode step of phi-1-tiny
    # 3.7 vs 1.25 ms). Loading on a thread of its own, whose pool ends with it, keeps the main thread out.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="phitrain-serve-load") as loader:
        model, tokenizer, device, dtype = loader.submit(load_for_serving, source, device, dtype).result()
    name = model_name or str(source)
    app = create_app(model, tokenizer, name, max_batch_size, compile)
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/v1"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    print(f"phitrain serve: {name} ({model.num_params() / 1e6:.1f}M parameters, {device} {dtype}, batches "
          f"of up to {max_batch_size}{', compiled decode' if compile else ''}) at {url} ; Ctrl-C stops",
          flush=True)
    # uvicorn shuts down on SIGINT/SIGTERM, then re-raises the signal to the handler it found; a no-op
    # handler here makes that a normal return instead of a KeyboardInterrupt or a kill.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    print("phitrain serve: stopped", flush=True)
