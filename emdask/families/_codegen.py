"""How the compiled kernels are generated: vectors of the CPU's full width; one
specialisation per kernel, compiled once per machine.

LLVM, which numba compiles with, holds its vectorised loops to 256-bit registers on most
CPUs with 512-bit ones (AVX-512): on the first such CPUs, wide instructions lowered the clock.
On current ones they do not, and emdask's kernels (long loops of multiply-adds along the
rows) run 10-15% faster with 512-bit vectors. So, on a CPU with AVX-512, emdask asks numba
for its host's features less the 256-bit preference, before numba is first imported (numba
reads its settings then).

Nothing is changed when numba was imported already, when ``NUMBA_CPU_NAME`` or
``NUMBA_CPU_FEATURES`` are set, when ``NUMBA_ENABLE_AVX=0``, or with
``EMDASK_WIDE_VECTORS=0``. Results are the same either way to rounding (sums taken in
another order); compiled kernels are cached per feature set, so neither setting reuses the
other's.
"""

from __future__ import annotations

import os
import sys

_DONE = []


def prefer_wide_vectors() -> bool:
    """Ask numba for full-width vectors where that applies (see the module's text); whether
    it was asked, in this process. Call before numba is imported; later calls do nothing."""
    if _DONE:
        return _DONE[0]
    _DONE.append(_configure())
    return _DONE[0]


def _configure() -> bool:
    env = os.environ
    if "numba" in sys.modules or env.get("EMDASK_WIDE_VECTORS", "1") == "0":
        return False
    if env.get("NUMBA_CPU_NAME") or env.get("NUMBA_CPU_FEATURES"):
        return False
    if env.get("NUMBA_ENABLE_AVX", "1") == "0":
        return False
    try:
        import llvmlite.binding as ll

        features = ll.get_host_cpu_features()
    except Exception:  # no llvmlite (numba is not installed) or no answer from LLVM
        return False
    if not features.get("avx512f"):
        return False
    env["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"
    return True


# --------------------------------------------------------------------------------------
# One compiled specialisation per kernel, compiled once per machine
# --------------------------------------------------------------------------------------

#: Parameters typed as read-only arrays of any layout, whatever array they receive: the
#: blocks (row-major from numpy, column-major from pandas and Parquet, read-only when received
#: from the network or memory-mapped) and their row weights. Each would otherwise make numba
#: compile the whole kernel again (some seconds) for every layout it meets. The kernels find
#: a column-major block from its strides at run time.
ANY_LAYOUT = frozenset({"X", "weights"})
#: Parameters the kernels only read, typed read-only whether the array is or not (a full
#: covariance's factors come as a read-only view, a tied one's as a fresh copy).
READ_ONLY = frozenset({"means", "chol", "P", "const"})

#: Seconds a process waits for another one compiling the same kernel before compiling it
#: itself (a compile takes seconds; the wait only guards against a stuck process).
LOCK_TIMEOUT = 600.0


def install_entries(module) -> None:
    """Make the compiled kernels of ``module`` called from Python compile (or load) one
    specialisation each, once per machine.

    A kernel's argument types are taken from its arguments except for the parameters named
    in :data:`ANY_LAYOUT` and :data:`READ_ONLY`, so one specialisation serves every block.
    A process that needs a specialisation numba's cache does not hold compiles it under a
    lock file next to the cache: other processes of the machine (Dask workers) needing it
    wait, then load it from the cache instead of compiling it too."""
    from numba.core.registry import CPUDispatcher

    for value in vars(module).values():
        if (isinstance(value, CPUDispatcher) and value.__module__ == module.__name__
                and not isinstance(value.__dict__.get("_compile_for_args"), _Entry)):
            value.compile = _Compile(value)
            value._compile_for_args = _Entry(value)


class _Compile:
    """A kernel's ``compile`` (numba calls it for kernels called from Python and for the
    kernels they call): a specialisation not yet in this process is compiled or loaded
    under the machine's lock of that kernel, so that a process compiling it is waited for and
    its result loaded from the cache."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.compile = type(dispatcher).compile.__get__(dispatcher)

    def __call__(self, sig):
        from numba.core import sigutils

        dispatcher = self.dispatcher
        args, _ = sigutils.normalize_signature(sig)
        done = dispatcher.overloads.get(tuple(args))
        if done is not None:
            return done.entry_point
        with machine_lock(dispatcher):
            return self.compile(sig)


class _Entry:
    """A kernel's ``_compile_for_args`` (what numba calls when no compiled specialisation
    matches a call's argument types exactly): the specialisation of the widened types,
    compiled or loaded under the machine's lock."""

    def __init__(self, dispatcher):
        import inspect

        from numba.core import types

        self.dispatcher = dispatcher
        self.fallback = type(dispatcher)._compile_for_args.__get__(dispatcher)
        names = list(inspect.signature(dispatcher.py_func).parameters)
        self.widen = {}
        for at, name in enumerate(names):
            if name in ANY_LAYOUT:
                self.widen[at] = lambda t: types.Array(t.dtype, t.ndim, "A", readonly=True)
            elif name in READ_ONLY:
                self.widen[at] = lambda t: t.copy(readonly=True)

    def __call__(self, *args, **kws):
        from numba.core import types
        from numba.core.dispatcher import OmittedArg

        if kws or any(isinstance(a, OmittedArg) for a in args):
            return self.fallback(*args, **kws)
        dispatcher = self.dispatcher
        argtypes = [dispatcher.typeof_pyval(a) for a in args]
        for at, widen in self.widen.items():
            if at < len(argtypes) and isinstance(argtypes[at], types.Array):
                argtypes[at] = widen(argtypes[at])
        argtypes = tuple(argtypes)
        done = dispatcher.overloads.get(argtypes)
        if done is not None:
            return done.entry_point
        from numba.core.errors import ForceLiteralArg

        try:
            return dispatcher.compile(argtypes)
        except ForceLiteralArg:  # numba's own path re-types literal arguments
            return self.fallback(*args)


class machine_lock:
    """Held while this process compiles (or loads) a kernel: an exclusive ``flock`` on a
    file in the kernel's numba cache directory, released by the system if the process dies.
    Does nothing where there is no such directory or no ``fcntl`` (Windows)."""

    def __init__(self, dispatcher, wait=True):
        self.wait = wait
        self.held = False
        self.path = None
        self.fd = None
        cache = getattr(dispatcher, "_cache", None)
        try:
            folder = cache.cache_path
            base = cache._impl.filename_base
        except AttributeError:  # no cache (cache=False)
            return
        self.path = os.path.join(folder, f"{base}.lock")
        self.fd = None

    def __enter__(self):
        if self.path is None:
            return self
        try:
            import fcntl

            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # read-only is enough for flock: a lock file another user created serves too
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        except (ImportError, OSError):
            self.fd = None
            return self
        import time

        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.held = True
                return self
            except BlockingIOError:
                if not self.wait or time.monotonic() > deadline:
                    return self  # compile without it
                time.sleep(0.05)
            except OSError:  # a file system without locks
                return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
        self.held = False
        return False
