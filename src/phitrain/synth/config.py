"""Typed `phitrain synth` recipes: endpoint, sampling, generators with their templates and diversity variables.

A recipe is validated before any request is sent, so a typo (`topcs:`), a template placeholder no
generator knows (`{audiance}`) or a variable no template uses is one error naming the generator and the
field, not hours of generation with a silently ignored setting. Templates use Python's `{name}`
placeholders (write `{{` / `}}` for literal braces).
"""

from __future__ import annotations

import string
from typing import Annotated, Literal

from pydantic import Field, model_validator

from phitrain.config import Config
from phitrain.eval.sandbox import SandboxConfig
from phitrain.synth import prompts


class EndpointConfig(Config):
    """Any OpenAI-compatible server: OpenAI, vLLM, SGLang, llama.cpp's server, TGI, `phitrain serve`.

    `api` picks `/chat/completions` (instruction-tuned models) or `/completions` (base models: the system
    text, if any, is put before the prompt). The API key is read from the environment variable
    `api_key_env`, never from the recipe. Failed requests (HTTP 429/5xx, timeouts, refused connections,
    malformed JSON) are retried `max_retries` times, waiting `backoff_s` × 2^attempt (capped at
    `backoff_max_s`, ±50% jitter, or the server's Retry-After); `rate_limit` caps requests per minute."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str
    api: Literal["chat", "completions"] = "chat"
    api_key_env: str | None = None
    concurrency: int = Field(8, ge=1, le=1024)
    max_retries: int = Field(4, ge=0, le=100)
    timeout_s: float = Field(300.0, gt=0)
    backoff_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    rate_limit: float | None = Field(None, gt=0, description="requests per minute")

    @model_validator(mode="after")
    def _check(self) -> "EndpointConfig":
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


class SamplingConfig(Config):
    """Sampling defaults. Cosmopedia used temperature 0.6 and top_p 0.95. `seed` seeds the plan (which
    variables each item gets) and, through a per-item seed derived from it, every request."""

    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(1024, gt=0)
    seed: int = 0
    stop: list[str] = []


class SamplingOverride(Config):
    """Per-generator changes to the recipe's sampling defaults; unset fields keep the default."""

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    seed: int | None = None
    stop: list[str] | None = None


class CorpusConfig(Config):
    """Seed documents: files, directories (walked recursively, filtered by `include` on the file name),
    glob patterns, `.jsonl`/`.jsonl.gz`/`.parquet` files (one document per record's `text_field`), and
    `stdlib:NAME` for a module or package of the installed Python standard library (`stdlib:` alone is all
    of it). Each document is cut to `max_chars` (Cosmopedia used 1,000-character web extracts)."""

    paths: list[str] = Field(min_length=1)
    include: list[str] = ["*"]
    text_field: str = "text"
    max_docs: int | None = Field(None, gt=0)
    max_chars: int = Field(1000, gt=0)


class CodeCorpusConfig(Config):
    """Code to reverse (Phi-4 §2 instruction reversal): `.jsonl`/`.parquet` records with the code in
    `code_field` and, optionally, tests defining `check(candidate)` in `test_field` and the function's
    name in `entry_point_field` (HumanEval's layout); or `.py` files / directories / `stdlib:NAME`, whose
    top-level functions of `min_lines`..`max_lines` lines become items without tests."""

    paths: list[str] = Field(min_length=1)
    include: list[str] = ["*.py", "*.jsonl", "*.jsonl.gz", "*.parquet"]
    code_field: str = "code"
    test_field: str = "test"
    entry_point_field: str = "entry_point"
    min_lines: int = Field(3, gt=0)
    max_lines: int = Field(60, gt=0)
    max_docs: int | None = Field(None, gt=0)


class ReviseConfig(Config):
    """Self-revision (Phi-4 §2): a critique of the draft against `rubric`, then a rewrite that answers the
    critique, `rounds` times. It revises the artefact the rest of the item builds on — the document
    (textbook, rewrite), the exercise statement, the reversed instruction, the long document's outline —
    so verification always checks the revised version."""

    rubric: str = prompts.RUBRIC
    rounds: int = Field(1, ge=1, le=5)
    critique_template: str = prompts.CRITIQUE
    rewrite_template: str = prompts.REWRITE


class _Generator(Config):
    """Fields every kind has. `templates` are the main prompt (the template chosen for an item is one
    more diversity variable); `variables` adds named lists of values whose product with the kind's own
    lists (topics, audiences, styles, ...) is the grid items are drawn from."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    n: int = Field(gt=0)
    templates: list[str] | None = None
    system: str | None = None
    variables: dict[str, list[str]] = {}
    sampling: SamplingOverride = SamplingOverride()
    revise: ReviseConfig | None = None
    min_chars: int = Field(0, ge=0, description="drop outputs shorter than this (Cosmopedia dropped <150 tokens)")

    # -- what each kind contributes; overridden below --------------------------------------------
    def default_templates(self) -> list[str]:
        raise NotImplementedError

    def own_axes(self) -> dict[str, tuple[str, ...]]:
        """Placeholder name -> the fields that supply its values (only for axes this kind has)."""
        return {}

    def extra_templates(self) -> dict[str, tuple[str, set[str]]]:
        """Other prompts of the kind: field -> (template, placeholders it may use beyond the axes)."""
        return {}

    def main_templates(self) -> list[str]:
        return self.templates if self.templates is not None else self.default_templates()

    def axis_names(self) -> list[str]:
        """The diversity axes that some main template uses, in a fixed order (the plan's grid)."""
        used = set().union(*(_placeholders(t) for t in self.main_templates()))
        names = [a for a in self.own_axes() if a in used] + [v for v in self.variables if v in used]
        for derived, source in self.derived().items():
            if derived in used and source not in names:
                names.append(source)
        return names

    def derived(self) -> dict[str, str]:
        """Placeholders computed from an axis value (e.g. a rewrite format's instructions)."""
        return {}

    @model_validator(mode="after")
    def _check_templates(self) -> "_Generator":
        if self.templates is not None and not self.templates:
            raise ValueError("templates: give at least one template (or leave it out for the built-in ones)")
        reserved = set(self.own_axes()) | set(self.derived()) | {"draft", "rubric", "critique"}
        reserved |= set().union(*(extra for _, extra in self.extra_templates().values()))
        clash = sorted(set(self.variables) & reserved)
        if clash:
            raise ValueError(f"variables: {clash} clash with the {self.kind} generator's own placeholders")
        for name, values in self.variables.items():
            if not values:
                raise ValueError(f"variables.{name}: give at least one value")
        axes = set(self.own_axes()) | set(self.variables) | set(self.derived())
        used: set[str] = set()
        for i, template in enumerate(self.main_templates()):
            names = _placeholders(template, f"templates.{i}")
            unknown = sorted(names - axes)
            if unknown:
                raise ValueError(f"templates.{i}: unknown placeholder(s) {unknown}; known: {sorted(axes)}")
            used |= names
        active = set(self.axis_names())
        active |= {d for d, source in self.derived().items() if source in active}
        checks = dict(self.extra_templates())
        if self.revise is not None:
            for field in ("critique_template", "rewrite_template"):
                checks[f"revise.{field}"] = (getattr(self.revise, field), {"draft", "rubric", "critique"})
        for field, (template, extra) in checks.items():
            unknown = sorted(_placeholders(template, field) - active - extra)
            if unknown:
                raise ValueError(f"{field}: unknown placeholder(s) {unknown}; known here: {sorted(active | extra)} "
                                 "(an axis is known when a main template uses it)")
        unused = [v for v in self.variables if v not in used]
        unused += [f for a, fs in self.own_axes().items() if a not in used and a not in self.derived().values()
                   for f in fs if f in self.model_fields_set]
        if unused:
            raise ValueError(f"{sorted(set(unused))} given but no template uses them; add the placeholder or remove them")
        return self


def _placeholders(template: str, where: str = "template") -> set[str]:
    """Field names of a `{name}` template; positional `{}`, indexing and attribute access are refused."""
    names = set()
    try:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            if not field.isidentifier():
                raise ValueError(f"{where}: placeholder {{{field}}} must be a plain name (write {{{{ for a brace)")
            names.add(field)
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: not a valid template: {err} (write {{{{ and }}}} for literal braces)") from None
    return names


TOPIC_FIELDS = ("topics", "topics_file", "topics_from")


class _TopicsMixin(Config):
    """Where topics come from: a list, a file (one per line), and/or names mined from a corpus (module,
    class and function names of Python files; headings of Markdown; phi-1.5 used 20K topics)."""

    topics: list[str] = []
    topics_file: str | None = None
    topics_from: CorpusConfig | None = None

    def has_topics(self) -> bool:
        return bool(self.topics or self.topics_file or self.topics_from)


class TextbookGenerator(_TopicsMixin, _Generator):
    """phi-1 §2.2 CodeTextbook / Cosmopedia: topic × audience × style (× an optional seed passage). The
    default audiences and styles say how they differ, because Cosmopedia found that swapping one word of a
    prompt still gave near-duplicates."""

    kind: Literal["textbook"]
    audiences: list[str] = Field(default_factory=lambda: list(prompts.AUDIENCES), min_length=1)
    styles: list[str] = Field(default_factory=lambda: list(prompts.STYLES), min_length=1)
    seeds: CorpusConfig | None = None

    def default_templates(self) -> list[str]:
        if self.seeds is None:
            return list(prompts.TEXTBOOK)
        return list(prompts.TEXTBOOK_SEEDED_TOPIC if self.has_topics() else prompts.TEXTBOOK_SEEDED)

    def own_axes(self) -> dict[str, tuple[str, ...]]:
        return {"topic": TOPIC_FIELDS, "audience": ("audiences",), "style": ("styles",), "seed": ("seeds",)}

    @model_validator(mode="after")
    def _check(self) -> "TextbookGenerator":
        _check_axis_sources(self, self.has_topics(), self.seeds is not None)
        return self


class ExercisesGenerator(_TopicsMixin, _Generator):
    """phi-1 §2.2 CodeExercises: a function signature + docstring (diversity from constrained topics and
    function names), then a body from one agent and `check(candidate)` tests from another (Phi-4 §2's
    multi-agent prompting); kept only if the body passes the tests in the sandbox (Phi-4: code validated
    by execution)."""

    kind: Literal["exercises"]
    function_names: list[str] = []
    solve_template: str = prompts.EXERCISE_SOLVE
    test_template: str = prompts.EXERCISE_TESTS

    def default_templates(self) -> list[str]:
        return list(prompts.EXERCISE if self.function_names else prompts.EXERCISE_FREE_NAME)

    def own_axes(self) -> dict[str, tuple[str, ...]]:
        return {"topic": TOPIC_FIELDS, "function_name": ("function_names",)}

    def extra_templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"solve_template": (self.solve_template, {"exercise", "entry_point"}),
                "test_template": (self.test_template, {"exercise", "entry_point"})}

    @model_validator(mode="after")
    def _check(self) -> "ExercisesGenerator":
        _check_axis_sources(self, self.has_topics(), bool(self.function_names))
        bad = [f for f in self.function_names if not f.isidentifier()]
        if bad:
            raise ValueError(f"function_names: {bad} are not Python identifiers")
        return self


REWRITE_FORMATS = ("textbook", "qa", "exercise", "discussion")


class RewriteGenerator(_Generator):
    """Phi-4 §2 web rewrites: a seed document rewritten into a chosen format. `formats` picks among the
    built-in textbook / qa / exercise / discussion instructions and any added in `format_instructions`
    (name -> instruction, which may also replace a built-in one)."""

    kind: Literal["rewrite"]
    seeds: CorpusConfig
    formats: list[str] = Field(default_factory=lambda: list(REWRITE_FORMATS), min_length=1)
    format_instructions: dict[str, str] = {}

    def default_templates(self) -> list[str]:
        return list(prompts.REWRITE_SEED)

    def own_axes(self) -> dict[str, tuple[str, ...]]:
        return {"seed": ("seeds",), "format": ("formats",)}

    def derived(self) -> dict[str, str]:
        return {"instructions": "format"}

    def instructions(self) -> dict[str, str]:
        return {**prompts.REWRITE_FORMATS, **self.format_instructions}

    @model_validator(mode="after")
    def _check(self) -> "RewriteGenerator":
        unknown = sorted(set(self.formats) - set(self.instructions()))
        if unknown:
            raise ValueError(f"formats: {unknown} have no instructions; built-in: {list(REWRITE_FORMATS)}, "
                             "or add them under format_instructions")
        if "seed" not in self.axis_names():
            raise ValueError("templates: a rewrite template must use {seed}")
        return self


class CodeReversalGenerator(_Generator):
    """Phi-4 §2 instruction reversal: code → an instruction → code regenerated from the instruction alone.
    The (instruction, original code) pair is kept when the regenerated code passes the original's tests,
    or, where there are none, when its AST-normalised similarity to the original is at least
    `similarity_threshold` (the phi-1 §5 normalisation: identifiers renamed, docstrings and layout
    ignored)."""

    kind: Literal["code_reversal"]
    code: CodeCorpusConfig
    similarity_threshold: float = Field(0.8, gt=0, le=1)
    regenerate_template: str = prompts.REVERSAL_REGENERATE

    def default_templates(self) -> list[str]:
        return list(prompts.REVERSAL_INSTRUCTION)

    def own_axes(self) -> dict[str, tuple[str, ...]]:
        return {"code": ("code",)}

    def extra_templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"regenerate_template": (self.regenerate_template, {"instruction", "entry_point"})}

    @model_validator(mode="after")
    def _check(self) -> "CodeReversalGenerator":
        if "code" not in self.axis_names():
            raise ValueError("templates: a code_reversal template must use {code}")
        return self


class LongGenerator(_TopicsMixin, _Generator):
    """Phi-4 §3 midtraining's synthetic long-context data (>4K tokens): an outline first, then one request
    per section (given the outline and the end of the text so far), concatenated until the document
    reaches `min_tokens` in `tokenizer`; a document that runs out of sections first is rejected."""

    kind: Literal["long"]
    audiences: list[str] = Field(default_factory=lambda: list(prompts.AUDIENCES), min_length=1)
    styles: list[str] = Field(default_factory=lambda: list(prompts.STYLES), min_length=1)
    min_tokens: int = Field(4096, gt=0)
    tokenizer: str = "cl100k_base"
    max_sections: int = Field(12, gt=0)
    context_chars: int = Field(2000, ge=0, description="end of the text so far shown with each section prompt")
    section_template: str = prompts.LONG_SECTION

    def default_templates(self) -> list[str]:
        return list(prompts.LONG_OUTLINE)

    def own_axes(self) -> dict[str, tuple[str, ...]]:
        return {"topic": TOPIC_FIELDS, "audience": ("audiences",), "style": ("styles",)}

    def extra_templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"section_template": (self.section_template, {"outline", "section", "number", "previous"})}

    @model_validator(mode="after")
    def _check(self) -> "LongGenerator":
        _check_axis_sources(self, self.has_topics(), False)
        return self


def _check_axis_sources(gen: _Generator, has_topics: bool, has_alternative: bool) -> None:
    """Every axis a template uses must have values; a generator needs at least one real axis."""
    used = set(gen.axis_names())
    if "topic" in used and not has_topics:
        raise ValueError("templates use {topic}: give topics, topics_file or topics_from")
    if "seed" in used and getattr(gen, "seeds", None) is None:
        raise ValueError("templates use {seed}: give seeds (a corpus of seed passages)")
    if "function_name" in used and not getattr(gen, "function_names", None):
        raise ValueError("templates use {function_name}: give function_names")
    if not has_topics and not has_alternative and not gen.variables:
        raise ValueError("give topics, topics_file or topics_from")


Generator = Annotated[TextbookGenerator | ExercisesGenerator | RewriteGenerator | CodeReversalGenerator
                      | LongGenerator, Field(discriminator="kind")]


class OutputConfig(Config):
    """`DIR/<generator>.parquet` or `.jsonl`: one record per kept item, `text` plus metadata columns."""

    format: Literal["parquet", "jsonl"] = "parquet"


class ReportConfig(Config):
    """Diversity report settings: MinHash near-duplicate threshold (Jaccard of word 5-gram shingles), and
    how many opening words count as an item's "opening"."""

    minhash_threshold: float = Field(0.7, gt=0, le=1)
    shingle_size: int = Field(5, gt=0)
    num_perm: int = Field(128, gt=0)
    opening_words: int = Field(6, gt=0)
    top_openings: int = Field(10, gt=0)


class SynthRecipe(Config):
    """What `phitrain synth RECIPE.yaml --out DIR` runs. `cache` (default `DIR/cache.sqlite`) holds every
    answered request; point several output directories at one file to share it."""

    name: str = "synth"
    endpoint: EndpointConfig
    sampling: SamplingConfig = SamplingConfig()
    generators: list[Generator] = Field(min_length=1)
    output: OutputConfig = OutputConfig()
    report: ReportConfig = ReportConfig()
    sandbox: SandboxConfig = SandboxConfig()
    cache: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SynthRecipe":
        names = [g.name for g in self.generators]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"generators: duplicate names {dup}")
        return self

    def sampling_for(self, gen: _Generator) -> SamplingConfig:
        return self.sampling.model_copy(update=gen.sampling.model_dump(exclude_none=True))
