"""CodeExercises-style pairs extracted from real code (the offline stand-in for phi-1 §2.2).

phi-1's CodeExercises are "a function signature and a docstring, to be completed by a body". Real code
already contains many such pairs: every module-level function with a docstring gives one — the `def`
line(s) plus the docstring as the prompt, the body as the completion. Only module-level functions are
used, so a prompt never depends on an enclosing class.
"""

from __future__ import annotations

import ast
import textwrap

from phitrain.config import ExercisesConfig
from phitrain.data.decontam import parse_python


def extract_exercises(doc_id: str, text: str, cfg: ExercisesConfig, tree: ast.AST | None = None) -> list[dict]:
    """`{"prompt", "completion", "source"}` for each documented module-level function whose body (after
    the docstring) has between `min_body_lines` and `max_body_lines` non-blank lines."""
    tree = tree if tree is not None else parse_python(text)
    if tree is None:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for fn in tree.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(fn.body) < 2:
            continue
        doc = fn.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        if doc.lineno == fn.lineno or doc.end_lineno is None or fn.end_lineno is None:
            continue  # one-line `def f(): "doc"; ...` has no separable prompt
        if fn.body[1].lineno <= doc.end_lineno:
            continue  # body continues on the docstring's line (`"""doc"""; x = 1`)
        prompt = "".join(lines[fn.lineno - 1:doc.end_lineno])
        body = "".join(lines[doc.end_lineno:fn.end_lineno])
        n_body = sum(1 for ln in body.splitlines() if ln.strip())
        if not cfg.min_body_lines <= n_body <= cfg.max_body_lines:
            continue
        if not prompt.endswith("\n"):
            prompt += "\n"
        out.append({"prompt": textwrap.dedent(prompt) if prompt[:1].isspace() else prompt,
                    "completion": body if body.endswith("\n") else body + "\n",
                    "source": f"{doc_id}:{fn.name}"})
    return out
