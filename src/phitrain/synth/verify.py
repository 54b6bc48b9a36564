"""Checks that decide whether generated code is kept (Phi-4 §2: code validated by execution; instruction
reversal keeps only high-fidelity pairs).

- `code_block`: the code of an answer (models wrap code in Markdown fences and talk around it);
- `defines`: whether code parses and defines a given top-level function;
- `ast_similarity`: phi-1 §5's AST-normalised comparison (identifiers renamed in order of first use,
  docstrings, comments and layout ignored; difflib ratio of the canonical tokens), used by code reversal
  when the original has no tests. Execution itself is `phitrain.eval.sandbox`.
"""

from __future__ import annotations

import ast
import difflib
import re

from phitrain.synth.corpus import parse_python

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def code_block(answer: str) -> str:
    """The first ```python block of an answer, else its first fenced block, else the whole answer."""
    blocks = _FENCE.findall(answer)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body.strip("\n") + "\n"
    if blocks:
        return blocks[0][1].strip("\n") + "\n"
    return answer.strip("\n") + "\n"


def top_level_function(code: str, name: str | None = None) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The top-level function called `name` (or the first one, when name is None) of code that parses."""
    tree = parse_python(code)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name is None or node.name == name):
            return node
    return None


def ast_similarity(original: str, regenerated: str, entry_point: str) -> float:
    """difflib ratio of the canonical token sequences of function `entry_point` in both; 0.0 when the
    regenerated code does not parse or lacks the function."""
    from phitrain.data.decontam import canonical_tokens

    a = top_level_function(original, entry_point)
    b = top_level_function(regenerated, entry_point)
    if a is None or b is None:
        return 0.0
    ta = canonical_tokens(original.splitlines(), a)
    tb = canonical_tokens(regenerated.splitlines(), b)
    return difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio()
