"""The metrics that move before pass@1 (issue 14): canonical-solution likelihood checked against the
model's own logits, parse / run / pass classification through the real sandbox, the repetition penalty
and the end-of-definition stop of generation, and the `eval humaneval` summary that reports them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from phitrain.checkpoint import load_checkpoint
from phitrain.cli import main
from phitrain.errors import PhitrainError
from phitrain.eval.code_metrics import canonical_likelihood, exercise_test, parses_as_function
from phitrain.eval.humaneval import evaluate
from phitrain.eval.sandbox import SandboxConfig
from phitrain.model.generate import complete, generate, penalize_repeats

PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""\n'
PROBLEM = {
    "task_id": "Test/0", "prompt": PROMPT, "entry_point": "add", "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0, 'zero'\n"
            "    for x in range(3):\n        assert candidate(x, x) == 2 * x\n",
}


def test_canonical_likelihood_equals_a_direct_computation(tiny_checkpoint):
    """Two problems scored by hand: log_softmax of the model's logits over prompt + solution, summed over
    the solution's tokens (prompt and solution tokenised separately, as the metric documents). A solution
    longer than the context is scored too (no error)."""
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    model.eval()
    # the second solution is longer than half the context (256): it is scored in two pieces, the second
    # predicted from the whole prompt + first piece, which must give the same numbers as one pass
    second = {**PROBLEM, "task_id": "Test/1", "prompt": "def neg(x):\n",
              "canonical_solution": "    y = -x  # négation\n" * 16 + "    return y\n"}
    problems = {"Test/0": PROBLEM, "Test/1": second}
    total, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for p in problems.values():
            ctx, sol = tokenizer.encode(p["prompt"]), tokenizer.encode(p["canonical_solution"])
            if p is second:
                assert 128 < len(sol) and len(ctx) + len(sol) <= 256, (len(ctx), len(sol))
            seq = torch.tensor([ctx + sol])
            logprobs = torch.log_softmax(model(seq[:, :-1]).float(), dim=-1)[0]
            for j, tok in enumerate(sol):
                total += float(logprobs[len(ctx) - 1 + j, tok])
            tokens += len(sol)
            n_bytes += len(p["canonical_solution"].encode("utf-8"))
    got = canonical_likelihood(model, tokenizer, problems, batch_size=2)
    assert got["canonical_problems"] == 2 and got["canonical_tokens"] == tokens and got["canonical_bytes"] == n_bytes
    assert got["canonical_nats_per_token"] == pytest.approx(-total / tokens, rel=1e-5)
    assert got["canonical_bits_per_byte"] == pytest.approx(-total / math.log(2) / n_bytes, rel=1e-5)
    long = {**second, "canonical_solution": "    y = -x  # négation\n" * 60}       # > the whole context
    assert canonical_likelihood(model, tokenizer, {"long": long})["canonical_nats_per_token"] > 0
    with pytest.raises(PhitrainError, match="canonical_solution"):
        canonical_likelihood(model, tokenizer, {"x": {k: v for k, v in PROBLEM.items() if k != "canonical_solution"}})


@pytest.mark.parametrize("completion, expected", [
    ("    return a + b\n", True),
    ("    if a:\n        return a\n    return b\n\n\nprint(add(1, 2))\n", True),   # extra top-level code is fine
    ("    return a +\n", False),                       # broken off mid-expression
    ("    while True:\n", False),                      # no body: cut by max_new_tokens
    ("", False),                                       # docstring only
    ("    return a\n\u0000", False),                   # a NUL byte: ast refuses the source
])
def test_parses_as_function(completion, expected):
    assert parses_as_function(PROMPT, completion, "add") is expected


def test_parses_as_function_needs_the_entry_point():
    assert not parses_as_function("def other(a, b):\n", "    return a\n", "add")
    assert not parses_as_function("class add:\n", "    x = 1\n", "add")


def test_exercise_test_keeps_the_calls_and_drops_the_assertions():
    src = exercise_test(PROBLEM["test"])
    assert "assert" not in src and src.count("candidate(") == 3
    namespace: dict = {}
    exec(src, namespace)
    calls = []
    namespace["check"](lambda a, b: calls.append((a, b)) or "wrong")     # a wrong answer never raises
    assert calls == [(1, 2), (-1, 1), (0, 0), (1, 1), (2, 2)]
    with pytest.raises(PhitrainError, match="Bad/1: the test code does not parse"):
        exercise_test("def check(candidate):\n    assert (\n", "Bad/1")


def test_evaluate_tells_pass_run_and_parse_apart():
    """Through the real sandbox: right answer (passes, runs, parses), wrong answer (fails, runs),
    an exception on the tests' inputs (fails, does not run), and code that does not parse."""
    problems = {"Test/0": PROBLEM}
    completions = ["    return a + b\n", "    return a - b\n", "    return a + b + c\n", "    return (a +\n"]
    samples = [{"task_id": "Test/0", "completion": c} for c in completions]
    report = evaluate(problems, samples, ks=(1,), sandbox=SandboxConfig(timeout=10, workers=2))
    rows = report.samples
    assert [r["passed"] for r in rows] == [True, False, False, False]
    assert [r["runs"] for r in rows] == [True, True, False, False]
    assert [r["parses"] for r in rows] == [True, True, True, False]
    assert report.rates() == {"parse_rate": 0.75, "run_rate": 0.5}
    assert report.pass_at_k["pass@1"] == 0.25


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 4.0, 1.0], [2.0, -1.0, 4.0, 1.0]])
    ids = torch.tensor([[0, 1, 1], [3, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])          # row 1's first column is padding (token 3)
    out = penalize_repeats(logits, ids, mask, 2.0)
    assert out.tolist() == [[1.0, -2.0, 4.0, 1.0], [1.0, -1.0, 2.0, 1.0]]


def test_generation_with_penalty_and_top_level_stop(tiny_checkpoint):
    """Penalised greedy decoding equals a step-by-step reference (full forward, penalty over the prompt
    and the tokens so far, argmax); the top-level stop cuts the plain completion at its first column-0
    line."""
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    model.eval()
    prompt = tokenizer.encode("def f(x):\n")
    got = generate(model, [prompt], 24, repetition_penalty=1.5)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            logits = model(torch.tensor([seq]))[:, -1]
            ids = torch.tensor([seq])
            seq.append(int(penalize_repeats(logits, ids, torch.ones_like(ids), 1.5).argmax(-1)))
    assert got == seq[len(prompt):]
    assert got != generate(model, [prompt], 24)[0]                  # the penalty changed something

    plain = complete(model, tokenizer, ["def f(x):\n"], 48)[0]
    cut = complete(model, tokenizer, ["def f(x):\n"], 48, stop_at_top_level=True)[0]
    assert plain.startswith(cut)
    assert all(line == "" or line[0].isspace() or line[0] in ")]}" for line in cut.split("\n")[1:]), repr(cut)
    rest = plain[len(cut):]
    assert rest == "" or (rest[0] == "\n" and not rest[1:2].isspace()), repr(rest)


def test_eval_humaneval_reports_the_new_metrics(tiny_checkpoint, tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(PROBLEM) + "\n")
    out = tmp_path / "r.jsonl"
    assert main(["eval", "humaneval", "--checkpoint", str(tiny_checkpoint), "--problems", str(problems),
                 "--max-new-tokens", "24", "--k", "1", "--out", str(out), "--repetition-penalty", "1.3",
                 "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = json.loads(out.read_text())
    assert {"parse_rate", "run_rate", "canonical_bits_per_byte", "canonical_nats_per_token"} <= set(summary)
    assert summary["parse_rate"] == float(row["parses"]) and summary["run_rate"] == float(row["runs"])
    assert summary["canonical_bits_per_byte"] > 0
    assert main(["eval", "humaneval", "--checkpoint", str(tiny_checkpoint), "--problems", str(problems),
                 "--out", str(out), "--repetition-penalty", "0"]) == 2
    assert "--repetition-penalty must be > 0" in capsys.readouterr().err
