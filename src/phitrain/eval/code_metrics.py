"""Code metrics that move before HumanEval pass@1 does.

At the scale of a CPU run pass@1 stays at 0%, so it cannot say whether the data or the training helped;
the phi-1 paper's evidence (§2, Figure 2.1) is a comparison of training data at fixed compute. These
metrics separate models long before any problem is solved:

- `canonical_likelihood`: the mean log-likelihood of each problem's canonical solution given its prompt,
  in nats per token and bits per UTF-8 byte (bits per byte compares models with different tokenizers);
  a model that writes code more like a correct solution assigns it more probability.
- `parses_as_function`: the prompt + completion parses (`ast`) and defines the entry point with a body
  beyond its docstring — the completion closed the function instead of looping or breaking off.
- `exercise_test` turns a problem's `check` into one that calls the candidate on every test input but
  asserts nothing, so a program that runs it to the end "runs without raising" on the tests' inputs
  (wrong answers allowed, exceptions not).
"""

from __future__ import annotations

import ast
import math
from typing import Any

from phitrain.errors import PhitrainError


def canonical_likelihood(model, tokenizer, problems: dict[str, dict[str, Any]], *,
                         batch_size: int = 8) -> dict[str, Any]:
    """Log-likelihood of the canonical solutions given their prompts, over the problems that have one.

    Prompt and solution are tokenised separately (as `score_continuations` does), so a solution's tokens
    do not depend on the prompt. A solution is scored in pieces of at most half the model's context, each
    predicted from the tokens before it (prompt, then solution) that fill the rest of the window, so
    solutions longer than the context are scored too. Totals are summed over all problems before
    dividing (a token-weighted mean).
    """
    from phitrain.eval.loglik import score_sequences

    solved = [p for p in problems.values()
              if isinstance(p.get("canonical_solution"), str) and p["canonical_solution"].strip()]
    if not solved:
        raise PhitrainError("no problem has a canonical_solution: the canonical likelihood needs one")
    window = model.config.max_position_embeddings
    piece = max(1, window // 2)
    pieces: list[tuple[list[int], int]] = []
    tokens = n_bytes = 0
    for p in solved:
        ctx = tokenizer.encode(p["prompt"]) or [tokenizer.eos_id]
        sol = tokenizer.encode(p["canonical_solution"])
        full = ctx + sol
        for start in range(len(ctx), len(full), piece):
            end = min(start + piece, len(full))
            pieces.append((full[max(0, end - window - 1):end], end - start))
        tokens += len(sol)
        n_bytes += len(p["canonical_solution"].encode("utf-8"))
    logprob = sum(lp for lp, _ in score_sequences(model, pieces, batch_size))
    return {"canonical_problems": len(solved), "canonical_tokens": tokens, "canonical_bytes": n_bytes,
            "canonical_nats_per_token": -logprob / tokens,
            "canonical_bits_per_byte": -logprob / math.log(2) / n_bytes}


def parses_as_function(prompt: str, completion: str, entry_point: str) -> bool:
    """Whether prompt + completion is valid Python that defines `entry_point` at top level with at least
    one statement besides its docstring."""
    try:
        tree = ast.parse(prompt + completion)
    except (SyntaxError, ValueError):   # ValueError: a NUL byte in the source
        return False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            return bool(body)
    return False


class _AssertToCall(ast.NodeTransformer):
    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        return ast.copy_location(ast.Expr(value=node.test), node)


def exercise_test(test: str, task_id: str = "") -> str:
    """The test code with every `assert X, msg` replaced by the expression `X`: each candidate call is
    still made, in the same order, but a wrong answer no longer stops the check."""
    try:
        tree = ast.parse(test)
    except SyntaxError as err:
        raise PhitrainError(f"{task_id or 'problem'}: the test code does not parse ({err.msg}, line {err.lineno})") from None
    return ast.unparse(ast.fix_missing_locations(_AssertToCall().visit(tree))) + "\n"
