"""The OpenAI request shapes `phitrain serve` accepts, and the chat template.

Requests are validated strictly: a field phitrain does not implement (`logprobs`, `logit_bias`, `tools`,
penalties other than 0, `n` other than 1, ...) is a 400 naming that field rather than silently ignored,
so a client never gets output computed differently from what it asked for. `null` means the default, as
in OpenAI's API. Extensions beyond OpenAI's fields are vLLM's names: `top_k` and `ignore_eos`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from phitrain.serve.engine import SamplingParams

# Phi-4's chat format (the phi-4 tokenizer's <|im_start|>/<|im_sep|>/<|im_end|>), rendered as plain text.
CHAT_START, CHAT_SEP, CHAT_END = "<|im_start|>", "<|im_sep|>", "<|im_end|>"


def render_chat(messages: list[ChatMessage]) -> str:
    """`<|im_start|>{role}<|im_sep|>{content}<|im_end|>` per message, then `<|im_start|>assistant<|im_sep|>`
    for the reply, which ends at `<|im_end|>` (a stop string) or `<|endoftext|>`.

    This is Phi-4's format (Phi-4 report §4). phitrain's tokenizers never turn text into special tokens,
    so the markers are encoded as ordinary text; a model learns them from chat data formatted this way.
    The `developer` role is written as `system`, which is what it replaced in OpenAI's API.
    """
    parts = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        parts.append(f"{CHAT_START}{role}{CHAT_SEP}{m.text()}{CHAT_END}")
    return "".join(parts) + f"{CHAT_START}assistant{CHAT_SEP}"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="extension: sample from the k most likely tokens; -1 = all")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1, description="any 64-bit value (torch's range)")
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="extension: keep generating past <|endoftext|>")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, description="accepted and ignored")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 1:
            raise ValueError("top_k must be >= 1, or -1 for no limit")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported; send the request again for more samples")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported; leave it at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, max_tokens: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=None if self.top_k in (None, -1) else self.top_k,
            top_p=None if self.top_p in (None, 1.0) else self.top_p,
            seed=self.seed,
            stop=self.stops() + extra_stops,
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `prompt` is a string, a list of strings (one choice each), a list of token
    ids, or a list of such lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1, description="default 16, as OpenAI's")
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any):
        """One clear message instead of one error per member of the union."""
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")

        def ids(x):
            return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

        if not (isinstance(v, str) or ids(v) or (isinstance(v, list) and (
                all(isinstance(x, str) for x in v) or all(ids(x) for x in v)))):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                             "or a list of token-id lists")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, description="accepted and ignored")

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any):
        if isinstance(v, list):
            kinds = {part.get("type") for part in v if isinstance(part, dict)} - {"text"}
            if kinds:
                raise ValueError(f"only text content parts are supported, got {', '.join(map(str, kinds))}")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. Without max_tokens the reply may use the rest of the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
