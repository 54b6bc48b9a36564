"""The generator kinds: what requests one item makes and what it keeps.

Each kind is a function of one planned item that asks its questions in order through `Ask` (which fills
the template with the item's variables and the answers so far, and goes through the cached client), and
returns a `Draft`: the text to keep, or the reason it was rejected, plus the program to execute when the
kind is verified by running code. Execution happens afterwards for all drafts of a generator at once, in
the sandbox (`phitrain.eval.sandbox`), so the endpoint and the sandbox never compete for the same slots.

- textbook (phi-1 §2.2 CodeTextbook, Cosmopedia): one request per item (+ self-revision);
- rewrite (Phi-4 §2 web rewrites): one request per item (+ self-revision);
- exercises (phi-1 §2.2 CodeExercises, Phi-4 multi-agent prompting): statement → solution and tests from
  two separate requests → executed;
- code_reversal (Phi-4 instruction reversal): code → instruction → regenerated code → executed against
  the original's tests, or compared by AST similarity;
- long (Phi-4 §3 long-context midtraining data): outline → sections until `min_tokens`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from phitrain.eval.sandbox import Program
from phitrain.synth.client import LLMClient
from phitrain.synth.config import (CodeReversalGenerator, ExercisesGenerator, LongGenerator, RewriteGenerator,
                                   SamplingConfig, _Generator)
from phitrain.synth.corpus import CodeItem
from phitrain.synth.plan import Item
from phitrain.synth.verify import ast_similarity, code_block, top_level_function


@dataclass
class Draft:
    """One item's outcome: kept, or rejected for `reason` ("category: detail"; its text is kept for
    inspection in the rejected file)."""

    index: int
    text: str = ""
    reason: str = ""
    fields: dict[str, Any] = field(default_factory=dict)   # kind-specific metadata columns
    program: Program | None = None                         # to execute; kept only if it passes
    verification: str | None = None
    critiques: list[str] = field(default_factory=list)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0                                     # answers cut short by max_tokens

    @property
    def kept(self) -> bool:
        return not self.reason

    def reject(self, reason: str) -> "Draft":
        self.reason = reason
        self.program = None
        return self


@dataclass
class Job:
    """A generator ready to run: its config, the values of each axis, the plan, and what the kinds need."""

    gen: _Generator
    values: dict[str, list[str]]                # axis -> values ("template" -> template indices)
    items: list[Item]
    sampling: SamplingConfig
    code_items: dict[str, CodeItem] = field(default_factory=dict)
    count_tokens: Callable[[str], int] | None = None

    def variables(self, item: Item) -> dict[str, str]:
        return {axis: self.values[axis][k] for axis, k in item.cell if axis != "template"}

    def template(self, item: Item) -> str:
        return self.gen.main_templates()[item.value_index("template")]


class Ask:
    """Sends the item's prompts: a template filled with the item's variables (and derived values such as a
    rewrite format's instructions) plus the step's own values, at the item's seed."""

    def __init__(self, job: Job, item: Item, client: LLMClient, draft: Draft) -> None:
        self.job, self.item, self.client, self.draft = job, item, client, draft
        self.context = job.variables(item)
        if isinstance(job.gen, RewriteGenerator) and "format" in self.context:
            self.context["instructions"] = job.gen.instructions()[self.context["format"]]

    def __call__(self, template: str, **step: Any) -> str:
        prompt = template.format(**self.context, **step)
        answer = self.client.complete(prompt, self.job.gen.system, self.job.sampling, self.item.seed)
        self.draft.requests += 1
        self.draft.prompt_tokens += answer.prompt_tokens
        self.draft.completion_tokens += answer.completion_tokens
        self.draft.truncated += answer.finish_reason == "length"
        return answer.text

    def revise(self, text: str) -> str:
        """Phi-4 §2 self-revision: critique against the rubric, then rewrite, `rounds` times."""
        cfg = self.job.gen.revise
        if cfg is None:
            return text
        for _ in range(cfg.rounds):
            critique = self(cfg.critique_template, draft=text, rubric=cfg.rubric)
            self.draft.critiques.append(critique)
            text = self(cfg.rewrite_template, draft=text, rubric=cfg.rubric, critique=critique)
        return text


def _document(job: Job, ask: Ask, draft: Draft) -> Draft:
    """textbook and rewrite: one answer is the document."""
    draft.text = ask.revise(ask(job.template(ask.item))).strip()
    return draft


def _exercises(job: Job, ask: Ask, draft: Draft) -> Draft:
    gen = job.gen
    assert isinstance(gen, ExercisesGenerator)
    statement = code_block(ask.revise(ask(job.template(ask.item))))
    wanted = ask.context.get("function_name")
    fn = top_level_function(statement, wanted)
    draft.fields = {"exercise": statement, "tests": None, "entry_point": wanted or (fn.name if fn else None)}
    if fn is None:
        return draft.reject("bad exercise: " + (f"does not define function `{wanted}`" if wanted
                                                else "no Python function in the answer"))
    entry = fn.name
    solution = code_block(ask(gen.solve_template, exercise=statement, entry_point=entry))
    tests = code_block(ask(gen.test_template, exercise=statement, entry_point=entry))
    draft.fields["tests"] = tests
    draft.text = solution
    if top_level_function(solution, entry) is None:
        return draft.reject(f"bad solution: does not define function `{entry}`")
    if top_level_function(tests, "check") is None:
        return draft.reject("bad tests: no function `check(candidate)`")
    draft.program = Program(program=solution, test=tests, entry_point=entry)
    return draft


def _code_reversal(job: Job, ask: Ask, draft: Draft) -> Draft:
    gen = job.gen
    assert isinstance(gen, CodeReversalGenerator)
    original = job.code_items[ask.context["code"]]
    instruction = ask.revise(ask(job.template(ask.item))).strip()
    regenerated = code_block(ask(gen.regenerate_template, instruction=instruction, entry_point=original.entry_point))
    draft.fields = {"instruction": instruction, "original_code": original.code, "regenerated": regenerated,
                    "tests": original.test, "entry_point": original.entry_point, "similarity": None}
    # The pair kept is (instruction, original code): the original is known good, the regenerated code
    # only measures whether the instruction says enough to rebuild it.
    draft.text = f"{instruction}\n\n```python\n{original.code.rstrip()}\n```\n"
    if original.test:
        draft.program = Program(program=regenerated, test=original.test, entry_point=original.entry_point)
        return draft
    similarity = ast_similarity(original.code, regenerated, original.entry_point)
    draft.fields["similarity"] = round(similarity, 4)
    draft.verification = f"ast_similarity {similarity:.3f} (threshold {gen.similarity_threshold:g})"
    if similarity < gen.similarity_threshold:
        return draft.reject(f"not faithful: AST similarity {similarity:.3f} < {gen.similarity_threshold:g}")
    return draft


_SECTION = re.compile(r"^\s*(?:\d+[.)]|[-*•]|#{1,6})\s+(.+?)\s*$")


def outline_sections(outline: str) -> list[str]:
    """Section titles of an outline: lines numbered `1.` / `1)`, bulleted, or Markdown headings."""
    out = []
    for line in outline.splitlines():
        m = _SECTION.match(line)
        if m:
            title = m.group(1).replace("**", "").strip()
            if title:
                out.append(title)
    return out


def _long(job: Job, ask: Ask, draft: Draft) -> Draft:
    gen = job.gen
    assert isinstance(gen, LongGenerator) and job.count_tokens is not None
    outline = ask.revise(ask(job.template(ask.item))).strip()
    sections = outline_sections(outline)[:gen.max_sections]
    draft.fields = {"outline": sections, "sections": 0, "tokens": 0}
    if not sections:
        return draft.reject("bad outline: no numbered, bulleted or heading lines")
    listed = "\n".join(f"{k}. {s}" for k, s in enumerate(sections, 1))
    parts: list[str] = []
    text, tokens = "", 0
    for number, section in enumerate(sections, 1):
        previous = text[-gen.context_chars:] if text else "(nothing yet: this is the first section)"
        body = ask(gen.section_template, outline=listed, section=section, number=number, previous=previous)
        parts.append(f"## {section}\n\n{body.strip()}")
        text = "\n\n".join(parts) + "\n"
        tokens = job.count_tokens(text)
        draft.fields.update(sections=number, tokens=tokens)
        if tokens >= gen.min_tokens:
            break
    draft.text = text
    if tokens < gen.min_tokens:
        return draft.reject(f"too short: {tokens} tokens after all {len(sections)} sections < min_tokens {gen.min_tokens}")
    return draft


KINDS: dict[str, Callable[[Job, Ask, Draft], Draft]] = {
    "textbook": _document,
    "rewrite": _document,
    "exercises": _exercises,
    "code_reversal": _code_reversal,
    "long": _long,
}


def run_item(job: Job, item: Item, client: LLMClient) -> Draft:
    """All requests of one item, in order; runs in a worker thread."""
    draft = Draft(index=item.index)
    KINDS[job.gen.kind](job, Ask(job, item, client, draft), draft)
    if draft.kept and len(draft.text.strip()) < job.gen.min_chars:
        draft.reject(f"too short: {len(draft.text.strip())} chars < min_chars {job.gen.min_chars}")
    return draft
