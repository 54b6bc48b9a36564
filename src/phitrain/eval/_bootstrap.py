"""The first code a sandboxed interpreter runs (it is passed to `python -I -S -c`, so it must import nothing
from phitrain and stay small: its start-up cost is paid once per program).

Protocol (see sandbox.py): stdin carries one header line `nonce as cpu nproc fsize block_net block_proc
entry_point` and then three sections separated by the `\\0` byte: the setup (lines `KEY VALUE`: `setup`
none / mounts / bwrap, `uid`, `size`, `inodes`, then `hide PATH` and `keep PATH` in mount order), the
candidate program (prompt + completion) and the test code (which defines `check`). The bootstrap

1. reads all of stdin and points fd 0 at /dev/null,
2. with setup `mounts` (isolation "namespace": it was started by `unshare` as root of fresh mount, network,
   PID and IPC namespaces) builds the program's view of the filesystem itself, with the `mount` syscall
   through ctypes — one process instead of a dozen `mount`/`setpriv` executions per program: every hidden
   directory gets an empty tmpfs, the interpreter's own directories are bind-mounted back into them, /dev
   becomes a tmpfs holding only null/zero/full/random/urandom/tty, every mount is remounted read-only and
   nosuid, and /tmp, /var/tmp and /dev/shm get fresh size-limited tmpfs; then no_new_privs is set and the
   capability bounding set emptied (with setup `bwrap`, bubblewrap did all of this before starting us),
3. drops to the slot uid (`setresuid`, no supplementary groups: the kernel then clears every capability)
   or, inside a user namespace where no other uid exists, clears its capabilities with `capset`; makes
   itself non-dumpable (so that processes the program starts cannot read the nonce from its memory), and
   makes `/tmp/work` (mode 0700) its working directory,
4. sets the resource limits,
5. installs an audit hook (PEP 578; it cannot be removed) which owns the nonce in its closure — the nonce
   is on no frame and in no global while user code runs — and which writes it to stdout only when the
   `phitrain.finish` event is raised by this bootstrap's own code object after `check` returned; it also
   refuses importing ctypes (whose memmove/memset reach any address without an audit event), gc's object
   walks, tracing, and (isolation "hook", or no uid of its own) sockets and process creation,
6. runs the candidate in one namespace, then the tests in a copy of it whose builtins are a snapshot
   taken before user code ran, and calls `check` with a wrapper that only accepts plain-data results.

A failure in steps 2-3 is reported as `sandbox setup: ...` and fails the program: it never runs without the
isolation it was promised. Any exception, `sys.exit`, `os._exit`, signal or early return leaves stdout
without the nonce, which the parent reads as "failed" — this is why a passing result is proof that the
test code ran to its end.
"""

BOOTSTRAP = r'''
def _make_hook(token, block_net, block_proc, me):
    import os, sys
    write, realpath, getframe = os.write, os.path.realpath, sys._getframe
    blocked = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
               "sys.monitoring.register_callback", "sys._current_frames"}
    if block_net:
        blocked |= {"socket.__new__", "socket.socketpair"}
    if block_proc:
        blocked |= {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                    "subprocess.Popen", "pty.spawn"}
    done = []

    def hook(event, args):
        if event == "phitrain.finish":
            if done or getframe(1).f_code is not me:
                raise RuntimeError("phitrain.finish may only be raised by the sandbox")
            done.append(1)
            write(1, token)
        elif event in blocked or event.startswith("ctypes."):
            raise PermissionError(f"{event} is not allowed in the phitrain sandbox")
        elif event == "import" and (args[0] in ("ctypes", "_ctypes") or args[0].startswith("ctypes.")):
            # ctypes.memmove/memset take raw addresses and raise no audit event: memory access at will
            raise PermissionError("ctypes is not allowed in the phitrain sandbox")
        elif event == "import" and block_proc and args[0] == "_posixsubprocess":
            raise PermissionError("process creation is not allowed in the phitrain sandbox")
        elif event == "open" and isinstance(args[0], (str, bytes)):
            path = realpath(os.fsdecode(args[0]))
            if path.startswith("/proc/") and path.rsplit("/", 1)[-1] in ("mem", "environ"):
                raise PermissionError(f"opening {path} is not allowed in the phitrain sandbox")

    return hook


def _mounts(size, inodes, ops):
    """Isolation "namespace": we are root of new mount/net/pid/ipc namespaces (maybe inside a user
    namespace). Nothing done here is visible outside them, and all of it disappears with them."""
    import os, ctypes, codecs
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    atime = ((b"noatime", 1024), (b"nodiratime", 2048), (b"relatime", 1 << 21), (b"strictatime", 1 << 24))

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {dst}: {os.strerror(err)}")

    mount(None, "/", None, REC | PRIVATE)
    # First every mount there is, host mounts included, becomes read-only, nosuid and (but /dev, whose nodes
    # are bound in below) nodev; flags the kernel may hold locked (in a user namespace: nodev, noexec, atime)
    # stay as they are. Binds made later copy these flags.
    with open("/proc/self/mountinfo", "rb") as f:
        table = f.read().splitlines()
    for line in table:
        fields = line.split(b" ")
        point, opts = os.fsdecode(codecs.escape_decode(fields[4])[0]), fields[5].split(b",")
        flags = REMOUNT | BIND | RDONLY | NOSUID | (NODEV if point != "/dev" or b"nodev" in opts else 0)
        flags |= NOEXEC if b"noexec" in opts else 0
        for name, bit in atime:
            flags |= bit if name in opts else 0
        if not any(name in opts for name, _ in atime):
            flags |= 1 << 24
        try:
            mount(None, point, None, flags)
        except OSError as err:  # a mount covered by a later one: its path leads elsewhere or nowhere
            if err.errno != 2 and (err.errno != 22 or os.path.ismount(point)):
                raise
    # Open what must survive being covered before covering anything (bind sources via /proc/self/fd).
    keep = {path: os.open(path, os.O_PATH) for kind, path in ops if kind == "keep"}
    nodes = ("null", "zero", "full", "random", "urandom", "tty")
    devs = {name: os.open("/dev/" + name, os.O_PATH) for name in nodes if os.path.exists("/dev/" + name)}
    for kind, path in ops:  # parents first: a kept directory is re-bound inside the hiding tmpfs
        if kind == "hide":
            mount("tmpfs", path, "tmpfs", NOSUID | NODEV | NOEXEC, "size=64k,nr_inodes=256,mode=755")
        else:
            os.makedirs(path, 0o755, exist_ok=True)
            mount(f"/proc/self/fd/{keep[path]}", path, None, BIND | REC)
    mount("tmpfs", "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name, fd in devs.items():
        os.close(os.open("/dev/" + name, os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/proc/self/fd/{fd}", "/dev/" + name, None, BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, "/dev/" + name)
    os.mkdir("/dev/shm")
    for fd in [*keep.values(), *devs.values()]:
        os.close(fd)
    for path in ["/dev"] + [path for kind, path in ops if kind == "hide"]:
        mount(None, path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV * (path != "/dev") | NOEXEC)
    for point in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(point) and not os.path.islink(point):
            mount("tmpfs", point, "tmpfs", NOSUID | NODEV, f"size={size},nr_inodes={inodes},mode=1777")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid or file capabilities from here on
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    cap = 0
    while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP, until EINVAL past the last capability
        cap += 1
    return libc


def _drop(uid, libc):
    import os, ctypes
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # all uids non-zero: the kernel clears every capability
    else:  # a user namespace has no other uid to become: clear effective, permitted, inheritable sets
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    # Not dumpable: processes the program starts (same uid) cannot ptrace this one or open its
    # /proc/PID/mem to read the nonce (the uid change does this too, unless fs.suid_dumpable says otherwise).
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    os.mkdir("/tmp/work", 0o700)
    os.chdir("/tmp/work")


def _phitrain_sandbox():
    import os, sys, resource, builtins
    raw = sys.stdin.buffer.read()
    fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    header, _, body = raw.partition(b"\n")
    nonce, mem, cpu, nproc, fsize, block_net, block_proc, entry = header.decode().split(" ")
    setup, program, test = body.decode().split("\0")
    try:
        spec, ops = {}, []
        for line in setup.splitlines():
            key, _, value = line.partition(" ")
            if key in ("hide", "keep"):
                ops.append((key, value))
            else:
                spec[key] = value
        if spec["setup"] != "none":
            os.umask(0o022)
            if spec["setup"] == "mounts":
                libc = _mounts(int(spec["size"]), int(spec["inodes"]), ops)
            else:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
            _drop(int(spec["uid"]), libc)
            del libc
            for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
                del sys.modules[name]  # so that the program's own `import ctypes` meets the audit hook
    except BaseException as err:
        os.write(2, f"\nphitrain-sandbox-error: sandbox setup: {type(err).__name__}: {err}\n".encode())
        os._exit(1)
    for lim, value in ((resource.RLIMIT_AS, int(mem)), (resource.RLIMIT_CPU, int(cpu)),
                       (resource.RLIMIT_NPROC, int(nproc)), (resource.RLIMIT_FSIZE, int(fsize)),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (value, value + 1 if lim == resource.RLIMIT_CPU else value))
    sys.addaudithook(_make_hook((nonce + "\n").encode(), block_net == "1", block_proc == "1",
                                sys._getframe().f_code))
    del raw, header, nonce, setup, body
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
