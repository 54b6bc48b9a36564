"""phitrain's CPU kernels (`model/*.c`), built on first use with the machine's C compiler and loaded.

Each C file is compiled once per source (with the headers beside it), compiler and CPU with
`cc -O3 -march=native -fopenmp` into `kernels/` of phitrain's cache directory
(`phitrain.compile_cache.cache_dir()`), through `phitrain.files.atomic_path`, so concurrent processes
never load half a library. The kernels' OpenMP threads are the ones torch already runs (torch's libgomp
is loaded first and satisfies the library's dependency by its soname), so they add no second pool;
each call passes `torch.get_num_threads()`. Without a C compiler, `AVAILABLE` is False and the model
keeps PyTorch's kernels (inductor needs the same compiler to compile).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from phitrain.compile_cache import cache_dir
from phitrain.files import atomic_path

HERE = Path(__file__).parent
# -ffp-contract=fast: in ISO C mode gcc would not fuse a * b + c into one FMA (2x the arithmetic ops)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]


def compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


# Where the kernels can be built: a C compiler on PATH (or $CC).
AVAILABLE: bool = compiler() is not None


@functools.cache
def build(name: str) -> ctypes.CDLL:
    """`model/<name>.c` compiled for this machine (once per cache directory) and loaded."""
    cc = compiler()
    if cc is None:
        raise RuntimeError(f"phitrain's CPU kernel {name} needs a C compiler (cc or $CC)")
    source = HERE / f"{name}.c"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_text() for h in sorted(HERE.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, cc, version, " ".join(FLAGS), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{name}-{key}.so"
    if not path.exists():
        with atomic_path(path) as tmp:
            done = subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp), "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {source} failed:\n{done.stderr}")
    return ctypes.CDLL(str(path))
