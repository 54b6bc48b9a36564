"""The first code a sandboxed interpreter runs (it is passed to `python -I -S -c`, so it must import nothing
from phitrain and stay small: its start-up cost is paid once per program).

Protocol (see sandbox.py): stdin carries one header line `nonce as cpu nproc fsize mode entry_point` and
then two code sections separated by the `\\0` byte: the candidate program (prompt + completion) and the
test code (which defines `check`). The uid switch happened before (`setpriv`). The bootstrap

1. reads all of stdin and points fd 0 at /dev/null,
2. sets the resource limits,
3. installs an audit hook (PEP 578; it cannot be removed) which owns the nonce in its closure — the nonce
   is on no frame and in no global while user code runs — and which writes it to stdout only when the
   `phitrain.finish` event is raised by this bootstrap's own code object after `check` returned,
4. runs the candidate in one namespace, then the tests in a copy of it whose builtins are a snapshot
   taken before user code ran, and calls `check` with a wrapper that only accepts plain-data results.

Any exception, `sys.exit`, `os._exit`, signal or early return leaves stdout without the nonce, which the
parent reads as "failed" — this is why a passing result is proof that the test code ran to its end.
"""

BOOTSTRAP = r'''
def _make_hook(token, mode, me):
    import os, sys
    write, realpath, getframe = os.write, os.path.realpath, sys._getframe
    blocked = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
               "sys.monitoring.register_callback", "sys._current_frames"}
    if mode == "hook":
        blocked |= {"socket.__new__", "socket.socketpair", "os.fork", "os.forkpty", "os.posix_spawn",
                    "os.spawn", "os.exec", "os.system", "subprocess.Popen", "pty.spawn"}
    done = []

    def hook(event, args):
        if event == "phitrain.finish":
            if done or getframe(1).f_code is not me:
                raise RuntimeError("phitrain.finish may only be raised by the sandbox")
            done.append(1)
            write(1, token)
        elif event in blocked or event.startswith("ctypes."):
            raise PermissionError(f"{event} is not allowed in the phitrain sandbox")
        elif event == "import" and mode == "hook" and args[0] == "_posixsubprocess":
            raise PermissionError("process creation is not allowed in the phitrain sandbox")
        elif event == "open" and isinstance(args[0], (str, bytes)):
            path = realpath(os.fsdecode(args[0]))
            if path.startswith("/proc/") and path.rsplit("/", 1)[-1] in ("mem", "environ"):
                raise PermissionError(f"opening {path} is not allowed in the phitrain sandbox")

    return hook


def _phitrain_sandbox():
    import os, sys, resource, builtins
    raw = sys.stdin.buffer.read()
    fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    header, _, body = raw.partition(b"\n")
    nonce, mem, cpu, nproc, fsize, mode, entry = header.decode().split(" ")
    program, _, test = body.decode().partition("\0")
    for lim, value in ((resource.RLIMIT_AS, int(mem)), (resource.RLIMIT_CPU, int(cpu)),
                       (resource.RLIMIT_NPROC, int(nproc)), (resource.RLIMIT_FSIZE, int(fsize)),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (value, value + 1 if lim == resource.RLIMIT_CPU else value))
    sys.addaudithook(_make_hook((nonce + "\n").encode(), mode, sys._getframe().f_code))
    del raw, header, nonce
    pristine = dict(builtins.__dict__)
    plain = (int, float, complex, bool, str, bytes, type(None))
    containers = (list, tuple, set, frozenset)

    def is_plain(value, depth=0):
        kind = type(value)
        if kind in plain:
            return True
        if depth > 50:
            return False
        if kind in containers:
            return all(is_plain(v, depth + 1) for v in value)
        if kind is dict:
            return all(is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in value.items())
        return False

    try:
        space = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(program, "<program>", "exec"), space)
        candidate = space[entry]

        def checked(*args, **kwargs):
            result = candidate(*args, **kwargs)
            if not is_plain(result):
                raise TypeError(f"{entry} returned a {type(result).__name__}, not plain data")
            return result

        tests = {k: v for k, v in space.items() if k not in pristine}
        tests["__name__"] = "__main__"
        tests["__builtins__"] = pristine
        exec(compile(test, "<tests>", "exec"), tests)
        tests["check"](checked)
    except BaseException as err:
        try:
            detail = f"{type(err).__name__}: {err}"
        except BaseException:
            detail = type(err).__name__
        os.write(2, ("\nphitrain-sandbox-error: " + detail.replace("\n", " ")[:500] + "\n").encode())
        os._exit(1)
    sys.audit("phitrain.finish")
    os._exit(0)


_phitrain_sandbox()
'''
