"""Compiling ahead of need: the helper process that compiles, on a second core, the kernels
a first compile calls (:func:`help_compile`), and the compile plan it follows
(:func:`record_plan`; see :mod:`emdask.families._codegen`)."""

from __future__ import annotations

import os

from ..warm import warm_kernels
from . import _kernels
from ._codegen import _RECORDING, _Entry, _name, machine_lock
from ._compile_plan import PLAN


def help_compile(entry) -> int:
    """Compile the kernels ``entry`` calls, from the end of its plan, until one is compiled
    already or being compiled (by the process compiling ``entry``). Returns how many this
    process compiled."""
    if _kernels._load_compiled() is None:
        return 0
    _kernels.compiled_discrete()
    compiled = 0
    for name, argtypes in reversed(PLAN.get(entry, ())):
        dispatcher = _dispatcher(name)
        args = _decode(argtypes) if dispatcher is not None else None
        if args is None:
            continue
        if args in dispatcher.overloads:
            continue
        lock = machine_lock(dispatcher, wait=False)
        with lock:
            if lock.path is not None and not lock.held:
                break  # being compiled: what comes before it is done or under way
            hits = sum(dispatcher.stats.cache_hits.values())
            compile_ = dispatcher.compile
            # numba's own compile: this process holds the kernel's lock already
            getattr(compile_, "compile", compile_)(args)
            if sum(dispatcher.stats.cache_hits.values()) > hits:
                break  # compiled already, and so is what comes before it
            compiled += 1
    return compiled


def _dispatcher(name):
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _encode(t):
    """A numba argument type as text (``float64[2,C,rw]``, ``int64``, ``bool``), or None."""
    from numba.core import types

    if isinstance(t, types.Array) and isinstance(t.dtype, (types.Float, types.Integer,
                                                           types.Boolean)):
        return f"{t.dtype}[{t.ndim},{t.layout},{'ro' if not t.mutable else 'rw'}]"
    if isinstance(t, (types.Float, types.Integer)):
        return str(t)
    if isinstance(t, types.Boolean):
        return "bool"
    return None


def _decode(argtypes):
    from numba.core import types

    out = []
    for text in argtypes:
        try:
            if "[" in text:
                dtype, _, rest = text.partition("[")
                ndim, layout, access = rest.rstrip("]").split(",")
                dt = types.boolean if dtype == "bool" else getattr(types, dtype)
                out.append(types.Array(dt, int(ndim), layout, readonly=access == "ro"))
            else:
                out.append(types.boolean if text == "bool" else getattr(types, text))
        except (AttributeError, ValueError):
            return None
    return tuple(out)


def record_plan():
    """Compile every kernel (:func:`emdask.warm.warm_kernels`) in this process on an empty
    cache, and return each kernel called from Python's plan: the kernels its compile
    compiled, in order, with their argument types."""
    plans = {}
    original = _Entry.__call__

    def recording(self, *args, **kws):
        name = _name(self.dispatcher)
        _RECORDING.append([])
        try:
            return original(self, *args, **kws)
        finally:
            done = _RECORDING.pop()
            steps = [(n, [_encode(t) for t in a]) for n, a in done if n != name]
            if steps and name not in plans:
                plans[name] = [(n, a) for n, a in steps if None not in a]

    _Entry.__call__ = recording
    try:
        _kernels._load_compiled()
        warm_kernels()
    finally:
        _Entry.__call__ = original
    return plans


if __name__ == "__main__":
    # python -m emdask.families._prebuild: write the compile plan (needs an empty cache:
    # run with NUMBA_CACHE_DIR set to a new directory)
    import pprint

    from emdask.families import _prebuild  # the module itself, not this __main__

    plan = _prebuild.record_plan()
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_compile_plan.py")
    with open(target, "w") as f:
        f.write('"""Compile plans of the kernels called from Python (see '
                ':mod:`emdask.families._codegen`).\n\nWritten by ``NUMBA_CACHE_DIR=$(mktemp -d) '
                'python -m emdask.families._prebuild``; do not edit."""\n\n')
        f.write("PLAN = " + pprint.pformat(plan, width=96, sort_dicts=True) + "\n")
    print(f"{target}: {sum(len(v) for v in plan.values())} steps for {len(plan)} kernels")
